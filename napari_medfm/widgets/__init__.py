"""Thin Qt dock widgets. All work happens in the library core (``napari_medfm.tasks``).

Importing this package changes no process state. :func:`block_triton_in_gui` is called where a
napari GUI process is about to run torch work: when a dock starts a task
(:func:`napari_medfm.widgets._common.start_task`), by the ``medfm demo``/``medfm open`` windows
and by the test suite's conftest.
"""

from __future__ import annotations

import os
import sys


def block_triton_in_gui() -> None:
    """Keep Triton from loading inside the napari process (opt out: ``MEDFM_ALLOW_TRITON=1``).

    Triton's native library bundles its own LLVM; loading it after Mesa's OpenGL driver (which
    also uses LLVM: llvmpipe under Xvfb/VMs, radeonsi on AMD) segfaults the whole process. torch
    pulls it in lazily through ``torch._dynamo`` (torchvision.ops, MONAI's component scan). The
    widgets never use ``torch.compile``, so Triton is marked unavailable before any such import.
    Call it only in a process that shows a napari window.
    """
    if os.environ.get("MEDFM_ALLOW_TRITON", "").lower() in ("1", "true", "yes", "on"):
        return
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # -> ImportError on import
