"""Splitting a report's findings into anatomical sections (Merlin's optional text augmentation).

A section starts at a header: a line start or sentence start followed by an organ-like name
and a colon (``"LIVER: ..."``, ``"Kidneys and ureters: ..."``). Text before the first header is
kept as its own section. A report without headers is one section.
"""

from __future__ import annotations

import re

__all__ = ["split_sections", "choose_text"]

_HEADER = re.compile(r"(?:(?<=^)|(?<=[\n.;]))\s*([A-Za-z][A-Za-z /&,()-]{1,60}?)\s*:\s+")


def split_sections(report: str) -> list[str]:
    """``[section text with its header, ...]`` in report order (empty pieces dropped)."""
    text = str(report or "").strip()
    starts = [m.start(1) for m in _HEADER.finditer(text)]
    if not starts:
        return [text] if text else []
    cuts = ([0] if starts[0] > 0 else []) + starts + [len(text)]
    parts = [text[a:b].strip() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return [p for p in parts if p.strip(" .;\n")]


def choose_text(report: str, rng, enabled: bool, p_section: float = 0.5) -> str:
    """When ``enabled``: with probability ``p_section`` one section drawn by ``rng`` (the
    sample's own generator), else the full report - full reports and sections alternate at
    random, sample by sample."""
    if not enabled or rng.random() >= p_section:
        return report
    parts = split_sections(report)
    if len(parts) <= 1:
        return report
    return parts[int(rng.integers(len(parts)))]
