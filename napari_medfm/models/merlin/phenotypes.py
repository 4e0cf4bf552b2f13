"""Phecode table of Merlin's 1692 phenotype outputs, and zero-shot prompt files (torch-free).

``data/phenotypes.csv`` is Merlin's ``documentation/phenotypes.csv`` (MIT, Stanford MIMI): row
``i`` names output ``i`` of the phenotype classifier (Merlin's own documentation says so). The
copy here was taken from a public fork of the repository (``fbrynpk/HCC-Merlin`` @ f10eab4e,
unchanged file: 1692 rows, same byte count as the upstream file with CRLF line ends).
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import MedfmError

__all__ = [
    "N_PHENOTYPES",
    "phenotype_table",
    "top_phenotypes",
    "PromptSet",
    "load_prompts",
    "DEFAULT_PROMPTS",
    "FIVE_YEAR_NOTE",
]

N_PHENOTYPES = 1692

#: Name of the packaged default prompt file.
DEFAULT_PROMPTS = "prompts.yaml"

#: The 5-year head has 6 outputs; the paper lists the 6 diseases (chronic kidney disease,
#: osteoporosis, cardiovascular disease, ischemic heart disease, hypertension, type 2 diabetes)
#: but the release does not document the output order, so outputs are reported by index.
FIVE_YEAR_NOTE = (
    "Merlin's 5-year head predicts 6 diseases (paper: chronic kidney disease, osteoporosis, "
    "cardiovascular disease, ischemic heart disease, hypertension, diabetes); the order of its "
    "outputs is not documented, so they are reported as output 1..6."
)


@functools.lru_cache(maxsize=1)
def phenotype_table() -> tuple[tuple[str, str], ...]:
    """``((phecode, description), ...)`` in classifier-output order (1692 rows)."""
    text = resources.files(__package__).joinpath("data/phenotypes.csv").read_text("utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    if rows[0] != ["phecode", "phecode_str"] or len(rows) - 1 != N_PHENOTYPES:
        raise MedfmError("napari-medfm installation is damaged: phenotypes.csv is not the "
                         f"{N_PHENOTYPES}-row Merlin table")
    return tuple((r[0], r[1]) for r in rows[1:])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-x))


def top_phenotypes(logits: Any, k: int | None = 20) -> list[dict[str, Any]]:
    """The ``k`` most probable phenotypes (all when ``k`` is None), most probable first."""
    lg = np.asarray(logits, dtype=np.float64).reshape(-1)
    if lg.size != N_PHENOTYPES:
        raise ValueError(f"expected {N_PHENOTYPES} phenotype logits, got {lg.size}")
    probs = _sigmoid(lg)
    order = np.argsort(-lg, kind="stable")
    if k is not None:
        order = order[: max(0, int(k))]
    table = phenotype_table()
    return [{"index": int(i), "phecode": table[i][0], "name": table[i][1],
             "logit": float(lg[i]), "probability": float(probs[i])} for i in order]


@dataclass
class PromptSet:
    """Positive/negative phrasings per finding, and the softmax temperature."""

    findings: dict[str, tuple[list[str], list[str]]]
    temperature: float = 0.01
    source: str = DEFAULT_PROMPTS
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.findings)

    def phrases(self) -> list[str]:
        """Every distinct phrasing, in a stable order (for one batched text forward)."""
        seen: dict[str, None] = {}
        for pos, neg in self.findings.values():
            for p in (*pos, *neg):
                seen.setdefault(p, None)
        return list(seen)

    def subset(self, names: list[str]) -> PromptSet:
        missing = [n for n in names if n not in self.findings]
        if missing:
            raise MedfmError(f"unknown finding(s) {', '.join(missing)} in {self.source}; known: "
                             + ", ".join(self.findings))
        return PromptSet({n: self.findings[n] for n in names}, self.temperature, self.source)


def _as_list(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip()
                                                           for v in value):
        raise MedfmError(f"{where}: needs a non-empty list of phrasings")
    return [v.strip() for v in value]


def load_prompts(path: str | Path | None = None) -> PromptSet:
    """Read a prompt file (YAML or JSON); ``None`` = the packaged ``prompts.yaml``.

    Format: ``{temperature: 0.01, findings: {name: {positive: [...], negative: [...]}}}``.
    """
    import yaml

    if path is None:
        text = resources.files(__package__).joinpath(DEFAULT_PROMPTS).read_text("utf-8")
        source = DEFAULT_PROMPTS
    else:
        p = Path(path).expanduser()
        try:
            text = p.read_text("utf-8")
        except OSError as exc:
            raise MedfmError(f"cannot read prompt file {p}: {exc.strerror or exc}") from None
        source = p.name
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MedfmError(f"{source}: not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("findings"), dict) \
            or not data["findings"]:
        raise MedfmError(f"{source}: expected a mapping with a non-empty 'findings' section "
                         "({name: {positive: [...], negative: [...]}})")
    findings: dict[str, tuple[list[str], list[str]]] = {}
    for name, entry in data["findings"].items():
        where = f"{source}: finding {name!r}"
        if not isinstance(entry, dict):
            raise MedfmError(f"{where}: expected 'positive' and 'negative' lists")
        findings[str(name)] = (_as_list(entry.get("positive"), where + " positive"),
                               _as_list(entry.get("negative"), where + " negative"))
    try:
        temperature = float(data.get("temperature", 0.01))
    except (TypeError, ValueError):
        raise MedfmError(f"{source}: temperature must be a number") from None
    if not temperature > 0:
        raise MedfmError(f"{source}: temperature must be > 0, got {temperature}")
    return PromptSet(findings, temperature, source)
