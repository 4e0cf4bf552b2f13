"""DICOM reader: CT/MR series, enhanced multi-frame images, 2D CR/DX/MG/SC/XA and friends.

``read(path)`` accepts a folder (every series inside, recursively), or one file (its whole
series from the same folder unless ``series_only=False``) and returns one
:class:`~napari_medfm.io.types.MedicalImage` per series (per geometry-consistent stack).

Decisions (see ``docs/dicom.md``):

* slices are sorted by their position along the slice normal (not by InstanceNumber);
* rescale slope/intercept is applied for every modality (HU for CT); the output is ``int16``
  when the result is integral and fits, else ``int32``, and ``float32`` for real slopes;
* MONOCHROME1 is inverted so it displays like MONOCHROME2 (``metadata['inverted']``);
* uneven slice spacing -> resampled onto an even grid (linear), with a warning;
* gantry tilt -> resampled onto an orthogonal grid with SimpleITK, with a warning;
* in a folder, files whose header cannot be parsed are skipped (listed in a warning); a series
  whose pixels cannot be decoded is left out (warning) and the other series are kept; if no
  series survives the first error is raised.

Whole-slide microscopy DICOM (SOP class VL WSI, modality SM) is left to ``io/wsi.py``
(:func:`is_wsi_dicom`); DICOM-SEG files are delegated to ``io/dicom_seg.read_dicom_seg``.
No patient identifier is ever put in names, metadata or log messages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MedfmError, ReadError, UnsupportedFormatError
from ..geometry import Geometry
from ..progress import Progress, drain
from ._sniff import sniff_errors
from .types import MedicalImage

__all__ = ["can_read", "read", "iter_read", "is_wsi_dicom", "is_dicom_file", "WSI_SOP_CLASS",
           "SEG_SOP_CLASS"]

log = logging.getLogger(__name__)

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

#: Modalities whose single slices are still treated as (one-slice) volumes.
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM_TOMO"}

_SKIP_NAMES = {"DICOMDIR", "LOCKFILE", "VERSION", ".DS_Store", "Thumbs.db"}
_MAX_SNIFF_FILES = 64


# ---------------------------------------------------------------------- sniffing
def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Cheap check: 'DICM' at byte 128, or a file without preamble/meta that starts with a
    group 0x0002/0x0008 element (explicit or implicit VR little endian), possibly after a few
    stray bytes (see :func:`._dicom_nometa.headerless_offset`)."""
    p = Path(path)
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    from ._dicom_nometa import headerless_offset  # no preamble/meta, maybe a few stray bytes

    return headerless_offset(head) is not None


def _candidate_files(folder: Path, limit: int | None = None) -> Iterable[Path]:
    count = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or name in _SKIP_NAMES:
                continue
            yield Path(root) / name
            count += 1
            if limit is not None and count >= limit:
                return


def _first_dicom(folder: Path) -> Path | None:
    for f in _candidate_files(folder, limit=_MAX_SNIFF_FILES):
        if is_dicom_file(f):
            return f
    return None


def _header(path: Path, **kw: Any) -> Any:
    import pydicom

    from ._dicom_nometa import complete_header

    ds = pydicom.dcmread(str(path), force=True, **kw)
    return complete_header(Path(path), ds, **kw)  # files without File Meta (group 0002)


def _sop_class(ds: Any) -> str:
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid:
        fm = getattr(ds, "file_meta", None)
        if fm is not None:
            uid = str(fm.get("MediaStorageSOPClassUID", "") or "")
    return uid


def is_wsi_dicom(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (a file, or a folder's first DICOM file) is DICOM whole-slide
    microscopy (VL Whole Slide Microscopy Image Storage), which ``io/wsi.py`` reads."""
    p = Path(path)
    f = _first_dicom(p) if p.is_dir() else p
    if f is None or not is_dicom_file(f):
        return False
    try:
        ds = _header(f, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except sniff_errors():  # garbled header; anything else is a bug: raise
        return False
    return _sop_class(ds) == WSI_SOP_CLASS


def can_read(path: Path) -> bool:
    """True for a DICOM file or a folder holding DICOM files (not whole-slide microscopy)."""
    p = Path(path)
    if p.is_dir():
        f = _first_dicom(p)
        return f is not None and not is_wsi_dicom(f)
    return is_dicom_file(p) and not is_wsi_dicom(p)


# ---------------------------------------------------------------------- header model
def _floats(v: Any, n: int | None = None) -> np.ndarray | None:
    """Numeric header value(s) as a float array (None when absent, malformed or non-finite)."""
    if v is None or v == "":
        return None
    values = [v] if isinstance(v, str | bytes | int | float) else list(v)
    try:
        arr = np.asarray([float(x) for x in values], dtype=float)
    except (TypeError, ValueError):
        return None
    if (n is not None and arr.size != n) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _first(v: Any) -> float | None:
    a = _floats(v)
    return None if a is None or a.size == 0 else float(a[0])


def _fg_item(ds: Any, frame_item: Any, seq: str) -> Any:
    """Functional group macro item ``seq`` for a frame: per-frame first, then shared."""
    for holder in (frame_item, _shared(ds)):
        if holder is not None and seq in holder and len(holder[seq].value) > 0:
            return holder[seq].value[0]
    return None


def _shared(ds: Any) -> Any:
    s = ds.get("SharedFunctionalGroupsSequence")
    return s[0] if s else None


@dataclass
class _Plane:
    """One 2D frame: where it lies and how to turn its stored values into real values."""

    path: Path
    ds: Any
    frame: int
    ipp: np.ndarray | None
    iop: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    thickness: float | None
    window: tuple[float, float] | None


@dataclass
class _Group:
    """Planes that form one image (one series, one consistent geometry)."""

    planes: list[_Plane]
    series_uid: str
    multiframe: bool = False
    warnings: list[str] = field(default_factory=list)


def _window_of(item: Any) -> tuple[float, float] | None:
    if item is None:
        return None
    c, w = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
    if c is None or w is None or w <= 0:
        return None
    return (c, w)


def _rescale_of(item: Any) -> tuple[float, float]:
    if item is None:
        return 1.0, 0.0
    s, i = _first(item.get("RescaleSlope")), _first(item.get("RescaleIntercept"))
    return (1.0 if s is None or s == 0 else s), (0.0 if i is None else i)


def _spacing_of(item: Any, *keys: str) -> tuple[float, float] | None:
    if item is None:
        return None
    for k in keys:
        a = _floats(item.get(k), 2)
        if a is not None:
            return float(a[0]), float(a[1])
    return None


def _planes_single(path: Path, ds: Any) -> list[_Plane]:
    s, i = _rescale_of(ds)
    return [
        _Plane(
            path=path,
            ds=ds,
            frame=0,
            ipp=_floats(ds.get("ImagePositionPatient"), 3),
            iop=_floats(ds.get("ImageOrientationPatient"), 6),
            pixel_spacing=_spacing_of(ds, "PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"),
            slope=s,
            intercept=i,
            thickness=_first(ds.get("SliceThickness")),
            window=_window_of(ds),
        )
    ]


def _planes_multiframe(path: Path, ds: Any) -> list[_Plane]:
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    per = ds.get("PerFrameFunctionalGroupsSequence")
    planes = []
    top_ipp = _floats(ds.get("ImagePositionPatient"), 3)
    top_iop = _floats(ds.get("ImageOrientationPatient"), 6)
    top_ps = _spacing_of(ds, "PixelSpacing", "ImagerPixelSpacing")
    top_s, top_i = _rescale_of(ds)
    for f in range(nframes):
        item = per[f] if per is not None and f < len(per) else None
        pos = _fg_item(ds, item, "PlanePositionSequence")
        ori = _fg_item(ds, item, "PlaneOrientationSequence")
        meas = _fg_item(ds, item, "PixelMeasuresSequence")
        pvt = _fg_item(ds, item, "PixelValueTransformationSequence")
        voi = _fg_item(ds, item, "FrameVOILUTSequence")
        ipp = _floats(pos.get("ImagePositionPatient"), 3) if pos is not None else None
        iop = _floats(ori.get("ImageOrientationPatient"), 6) if ori is not None else None
        s, i = _rescale_of(pvt) if pvt is not None else (top_s, top_i)
        planes.append(
            _Plane(
                path=path,
                ds=ds,
                frame=f,
                ipp=ipp if ipp is not None else (top_ipp if nframes == 1 else None),
                iop=iop if iop is not None else top_iop,
                pixel_spacing=_spacing_of(meas, "PixelSpacing") or top_ps,
                slope=s,
                intercept=i,
                thickness=_first(meas.get("SliceThickness")) if meas is not None else _first(ds.get("SliceThickness")),
                window=_window_of(voi) or _window_of(ds),
            )
        )
    return planes


# ---------------------------------------------------------------------- scanning
@dataclass
class _Scan:
    entries: list[tuple[Path, Any]] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def _scan(files: list[Path], strict: bool) -> Generator[Progress, None, _Scan]:
    scan = _Scan()
    total = len(files)
    for k, f in enumerate(files):
        try:
            ds = _header(f, defer_size=2048)
            if "SOPClassUID" not in ds and not getattr(ds, "file_meta", None) and "Rows" not in ds:
                raise ValueError("no DICOM header elements found")
        except Exception as exc:
            cause = " ".join(str(exc).split())[:200] or type(exc).__name__
            if strict:
                raise ReadError(f, f"not a readable DICOM file: {cause}") from None
            scan.unreadable.append((f, cause))
        else:
            scan.entries.append((f, ds))
        if k % 16 == 15 or k == total - 1:
            yield Progress(k + 1, total, "reading headers")
    return scan


def _iop_key(iop: np.ndarray | None) -> tuple:
    return () if iop is None else tuple(np.round(iop, 3).tolist())


def _split_duplicates(planes: list[_Plane]) -> tuple[list[list[_Plane]], list[str]]:
    """Split a stack whose slices share positions (several acquisitions/echoes/phases)."""
    if len(planes) < 2 or any(p.ipp is None or p.iop is None for p in planes):
        return [planes], []
    from ._dicom_geometry import orthonormal_iop

    n = orthonormal_iop(planes[0].iop)[2]
    d = np.round([float(p.ipp @ n) for p in planes], 3)
    if len(set(d.tolist())) == len(d):
        return [planes], []
    for key in ("AcquisitionNumber", "EchoNumbers", "TemporalPositionIdentifier", "TriggerTime",
                "SeriesTime", "ImageType"):
        groups: dict[Any, list[_Plane]] = {}
        for p in planes:
            v = p.ds.get(key)
            groups.setdefault(str(list(v) if isinstance(v, list | tuple) or (hasattr(v, "__iter__") and not isinstance(v, str)) else v), []).append(p)
        if len(groups) < 2:
            continue
        ok = all(
            len({round(float(p.ipp @ n), 3) for p in g}) == len(g) for g in groups.values()
        )
        if ok:
            return list(groups.values()), [f"series split into {len(groups)} stacks by {key}"]
    # cannot resolve: keep the first slice at each position
    seen: set[float] = set()
    keep = []
    for p, dist in zip(planes, d, strict=True):
        if float(dist) not in seen:
            seen.add(float(dist))
            keep.append(p)
    dropped = [p.path.name for p in planes if p not in keep]
    return [keep], [
        f"{len(dropped)} slice(s) at duplicate positions ignored: {', '.join(dropped[:5])}"
        + (" ..." if len(dropped) > 5 else "")
    ]


def _group(entries: list[tuple[Path, Any]]) -> tuple[list[_Group], list[tuple[Path, Any]], list[tuple[Path, str]]]:
    """Series groups, SEG files and skipped (non-image) files."""
    series: dict[tuple, list[_Plane]] = {}
    groups: list[_Group] = []
    segs: list[tuple[Path, Any]] = []
    skipped: list[tuple[Path, str]] = []
    for path, ds in entries:
        sop = _sop_class(ds)
        if sop == WSI_SOP_CLASS or str(ds.get("Modality", "")) == "SM" and int(ds.get("NumberOfFrames", 1) or 1) > 1 and "TotalPixelMatrixRows" in ds:
            skipped.append((path, "whole-slide microscopy (opened by the slide reader)"))
            continue
        if sop == SEG_SOP_CLASS or str(ds.get("Modality", "")) == "SEG":
            segs.append((path, ds))
            continue
        if sop == DICOMDIR_SOP_CLASS or "PixelData" not in ds and 0x7FE00010 not in ds._dict:
            skipped.append((path, "no pixel data (not an image object)"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"nouid:{path.parent}")
        nframes = int(ds.get("NumberOfFrames", 1) or 1)
        if nframes > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            groups.append(_Group(_planes_multiframe(path, ds), uid, multiframe=True))
            continue
        planes = _planes_single(path, ds)
        key = (uid, _iop_key(planes[0].iop), int(ds.get("Rows", 0)), int(ds.get("Columns", 0)),
               int(ds.get("SamplesPerPixel", 1)))
        series.setdefault(key, []).extend(planes)
    for key, planes in series.items():
        parts, warns = _split_duplicates(planes)
        for part in parts:
            groups.append(_Group(part, key[0], warnings=list(warns)))
    return groups, segs, skipped


# ---------------------------------------------------------------------- assembling
def _name(ds: Any, series_uid: str, suffix: str = "") -> str:
    num = str(ds.get("SeriesNumber", "") or "").strip()
    desc = str(ds.get("SeriesDescription", "") or "").strip()
    name = " ".join(x for x in (num, desc) if x)
    if not name:
        mod = str(ds.get("Modality", "") or "OT")
        name = f"{mod} {series_uid[-6:]}" if series_uid and not series_uid.startswith("nouid:") else mod
    return name + suffix


def _percentile_window(data: np.ndarray, rgb: bool) -> tuple[float, float] | None:
    if rgb or data.size == 0:
        return None
    sub = data
    if sub.ndim == 3:
        sub = sub[:: max(1, sub.shape[0] // 16)]
    step = max(1, int(np.sqrt(sub.size / 2e5)))
    sub = sub[..., ::step, ::step]
    lo, hi = np.percentile(sub, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1
    return (float(lo + hi) / 2.0, float(hi - lo))


def _assemble(group: _Group, source: Path, cancel_check: Any = None) -> Generator[Progress, None, MedicalImage]:
    from ._dicom_geometry import correct_tilt, resample_uniform, stack_geometry
    from ._dicom_pixels import FrameDecoder, output_dtype, pixel_format, rescale_into, ts_name

    planes = group.planes
    first = planes[0]
    ds0 = first.ds
    fmt = pixel_format(ds0, first.path)
    warnings = list(group.warnings)
    from ._dicom_nometa import note_of

    no_meta = note_of(ds0)
    if no_meta:
        warnings.append(no_meta)
    modality = str(ds0.get("Modality", "") or "OT").strip() or "OT"
    n = len(planes)
    spatial = all(p.ipp is not None and p.iop is not None for p in planes)
    ps = first.pixel_spacing
    if ps is None or ps[0] <= 0 or ps[1] <= 0:
        if ps is not None:
            warnings.append(f"degenerate pixel spacing {ps[0]:g}\\{ps[1]:g}: using 1.0 mm")
        elif modality not in ("US", "OT", "XC", "SC"):
            warnings.append("no pixel spacing in the header: using 1.0 mm")
        ps = (1.0, 1.0)
    is_2d = n == 1 and not group.multiframe and (modality not in VOLUME_MODALITIES or not spatial)
    is_2d = is_2d or (group.multiframe and n == 1)

    # ---- geometry and slice order
    sg = None
    fallback = _first(ds0.get("SpacingBetweenSlices")) or first.thickness or 1.0
    if fallback <= 0:
        fallback = 1.0
    if is_2d:
        order = np.array([0])
    elif spatial:
        sg = stack_geometry(np.stack([p.ipp for p in planes]), first.iop, ps, fallback)
        if sg.duplicates:
            warnings.append("frames share positions (not one spatial stack): kept in file order, "
                            f"slice spacing {fallback:g} mm")
            order = np.arange(n)
            r, c = first.iop[:3], first.iop[3:]
            sg = stack_geometry(first.ipp[None], np.concatenate([r, c]), ps, fallback)
        else:
            order = sg.order
    else:
        order = np.arange(n)
        what = "frames" if group.multiframe else "slices"
        warnings.append(f"{what} carry no position/orientation: stacked in file order with "
                        f"spacing {fallback:g} mm and identity orientation")

    # ---- pixels
    slopes = [p.slope for p in planes]
    intercepts = [p.intercept for p in planes]
    rescale = not fmt.is_color
    decoders: dict[Path, FrameDecoder] = {}

    def decoder(path: Path, ds: Any) -> FrameDecoder:
        if path not in decoders:
            decoders[path] = FrameDecoder(ds, path, pixel_format(ds, path))
        return decoders[path]

    rgb = fmt.is_color
    shape2 = (fmt.rows, fmt.cols) + ((3,) if rgb else ())
    out: np.ndarray | None = None
    if group.multiframe:
        dec = decoder(first.path, ds0)
        frame_ids = [planes[k].frame for k in order]
        it = dec.frames(frame_ids)
        for j, arr in enumerate(it):
            if out is None:
                dt = output_dtype(fmt, slopes, intercepts, rescale, dec.signed_fix is not None)
                out = np.empty((n,) + shape2, dtype=dt)
            p = planes[order[j]]
            out = rescale_into(out, j, arr, p.slope, p.intercept, rescale)
            if j % 8 == 7 or j == n - 1:
                yield Progress(j + 1, n, "decoding frames")
        dec.release()
    else:
        for j, k in enumerate(order):
            p = planes[k]
            dec = decoder(p.path, p.ds)
            f = dec.fmt
            if (f.rows, f.cols) != (fmt.rows, fmt.cols):
                raise ReadError(p.path, f"slice size {f.rows}x{f.cols} differs from the series' {fmt.rows}x{fmt.cols}")
            for arr in dec.frames([0]):
                if out is None:
                    dt = output_dtype(fmt, slopes, intercepts, rescale, dec.signed_fix is not None)
                    out = np.empty((len(order),) + shape2, dtype=dt)
                out = rescale_into(out, j, arr, p.slope, p.intercept, rescale)
            for w in f.warnings:
                if w not in warnings:
                    warnings.append(w)
            dec.release()
            del decoders[p.path]
            yield Progress(j + 1, len(order), "decoding slices")
    assert out is not None
    for d in decoders.values():
        for w in d.fmt.warnings:
            if w not in warnings:
                warnings.append(w)

    # ---- photometric
    inverted = False
    window = first.window
    if fmt.photometric == "MONOCHROME1":
        lo, hi = fmt.stored_range()
        ends = sorted((lo * first.slope + first.intercept, hi * first.slope + first.intercept))
        lo, hi = ends
        if out.dtype.kind in "iu":
            lo, hi = int(round(lo)), int(round(hi))
            info = np.iinfo(out.dtype)
            if info.min <= lo and hi <= info.max:
                # hi - v + lo stays inside [lo, hi]: compute in place without widening
                np.subtract(out.dtype.type(hi), out, out=out)
                np.add(out, out.dtype.type(lo), out=out)
            else:
                out = ((hi + lo) - out.astype(np.int64)).astype(out.dtype)
        else:
            out = ((hi + lo) - out).astype(np.float32)
        inverted = True
        if window is not None:
            window = (float(hi + lo - window[0]), window[1])

    # ---- geometry
    src_files = [str(planes[k].path) for k in order] if not group.multiframe else [str(first.path)]
    if is_2d:
        data = out[0]
        geom = Geometry((ps[1], ps[0]), (0.0, 0.0), np.eye(2))
        kind = "image2d"
    else:
        data = out
        kind = "volume"
        if spatial and sg is not None:
            geom = sg.geometry
            if not sg.duplicates and not sg.uniform and len(order) > 2:
                warnings.append(
                    f"non-uniform slice spacing ({sg.min_step:.3g}-{sg.max_step:.3g} mm): "
                    "resampled onto an even grid (linear interpolation)"
                )
                data, new_pos = resample_uniform(data, sg.positions)
                dz = float(new_pos[1] - new_pos[0])
                geom = Geometry((geom.spacing[0], geom.spacing[1], dz), geom.origin, geom.direction)
                src_files = []  # slices no longer map one-to-one to files
            if sg.tilt_degrees > 0:
                warnings.append(
                    f"gantry tilt of {sg.tilt_degrees:.2f} deg detected: volume resampled onto "
                    "an orthogonal grid (linear); voxels outside the scanned region are filled "
                    "with the minimum value"
                )
                data, geom = correct_tilt(data, geom, sg.shear_per_mm, float(np.min(data)))
                src_files = []
        else:
            geom = Geometry((ps[1], ps[0], fallback), tuple(first.ipp) if first.ipp is not None else (0.0, 0.0, 0.0), np.eye(3))

    if window is None:
        window = _percentile_window(data, rgb)
    units = None
    if rescale:
        rt = str(ds0.get("RescaleType", "") or "").strip()
        units = "HU" if modality == "CT" else (rt or None)
    md: dict[str, Any] = {
        "source_path": str(source),
        "source_files": src_files,
        "series_instance_uid": str(ds0.get("SeriesInstanceUID", "") or ""),
        "study_instance_uid": str(ds0.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": str(ds0.get("FrameOfReferenceUID", "") or ""),
        "sop_class_uid": _sop_class(ds0),
        "series_description": str(ds0.get("SeriesDescription", "") or ""),
        "series_number": int(ds0.SeriesNumber) if str(ds0.get("SeriesNumber", "") or "").strip().lstrip("-").isdigit() else None,
        "modality": modality,
        "transfer_syntax": ts_name(fmt.transfer_syntax),
        "photometric": fmt.photometric,
        "inverted": inverted,
        "slice_thickness": first.thickness,
        "slice_spacing": float(geom.spacing[2]) if kind == "volume" else None,
        "warnings": warnings,
    }
    if rescale:
        md["rescale"] = {"slope": float(first.slope), "intercept": float(first.intercept)}
        if len(set(slopes)) > 1 or len(set(intercepts)) > 1:
            md["rescale"]["per_slice"] = True
    if units:
        md["units"] = units
    if group.multiframe:
        md["number_of_frames"] = n
    if no_meta:
        md["file_meta"] = no_meta
    for w in warnings:
        log.warning("%s: %s", Path(first.path).name, w)
    return MedicalImage(
        data=data,
        geometry=geom,
        modality=modality,
        kind=kind,
        name=_name(ds0, group.series_uid),
        rgb=rgb,
        window=window,
        metadata=md,
    )


# ---------------------------------------------------------------------- public API
def _files_for(path: Path, series_only: bool) -> tuple[list[Path], bool]:
    """Files to scan and whether errors are fatal (single file)."""
    if path.is_dir():
        files = [f for f in _candidate_files(path) if is_dicom_file(f)]
        return files, False
    if not series_only:
        return [path], True
    siblings = [f for f in _candidate_files_flat(path.parent) if f != path and is_dicom_file(f)]
    return [path] + siblings, False


def _candidate_files_flat(folder: Path) -> list[Path]:
    try:
        return sorted(
            p for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name not in _SKIP_NAMES
        )
    except OSError:
        return []


def iter_read(path: str | os.PathLike[str], *, series_uid: str | None = None,
              series_only: bool = True) -> Generator[Progress, None, list[MedicalImage]]:
    """Generator version of :func:`read` (yields :class:`Progress` per file/slice; cancel by
    closing it). Returns the list of images."""
    p = Path(path)
    if not p.exists():
        raise UnsupportedFormatError(f"{p}: no such file or folder")
    files, _ = _files_for(p, series_only)
    if not files:
        raise UnsupportedFormatError(f"{p.name}: folder holds no DICOM files")
    single = p.is_file()
    scan = yield from _scan(files, strict=False)
    if single and not any(f == p for f, _ in scan.entries):
        cause = next((c for f, c in scan.unreadable if f == p), "unreadable")
        raise ReadError(p, f"not a readable DICOM file: {cause}")
    groups, segs, skipped = _group(scan.entries)
    if single:
        # the series of the given file only (whole series unless series_only=False)
        ds_p = next(ds for f, ds in scan.entries if f == p)
        uid = str(ds_p.get("SeriesInstanceUID", "") or f"nouid:{p.parent}")
        sop = _sop_class(ds_p)
        if sop == WSI_SOP_CLASS:
            raise UnsupportedFormatError(f"{p.name}: DICOM whole-slide microscopy; open it with the slide reader")
        why_not = next((r for f, r in skipped if f == p), None)
        if why_not is not None:
            raise ReadError(p, f"cannot be shown as an image: {why_not}")
        if series_uid is None:
            series_uid = uid
        if not series_only or int(ds_p.get("NumberOfFrames", 1) or 1) > 1:
            # one multi-frame file is a complete image object: never mix in its siblings
            groups = [g for g in groups if any(pl.path == p for pl in g.planes)]
        segs = [(f, ds) for f, ds in segs if f == p] if (sop == SEG_SOP_CLASS) else []
        if not groups and not segs:
            reason = next((r for f, r in skipped if f == p), "no image data")
            raise ReadError(p, f"cannot be shown as an image: {reason}")
    if series_uid is not None:
        groups = [g for g in groups if g.series_uid == series_uid]
        segs = [(f, ds) for f, ds in segs if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not groups and not segs:
            raise ReadError(p, f"no series with SeriesInstanceUID {series_uid}")

    images: list[MedicalImage] = []
    errors: list[MedfmError] = []
    common: list[str] = []
    if scan.unreadable and not single:
        names = ", ".join(f.name for f, _ in scan.unreadable[:10])
        more = " ..." if len(scan.unreadable) > 10 else ""
        common.append(f"{len(scan.unreadable)} file(s) skipped, not readable as DICOM: {names}{more}")
    no_pixels = [f for f, why in skipped if why.startswith("no pixel data")]
    if no_pixels and not single:
        names = ", ".join(f.name for f in no_pixels[:10])
        common.append(f"{len(no_pixels)} file(s) without image data skipped: {names}"
                      + (" ..." if len(no_pixels) > 10 else ""))
    # several stacks of one series get distinct names
    counts: dict[str, int] = {}
    for g in groups:
        counts[g.series_uid] = counts.get(g.series_uid, 0) + 1
    seen: dict[str, int] = {}
    for g in groups:
        try:
            img = yield from _assemble_tolerant(g, p, p if single else None)
        except MedfmError as exc:
            if single and len(groups) == 1:
                raise
            errors.append(exc)
            common.append(f"series {_name(g.planes[0].ds, g.series_uid)!r} left out: {exc}")
            continue
        if counts[g.series_uid] > 1:
            seen[g.series_uid] = seen.get(g.series_uid, 0) + 1
            img.name = f"{img.name} [{seen[g.series_uid]}]"
        images.append(img)
    for f, _ds in segs:
        try:
            images.append(_read_seg(f, _ds, images))
        except MedfmError as exc:
            if single:
                raise
            errors.append(exc)
            common.append(f"segmentation {f.name} left out: {exc}")
    if not images:
        if errors:
            raise errors[0]
        raise UnsupportedFormatError(
            f"{p.name}: no DICOM image we can show"
            + (f" ({skipped[0][0].name}: {skipped[0][1]})" if skipped else "")
        )
    for img in images:
        img.metadata.setdefault("warnings", [])
        img.metadata["warnings"] = common + list(img.metadata["warnings"])
    for w in common:
        log.warning("%s: %s", p.name, w)
    images.sort(key=lambda im: (im.metadata.get("series_number") is None, im.metadata.get("series_number") or 0, im.name))
    return images


def _assemble_tolerant(group: _Group, source: Path,
                       must_have: Path | None) -> Generator[Progress, None, MedicalImage]:
    """Assemble a group; a slice whose pixels cannot be decoded is dropped (with a warning)
    and the rest re-assembled, unless it is ``must_have`` or most of the series is bad."""
    dropped: list[str] = []
    planes = list(group.planes)
    while True:
        try:
            img = yield from _assemble(
                _Group(planes, group.series_uid, group.multiframe, list(group.warnings)), source
            )
        except ReadError as exc:
            bad = exc.path
            if (group.multiframe or bad is None or bad == must_have
                    or not any(pl.path == bad for pl in planes)
                    or len(dropped) + 1 > len(group.planes) // 2):
                raise
            planes = [pl for pl in planes if pl.path != bad]
            dropped.append(f"{bad.name} ({exc.cause})")
            continue
        if dropped:
            img.metadata["warnings"].insert(
                0, f"{len(dropped)} slice(s) skipped, pixel data unreadable: " + "; ".join(dropped)
            )
            log.warning("%s: %s", source.name, img.metadata["warnings"][0])
        return img


def _read_seg(path: Path, ds: Any, images: list[MedicalImage]) -> MedicalImage:
    """Delegate a DICOM-SEG file, using the referenced image series when it was read too."""
    try:
        from .dicom_seg import read_dicom_seg
    except ImportError as exc:
        raise ReadError(path, f"DICOM-SEG support is not available ({exc})") from None
    ref_uids = set()
    for item in ds.get("ReferencedSeriesSequence", []) or []:
        ref_uids.add(str(item.get("SeriesInstanceUID", "")))
    reference = next(
        (im for im in images if im.metadata.get("series_instance_uid") in ref_uids and im.kind == "volume"),
        None,
    )
    return read_dicom_seg(path, reference=reference)


def read(path: Path, **kw: Any) -> list[MedicalImage]:
    """Read DICOM ``path`` (file or folder) into one image per series.

    Keyword arguments: ``series_uid`` (pick one series), ``series_only`` (default True: a file
    of a multi-file series reads its whole series; False reads that file only).
    """
    return drain(iter_read(path, **kw))
