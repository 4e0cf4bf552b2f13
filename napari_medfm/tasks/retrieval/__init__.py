"""Similar-case retrieval: a faiss + SQLite index of image embeddings (see ``index.py``)."""

from .index import CaseIndex, CaseRecord, Hit, IndexCorruptError, IndexMismatchError

__all__ = ["CaseIndex", "CaseRecord", "Hit", "IndexCorruptError", "IndexMismatchError"]
