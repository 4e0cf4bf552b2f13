"""Progress protocol shared by the library, the CLI (tqdm) and the widgets (napari workers).

Long work is written as a generator that ``yield``s :class:`Progress` after each unit of work
(sliding-window batch, slice, file) and ``return``s its result. A napari generator worker
then advances its progress bar once per yield and stops promptly at the next yield when the
user cancels; the CLI drives the same generator with :func:`drain`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    message: str = ""
    #: optional partial result carried with the event (e.g. the text piece a report
    #: generator just produced), so a GUI can show work as it arrives
    data: Any = None

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.step / self.total)


TaskGen = Generator[Progress, None, T]


def drain(gen: Generator[Progress, None, T],
          callback: Callable[[Progress], Any] | None = None) -> T:
    """Run a task generator to completion, calling ``callback`` on each progress event."""
    while True:
        try:
            p = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(p)


def drain_with_tqdm(gen: Generator[Progress, None, T], desc: str = "",
                    disable: bool = False) -> T:
    """Run a task generator with a tqdm progress bar on stderr (CLI)."""
    from tqdm.auto import tqdm

    bar = None
    try:
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                return stop.value
            if bar is None:
                bar = tqdm(total=p.total, desc=desc, disable=disable, leave=False)
            if p.total != bar.total:
                bar.total = p.total
            bar.n = p.step
            if p.message:
                bar.set_postfix_str(p.message, refresh=False)
            bar.refresh()
    finally:
        if bar is not None:
            bar.close()
        gen.close()
