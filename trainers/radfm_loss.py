"""RadFM losses and the medical-entity tagger for the ``weighted`` loss.

* ``hf``: plain next-token cross-entropy over the answer tokens (labels != -100), the mean over
  the micro-batch's answer tokens - what the release actually returns and optimises.
* ``weighted``: the same per-token cross-entropy weighted 3 for answer tokens inside a medical
  entity, 1 for other answer tokens, 0 for prompt/image/padding tokens (label -100), as the
  release computes it (and then does not return); reduced as ``sum(w * ce) / sum(w)``.

Entity taggers map a text to character spans ``[(begin, end), ...]``. :class:`DictionaryTagger`
(the default) matches a term list (one term per line, case-insensitive, whole words, longest
first; the shipped ``trainers/radfm_terms.txt``); :class:`ScispacyTagger` uses scispaCy's
entities when it is installed (``en_core_sci_sm``), as upstream does with UMLS. A custom tagger
is any ``"module:callable"`` returning such spans.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["hf_loss", "weighted_loss", "per_token_ce", "DictionaryTagger", "ScispacyTagger",
           "make_tagger", "token_weights", "DEFAULT_TERMS", "ENTITY_WEIGHT"]

DEFAULT_TERMS = Path(__file__).with_name("radfm_terms.txt")
ENTITY_WEIGHT = 3.0

Span = tuple[int, int]


def per_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[B, L-1]`` cross-entropy of token t+1 given the logits at t (0 where label is -100)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                         shift_labels.reshape(-1), ignore_index=-100, reduction="none")
    return ce.reshape(shift_labels.shape)


def hf_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF causal-LM loss: mean cross-entropy over the shifted labels that are not -100."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor:
    """``sum(w * ce) / sum(w)`` over the shifted tokens (``weights`` aligned with ``labels``)."""
    ce = per_token_ce(logits, labels)
    w = weights[:, 1:].to(ce.dtype) * (labels[:, 1:] != -100)
    return (ce * w).sum() / w.sum().clamp(min=1e-8)


class DictionaryTagger:
    """Whole-word, case-insensitive matches of a term list (longest term first)."""

    def __init__(self, terms: Iterable[str] | str | Path | None = None) -> None:
        if terms is None:
            terms = DEFAULT_TERMS
        if isinstance(terms, (str, Path)):
            lines = Path(terms).read_text(encoding="utf-8").splitlines()
            terms = [t.split("#", 1)[0].strip() for t in lines]
        self.terms = sorted({t.lower() for t in terms if t and t.strip()}, key=len, reverse=True)
        if not self.terms:
            raise ValueError("the entity term list is empty")
        alt = "|".join(re.escape(t).replace(r"\ ", r"\s+") for t in self.terms)
        self._re = re.compile(rf"(?<![\w-])(?:{alt})(?![\w-])", re.IGNORECASE)

    def __call__(self, text: str) -> list[Span]:
        return [(m.start(), m.end()) for m in self._re.finditer(text)]


class ScispacyTagger:
    """scispaCy entities (``en_core_sci_sm`` by default), when installed."""

    def __init__(self, model: str = "en_core_sci_sm") -> None:
        try:
            import spacy

            self.nlp = spacy.load(model)
        except (ImportError, OSError) as exc:
            raise RuntimeError(f"the scispacy tagger needs spaCy and the {model} model "
                               f"(pip install scispacy + the model): {exc}") from None

    def __call__(self, text: str) -> list[Span]:
        return [(e.start_char, e.end_char) for e in self.nlp(text).ents]


def make_tagger(kind: str = "dictionary", terms: str | Path | None = None
                ) -> Callable[[str], list[Span]]:
    """``dictionary`` (term list), ``scispacy`` or ``"module:callable"``."""
    if kind == "dictionary":
        return DictionaryTagger(terms)
    if kind == "scispacy":
        return ScispacyTagger()
    if ":" in kind:
        mod, _, fn = kind.partition(":")
        obj = getattr(importlib.import_module(mod), fn)
        return obj() if isinstance(obj, type) else obj
    raise ValueError(f"loss.tagger must be dictionary, scispacy or module:callable, not {kind!r}")


def token_weights(offsets: Sequence[Span], spans: Sequence[Span],
                  entity_weight: float = ENTITY_WEIGHT) -> list[float]:
    """Per answer token: ``entity_weight`` if its characters overlap an entity span, else 1."""
    out = []
    for b, e in offsets:
        inside = any(b < se and e > sb and e > b for sb, se in spans)
        out.append(float(entity_weight) if inside else 1.0)
    return out
