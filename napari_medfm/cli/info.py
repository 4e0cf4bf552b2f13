"""``medfm info``: versions, Qt binding, devices and their memory, weights directory."""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import platform
from typing import Any

_PACKAGES = (
    "napari-medfm", "napari", "npe2", "magicgui", "torch", "torchvision", "monai", "SimpleITK",
    "pydicom", "highdicom", "transformers", "timm", "faiss-cpu", "numpy", "vispy",
    "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls", "tifffile",
    "imagecodecs", "openslide-python",
)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def qt_binding() -> str:
    try:
        import qtpy

        return f"{qtpy.API_NAME} (Qt {qtpy.QT_VERSION})"
    except Exception as exc:  # no binding installed
        return f"none ({type(exc).__name__}: {exc})"


def devices() -> list[dict[str, Any]]:
    """Compute devices torch can see, with memory in GiB (the runtime's one description)."""
    from ..runtime.device import describe_devices

    return describe_devices()


def collect() -> dict[str, Any]:
    from ..runtime.paths import data_dir, weights_dir

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "qt": qt_binding(),
        "devices": devices(),
        "weights_dir": str(weights_dir()),
        "data_dir": str(data_dir()),
    }
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"napari-medfm {info['packages']['napari-medfm']}  (python {info['python']}, {info['platform']})")
    print("packages:")
    for k, v in info["packages"].items():
        print(f"  {k:<20} {v or '-- not installed'}")
    print(f"qt binding: {info['qt']}")
    if "torch_cuda" in info:
        print(f"torch CUDA build: {info['torch_cuda'] or 'none (CPU build)'}; threads {info['torch_threads']}")
    print("devices:")
    for d in info["devices"]:
        extra = f", {d['available_gib']} GiB free" if "available_gib" in d else ""
        mem = f"{d['memory_gib']} GiB" if "memory_gib" in d else "?"
        print(f"  {d['device']:<8} {d.get('name', '')}  {mem}{extra}")
    if not any(d["device"] != "cpu" for d in info["devices"]):
        print("  (no GPU found: models run on the CPU; check `nvidia-smi` and that torch is a CUDA build)")
    print(f"weights dir: {info['weights_dir']}  (set $MEDFM_HOME to move it)")
    print(f"data dir:    {info['data_dir']}")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="versions, Qt binding, devices and weights directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)
