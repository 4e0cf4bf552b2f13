"""Metrics to ``OUT/metrics.csv`` (rank 0) and TensorBoard (``OUT/tensorboard``, optional).

On a resume, rows after the resumed step are dropped first, so the CSV of an interrupted and
resumed run equals the CSV of an uninterrupted one (timing columns aside).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="") as fh:
        return list(csv.DictReader(fh))


class MetricsLogger:
    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.path = Path(out) / "metrics.csv"
        self.enabled = enabled
        self.fields: list[str] | None = None
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            rows = [r for r in read_metrics(self.path) if int(r["step"]) <= resume_step]
            fields = list(read_metrics(self.path)[0].keys()) if rows else None
            tmp = self.path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as fh:
                if fields:
                    w = csv.DictWriter(fh, fieldnames=fields)
                    w.writeheader()
                    w.writerows(rows)
            os.replace(tmp, self.path)
            self.fields = fields
        elif self.path.is_file():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tensorboard"),
                                        purge_step=(resume_step + 1) if resume_step else None)
            except Exception as exc:  # tensorboard not installed: CSV only
                log.info("TensorBoard off (%s)", exc)

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _fmt(v) for k, v in values.items()}}
        if self.fields is None:
            self.fields = list(row)
            new = True
        else:
            new = False
            for k in row:
                if k not in self.fields:  # a new column: rewrite the file with it
                    self.fields.append(k)
                    new = True
        if new:
            old = read_metrics(self.path)
            with open(self.path, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=self.fields, restval="")
                w.writeheader()
                w.writerows(old)
                w.writerow(row)
        else:
            with open(self.path, "a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=self.fields, restval="").writerow(row)
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def _fmt(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return repr(v)  # exact round trip
    return v
