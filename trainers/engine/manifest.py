"""Manifest (CSV) reading and validation before any training starts.

A manifest is a CSV file with a header; paths are relative to the manifest's folder unless
absolute. Validation collects every problem (missing columns, missing files, unreadable images,
recipe-specific checks) and fails with one :class:`ManifestError` naming the rows (1-based CSV
line numbers, header = line 1) - nothing has been written at that point.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from napari_medfm.errors import MedfmError

__all__ = ["ManifestError", "Row", "read_manifest", "validate_manifest", "image_readable"]


class ManifestError(MedfmError):
    """A manifest that cannot be trained on; the message names the rows."""


@dataclass
class Row:
    line: int                     # CSV line number (header = 1)
    values: dict[str, str]
    base: Path = field(repr=False, default=Path("."))

    def __getitem__(self, key: str) -> str:
        return self.values.get(key, "") or ""

    def path(self, key: str) -> Path:
        p = Path(self[key]).expanduser()
        return p if p.is_absolute() else self.base / p


def read_manifest(path: str | Path, required: Sequence[str], optional: Sequence[str] = ()
                  ) -> list[Row]:
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"manifest {p} does not exist")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in cols]
        if missing:
            raise ManifestError(
                f"manifest {p.name}: missing column(s) {', '.join(missing)} (has: "
                f"{', '.join(cols) or 'no header'}; needs {', '.join(required)}"
                + (f", optional {', '.join(optional)}" if optional else "") + ")")
        rows = []
        for i, rec in enumerate(reader, start=2):
            vals = {(k or "").strip(): (v or "").strip() for k, v in rec.items() if k is not None}
            if None in rec:
                raise ManifestError(f"manifest {p.name}: row {i} has more fields than the header")
            rows.append(Row(line=i, values=vals, base=p.parent))
    if not rows:
        raise ManifestError(f"manifest {p.name} has no rows")
    return rows


def image_readable(path: Path) -> str | None:
    """None when ``path`` opens as an image with the plugin's readers, else the reason."""
    from napari_medfm import io

    if not path.exists():
        return f"file not found: {path}"
    try:
        imgs = io.read(path)
    except Exception as exc:
        return f"unreadable image {path.name}: {exc}".splitlines()[0][:300]
    if not imgs:
        return f"no image in {path.name}"
    return None


def validate_manifest(path: str | Path, required: Sequence[str], optional: Sequence[str] = (),
                      check_row: Callable[[Row], list[str]] | None = None,
                      split: str | None = "train") -> list[Row]:
    """Read and check every row; returns the rows of ``split`` (all when the column is absent
    or empty). Raises :class:`ManifestError` listing up to 20 bad rows."""
    rows = read_manifest(path, required, optional)
    problems: list[str] = []
    for r in rows:
        for msg in (check_row(r) if check_row else []):
            problems.append(f"row {r.line}: {msg}")
    if problems:
        more = f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""
        raise ManifestError(f"manifest {Path(path).name}: {len(problems)} problem(s)" + more
                            + ":\n  " + "\n  ".join(problems[:20]))
    if split is not None:
        chosen = [r for r in rows if r["split"] in ("", split)]
        if not chosen:
            raise ManifestError(f"manifest {Path(path).name}: no row with split={split!r}")
        rows = chosen
    return rows


def manifest_sha256(path: str | Path) -> str:
    from napari_medfm.runtime.weights import sha256_file

    return sha256_file(path)


def describe_rows(rows: Sequence[Row]) -> dict[str, Any]:
    return {"rows": len(rows)}
