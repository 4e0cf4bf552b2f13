"""Thin Qt dock widgets. All work happens in the library core (``napari_medfm.tasks``).

Importing this package marks Triton unavailable in the (GUI) process: see
:func:`block_triton_in_gui`.
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
    """
    if os.environ.get("MEDFM_ALLOW_TRITON", "").lower() in ("1", "true", "yes", "on"):
        return
    if "triton" not in sys.modules:
        sys.modules["triton"] = None  # type: ignore[assignment]  # -> ImportError on import


block_triton_in_gui()
