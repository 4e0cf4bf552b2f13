"""Where napari-medfm keeps weights, downloaded sample data and user settings (no network here)."""

from __future__ import annotations

import os
from pathlib import Path


def medfm_home() -> Path:
    """Root folder for weights and caches: ``$MEDFM_HOME`` or the user cache dir."""
    env = os.environ.get("MEDFM_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-medfm", appauthor=False))


def weights_dir() -> Path:
    """Folder holding one sub-folder per model, laid out like its hub repository."""
    return medfm_home() / "weights"


def data_dir() -> Path:
    """Folder for sample data downloaded on demand (checksummed)."""
    return medfm_home() / "data"


def config_dir() -> Path:
    """User settings (e.g. trusted MONAI bundles): ``$MEDFM_CONFIG`` or the user config dir."""
    env = os.environ.get("MEDFM_CONFIG")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-medfm", appauthor=False))
