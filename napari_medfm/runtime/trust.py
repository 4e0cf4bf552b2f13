"""Trust for MONAI bundles: running a bundle runs its config as Python.

A MONAI bundle's ``configs/*.json|yaml`` are evaluated by :class:`monai.bundle.ConfigParser`:
``_target_`` imports any class and ``$`` expressions are Python, and a bundle may ship its own
``scripts/*.py``. So a bundle folder is run only once the user has said they trust it:

* the **content hash** (:func:`bundle_hash`: sha256 over the bundle's configs and Python files,
  not its weights, which are loaded safely) is remembered per folder in
  ``<user config dir>/trusted_bundles.json`` (``$MEDFM_CONFIG`` overrides the folder);
* a folder whose configs changed since is untrusted again;
* the CLI refuses an untrusted bundle unless given ``--trust-bundle``; the Segmentation dock
  asks once with a dialog; :func:`require_trusted` is called right before the config is parsed,
  so the library refuses too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from ..errors import MedfmError
from ..io.files import atomic_write_json, sha256_file

__all__ = ["UntrustedBundleError", "bundle_hash", "is_trusted", "require_trusted",
           "trust_bundle", "trust_file", "untrust_bundle"]

log = logging.getLogger(__name__)
_LOCK = threading.Lock()

#: What can make a bundle run code: its configs and any Python it ships.
_CODE_SUFFIXES = (".json", ".yaml", ".yml", ".py")


class UntrustedBundleError(MedfmError):
    """A MONAI bundle folder has not been trusted (or changed since it was)."""


def trust_file() -> Path:
    from .paths import config_dir

    return config_dir() / "trusted_bundles.json"


def _code_files(folder: Path) -> list[Path]:
    files = [p for p in folder.rglob("*")
             if p.is_file() and p.suffix.lower() in _CODE_SUFFIXES
             and "models" not in p.relative_to(folder).parts[:1]]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def bundle_hash(folder: str | Path) -> str:
    """sha256 over the relative names and contents of the bundle's configs and Python files."""
    folder = Path(folder).expanduser().resolve()
    h = hashlib.sha256()
    for p in _code_files(folder):
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def _load() -> dict[str, Any]:
    f = trust_file()
    try:
        doc = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable bundle trust file %s (%s)", f, exc)
        return {}
    return doc.get("bundles", {}) if isinstance(doc, dict) else {}


def _key(folder: str | Path) -> str:
    return str(Path(folder).expanduser().resolve())


def is_trusted(folder: str | Path) -> bool:
    """True when the folder was trusted and its configs are unchanged since."""
    entry = _load().get(_key(folder))
    return bool(entry) and entry.get("sha256") == bundle_hash(folder)


def trust_bundle(folder: str | Path) -> str:
    """Remember the folder's current content hash as trusted; returns the hash."""
    digest = bundle_hash(folder)
    with _LOCK:
        bundles = _load()
        bundles[_key(folder)] = {"sha256": digest}
        atomic_write_json(trust_file(), {"format": "napari-medfm-trusted-bundles/1",
                                         "bundles": bundles}, indent=1, sort_keys=True)
    return digest


def untrust_bundle(folder: str | Path) -> None:
    with _LOCK:
        bundles = _load()
        if bundles.pop(_key(folder), None) is not None:
            atomic_write_json(trust_file(), {"format": "napari-medfm-trusted-bundles/1",
                                             "bundles": bundles}, indent=1, sort_keys=True)


def require_trusted(folder: str | Path) -> None:
    """Raise :class:`UntrustedBundleError` unless the folder is trusted (and unchanged)."""
    if is_trusted(folder):
        return
    was = _key(folder) in _load()
    raise UntrustedBundleError(
        f"{Path(folder).name}: MONAI bundle configs run Python code (`_target_` imports and `$` "
        f"expressions){' and its configs changed since you trusted it' if was else ''}. Run "
        "bundles only from sources you trust: confirm in the Segmentation dock, or pass "
        "--trust-bundle to `medfm segment` (remembered until the bundle's configs change).")
