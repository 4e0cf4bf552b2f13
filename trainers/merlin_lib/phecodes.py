"""Phecode expansion up the PheWAS hierarchy, and the 1692-column phenotype targets.

A positive phecode also makes its ancestors positive (parent of ``X.YZ`` is ``X.Y``, of ``X.Y`` is
``X``) as long as the code's ``Rollup`` flag in the Phecode Map 1.2 is 1; the walk stops at a
code whose flag is 0 (that code itself stays positive). Then only Merlin's 1692 output columns
(``napari_medfm/models/merlin/data/phenotypes.csv``) are kept. The hierarchy table and its
provenance: ``trainers/data/phecode_parents.csv`` / ``PROVENANCE.md``.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = ["N_OUTPUTS", "normalize", "rule_parent", "hierarchy", "expand", "targets", "output_codes",
           "parse_codes"]

TABLE = Path(__file__).resolve().parents[1] / "data" / "phecode_parents.csv"
#: Merlin's phenotype outputs.
N_OUTPUTS = 1692


def normalize(code: str) -> str:
    """``"008.50"`` -> ``"8.50"``; ``" 427.2 "`` -> ``"427.2"`` (leading zeros dropped)."""
    c = str(code).strip()
    ip, dot, fp = c.partition(".")
    if not ip.isdigit() or (dot and not fp.isdigit()):
        raise ValueError(f"not a phecode: {code!r}")
    return (ip.lstrip("0") or "0") + (f".{fp}" if fp else "")


def rule_parent(code: str) -> str | None:
    ip, _, fp = code.partition(".")
    if not fp:
        return None
    return ip + (f".{fp[:-1]}" if len(fp) > 1 else "")


@functools.lru_cache(maxsize=1)
def hierarchy() -> dict[str, tuple[str | None, bool]]:
    """``{phecode: (parent or None, rollup)}`` from the shipped table."""
    out: dict[str, tuple[str | None, bool]] = {}
    with open(TABLE, newline="") as fh:
        for r in csv.DictReader(fh):
            out[r["phecode"]] = (r["parent"] or None, r["rollup"] == "1")
    return out


@functools.lru_cache(maxsize=1)
def output_codes() -> tuple[str, ...]:
    from napari_medfm.models.merlin.phenotypes import phenotype_table

    return tuple(normalize(c) for c, _ in phenotype_table())


@functools.lru_cache(maxsize=1)
def _column() -> dict[str, int]:
    return {c: i for i, c in enumerate(output_codes())}


def expand(codes: Iterable[str]) -> set[str]:
    """The codes plus every ancestor they roll up to."""
    h = hierarchy()
    out: set[str] = set()
    for code in codes:
        c: str | None = normalize(code)
        while c is not None and c not in out:
            out.add(c)
            parent, rollup = h.get(c, (rule_parent(c), True))
            c = parent if rollup else None
    return out


def parse_codes(text: str) -> list[str]:
    """The manifest's ``phecodes`` cell: codes separated by ``;`` (may be empty)."""
    return [normalize(c) for c in str(text or "").split(";") if c.strip()]


def unknown_codes(codes: Iterable[str]) -> list[str]:
    """Codes neither in the hierarchy nor among the outputs (probably typos)."""
    h, col = hierarchy(), _column()
    return [c for c in codes if c not in h and c not in col]


def targets(codes: Iterable[str]) -> np.ndarray:
    """Float32 multi-hot vector over the 1692 outputs after expansion."""
    col = _column()
    y = np.zeros(len(col), dtype=np.float32)
    for c in expand(codes):
        i = col.get(c)
        if i is not None:
            y[i] = 1.0
    return y
