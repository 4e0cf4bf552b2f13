"""Moved to :mod:`napari_medfm.runtime.sliding_window` (inferers live in the runtime layer).

This alias keeps ``from napari_medfm.tasks.sliding_window import ...`` working.
"""

from ..runtime.sliding_window import (  # noqa: F401
    PRECISIONS,
    OutOfMemoryError,
    scan_interval,
    sliding_window_gen,
    window_count,
)
