"""Shared test helpers for the report generator: one tiny merlin-report folder per session,
and a scripted report generator (``test-echo``) for orchestration tests."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from napari_medfm.runtime.registry import ModelSpec, register

REPORTS = "cxr/reports_iu_xray"
_FOLDER: dict[str, Path] = {}
_LOCK = threading.Lock()


def tiny_report_folder() -> Path:
    """A tiny random merlin-report model folder (tokenizer trained on the IU X-ray reports),
    written once per test session."""
    from napari_medfm.models.merlin_report.testing import report_corpus, write_model_folder
    from tests.conftest import real_path

    with _LOCK:
        if "tiny" not in _FOLDER:
            texts = report_corpus(real_path(REPORTS))
            tmp = Path(tempfile.mkdtemp(prefix="medfm-merlin-report-"))
            _FOLDER["tiny"] = write_model_folder(tmp / "merlin-report", texts)
        return _FOLDER["tiny"]


class EchoGenerator:
    """A ReportGenerator that streams a fixed text word by word (counts what it produced)."""

    model_id = "test-echo"
    dims = (2, 3)
    weights_sha256 = "e" * 64

    def __init__(self, text: str = "No acute findings . The liver is normal . End .") -> None:
        self.words = text.split(" ")
        self.produced = 0
        self.calls: list[dict[str, Any]] = []

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "device": "cpu", "precision": "none"}

    def stream(self, images: Sequence[Any], prompt: str, *, max_new_tokens: int = 200,
               repetition_penalty: float = 1.0) -> Iterator[str]:
        self.calls.append({"n_images": len(images), "prompt": prompt,
                           "max_new_tokens": max_new_tokens})
        for i, w in enumerate(self.words[:max_new_tokens]):
            self.produced += 1
            yield w if i == 0 else " " + w


def build_echo(spec: Any, weights: Any = None, device: Any = None) -> EchoGenerator:
    return EchoGenerator()


ECHO_SPEC = ModelSpec(id="test-echo", family="test", tasks=("report",), modalities=("CT", "CXR"),
                      dims=(2, 3), builder="tests._report_helpers:build_echo",
                      needs_weights=False)


def register_echo() -> None:
    register(ECHO_SPEC, replace=True)
