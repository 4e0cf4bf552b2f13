"""``medfm open PATH...``: open files/folders in napari with the MedFM reader.

``--info`` prints what would be opened (series, shape, spacing, orientation, modality) without
a GUI; it prints no patient identifiers (only geometry and technical header facts).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import MedfmError, UnsupportedFormatError

#: Metadata keys safe to print (technical facts; never names, IDs or dates).
_SAFE_KEYS = ("series_description", "series_number", "transfer_syntax", "units",
              "photometric", "slice_thickness", "slice_spacing")


def describe(img: Any) -> dict[str, Any]:
    """JSON-friendly summary of a :class:`MedicalImage` (no patient identifiers)."""
    g = img.geometry
    base = img.data[0] if img.multiscale else img.data
    out: dict[str, Any] = {
        "name": img.name,
        "kind": img.kind,
        "modality": img.modality,
        "labels": bool(img.is_label),
        "shape": list(img.shape),
        "dtype": str(getattr(base, "dtype", "?")),
        "spacing_xyz_mm": [round(s, 6) for s in g.spacing],
        "origin_lps_mm": [round(o, 4) for o in g.origin],
        "orientation": g.orientation,
    }
    if g.ndim == 3 and not g.is_axis_aligned:
        out["oblique_degrees"] = round(g.obliquity_degrees, 2)
    if img.multiscale:
        out["levels"] = [list(level.shape) for level in img.data]
    if img.window is not None:
        out["window_center_width"] = list(img.window)
    md = img.metadata or {}
    for key in _SAFE_KEYS:
        if md.get(key) not in (None, ""):
            out[key] = md[key]
    if md.get("source_files"):
        out["files"] = len(md["source_files"])
    if md.get("label_names"):
        out["label_count"] = len(md["label_names"])
    if md.get("warnings"):
        out["warnings"] = list(md["warnings"])
    return out


def _fmt(values: list[float], unit: str = "") -> str:
    return " x ".join(f"{v:g}" for v in values) + unit


def print_info(paths: list[Path], as_json: bool = False) -> int:
    from ..io import read

    report = []
    for p in paths:
        images = read(p)
        report.append({"path": str(p), "images": [describe(img) for img in images]})
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    for entry in report:
        n = len(entry["images"])
        print(f"{entry['path']}: {n} image{'s' if n != 1 else ''}")
        for i, d in enumerate(entry["images"], 1):
            kind = "labels" if d["labels"] else d["kind"]
            print(f"  [{i}] {d['name']}  ({d['modality']}, {kind})")
            print(f"      shape {_fmt(d['shape'])} (numpy order) {d['dtype']}")
            print(f"      spacing {_fmt(d['spacing_xyz_mm'], ' mm')} (x, y[, z]); "
                  f"orientation {d['orientation']}; origin {_fmt(d['origin_lps_mm'], ' mm')} (LPS)")
            if "oblique_degrees" in d:
                print(f"      oblique: {d['oblique_degrees']:g} deg from the patient axes")
            if "levels" in d:
                print(f"      pyramid levels: {len(d['levels'])}")
            if "window_center_width" in d:
                c, w = d["window_center_width"]
                print(f"      default window: L {c:g} / W {w:g}")
            for key in _SAFE_KEYS:
                if key in d:
                    print(f"      {key.replace('_', ' ')}: {d[key]}")
            if "files" in d:
                print(f"      files: {d['files']}")
            for w in d.get("warnings", []):
                print(f"      warning: {w}")
    return 0


def _medfm_error_in(exc: BaseException) -> MedfmError | None:
    """The MedfmError napari wrapped (ReaderPluginError keeps it as cause/original_error)."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MedfmError):
            return cur
        seen.add(id(cur))
        cur = getattr(cur, "original_error", None) or cur.__cause__ or cur.__context__
    return None


def open_in_viewer(viewer: Any, paths: list[Path], window: str | None = None) -> list[Any]:
    """``viewer.open(path, plugin='napari-medfm')`` for each path; MedfmErrors come out unwrapped."""
    layers: list[Any] = []
    for p in paths:
        try:
            layers.extend(viewer.open(str(p), plugin="napari-medfm"))
        except Exception as exc:
            inner = _medfm_error_in(exc)
            if inner is not None:
                raise inner from exc
            raise
    if window:
        from .demo import apply_window_to_images

        apply_window_to_images(layers, window)
    return layers


def run(args: argparse.Namespace) -> int:
    from .._napari.reader import napari_get_reader

    paths = [Path(p).expanduser() for p in args.paths]
    for p in paths:
        if not p.exists():
            raise UnsupportedFormatError(f"{p}: no such file or folder")
    if args.window:
        from ..windowing import preset_names

        if args.window not in preset_names():
            raise MedfmError(f"unknown window preset {args.window!r}; choose one of "
                             f"{', '.join(preset_names())}")
    if args.info:
        return print_info(paths, as_json=args.json)
    for p in paths:  # cheap sniff before starting a GUI
        if napari_get_reader(str(p)) is None:
            raise UnsupportedFormatError(
                f"{p.name}: not a medical image napari-medfm reads (DICOM, NIfTI, NRRD, "
                "MHA/MHD, PNG/JPEG, TIFF/SVS/OME-TIFF)")

    from .demo import dock_all_widgets, require_display, show_viewer

    require_display("open")

    def setup(viewer: Any) -> None:
        open_in_viewer(viewer, paths, args.window)
        if args.widgets:
            dock_all_widgets(viewer)

    return show_viewer("napari-medfm", setup, args)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "open",
        help="open medical images in napari (or --info: describe them without a GUI)",
        description="Open DICOM folders/files, NIfTI, NRRD, MHA, X-ray/fundus images and whole "
                    "slides in napari with true physical geometry.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    p.add_argument("--info", action="store_true",
                   help="print series, shape, spacing, orientation and modality; no GUI")
    p.add_argument("--json", action="store_true", help="with --info: machine-readable output")
    p.add_argument("--window", metavar="PRESET",
                   help="window preset: soft_tissue, lung, bone, brain, liver, mediastinum, "
                        "header, auto")
    p.add_argument("--widgets", action="store_true", help="also dock every MedFM widget")
    p.add_argument("--screenshot", metavar="PNG", help="save a PNG of the window and exit")
    p.add_argument("--quit-after", type=float, metavar="SECONDS",
                   help="close the window after SECONDS")
    p.set_defaults(func=run)
