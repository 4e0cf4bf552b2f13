"""napari-medfm: medical-imaging foundation models in napari, with true physical geometry.

The library core (``io``, ``geometry``, ``runtime``, ``models``, ``tasks``) imports no Qt;
torch is imported lazily so that opening an image never pays for it.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "read"]


def read(path: Any, **kwargs: Any):
    """Read any supported file or folder into a list of :class:`~napari_medfm.io.types.MedicalImage`."""
    from .io import read as _read

    return _read(path, **kwargs)


def load_model(name: str, weights: Any = None, **kwargs: Any):
    """Build a registered model and load its weights (see ``medfm weights list``)."""
    from .runtime.registry import load_model as _load_model

    return _load_model(name, weights=weights, **kwargs)
