"""DICOM Segmentation (SEG) objects: write label maps over a DICOM series, read SEGs back.

Both directions go through **highdicom** (``hd.seg.Segmentation`` / ``hd.seg.segread``); this
module adds the checks and conventions napari-medfm needs:

Writing (:func:`write_dicom_seg`)
    * Labels must lie on the grid of the source files (index ``k`` of axis 0 <-> ``source_files[k]``,
      or frame ``k`` of one multi-frame enhanced file); otherwise :class:`GeometryError`.
    * One segment per label value present, numbered 1..N in ascending label value. The label
      value itself is kept in the standard Segment Description (0062,0006) as
      ``"label value <v>"`` so :func:`read_dicom_seg` returns the same values (TotalSegmentator's
      117 classes keep their numbers).
    * Segment label = ``label_names[v]`` (else ``"Label <v>"``); recommended display CIELab from
      ``label_colors[v]``; Segmented Property Category/Type: the SNOMED CT code of pydicom's code
      dictionary when the name is a known structure (``"liver"`` -> SCT 10200004 Liver,
      laterality words such as ``kidney_left`` are dropped for the type code; category
      *Anatomical Structure* 91723000, or *Morphologically Altered Structure* 49755003 for
      tumour/lesion/mass), else the generic *Tissue* (SCT 85756007) for both.
    * Algorithm type AUTOMATIC with name and version when ``algorithm`` is given
      (``"name@version"``; without ``@`` the napari-medfm version is used), else MANUAL.
    * BINARY, empty frames omitted, Explicit VR Little Endian (``compress=True``: JPEG 2000
      lossless frames, much smaller, less widely supported). Patient/study attributes are
      copied from the sources by highdicom (PACS needs them) and are never logged here.
    * Sources whose SOP Class UID (0008,0016) is empty get it from the file meta
      MediaStorageSOPClassUID (in memory only).

Reading (:func:`read_dicom_seg`)
    * With ``reference`` (the image our DICOM reader returned for the referenced series), the
      segments are placed onto exactly its voxels: the SEG's own plane positions/orientation
      (highdicom ``get_volume``) are mapped to the reference grid, which must be the same grid
      up to integer offsets and axis flips (so cropped SEGs such as a 510x510 one land
      correctly); a different Frame of Reference is a :class:`GeometryError`.
    * Without ``reference`` the volume and geometry come from the SEG alone; slices are ordered
      along the right-handed normal of the image plane (as SimpleITK orders a series).
    * Overlapping segments: the later segment (higher segment number) wins; the number of
      overlapping voxels is reported in ``metadata['warnings']`` and as a ``UserWarning``.
      FRACTIONAL segments are thresholded at 0.5.
    * Encodings pydicom 3.0.2 cannot decode are handled here: RLE Lossless with 1-bit frames
      (decoded with pylibjpeg-rle, then bit-unpacked), Deflated Image Frame Compression
      (1.2.840.10008.1.2.8.1, each frame raw-deflated: zlib) and Explicit VR Big Endian
      (which highdicom refuses): the frames are decoded and handed to highdicom as a native
      little-endian dataset. Anything else fails with a :class:`ReadError` naming file and cause.

No Qt, napari or torch imports here.
"""

from __future__ import annotations

import logging
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import present_values
from ..errors import GeometryError, ReadError
from ..geometry import Geometry
from .types import MedicalImage
from .writers import (
    WriteError,
    _check_labels,
    _norm_color,
    atomic_write,
    label_dtype,
)

__all__ = ["read_dicom_seg", "write_dicom_seg", "segment_codes", "SEG_SOP_CLASS_UID"]

log = logging.getLogger(__name__)

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_RLE = "1.2.840.10008.1.2.5"
_DEFLATED_FRAMES = "1.2.840.10008.1.2.8.1"
_LABEL_VALUE_RE = re.compile(r"\blabel value (\d+)\b", re.IGNORECASE)
_LATERALITY = {"left", "right", "l", "r", "lt", "rt"}
_ALTERED = {"tumor", "tumour", "lesion", "mass", "neoplasm", "cyst", "nodule"}


# ---------------------------------------------------------------------------- coding
def _camel(words: Sequence[str]) -> str:
    return "".join(w[:1].upper() + w[1:].lower() for w in words if w)


def segment_codes(name: str | None) -> tuple[Any, Any]:
    """(SegmentedPropertyCategory, SegmentedPropertyType) codes for a structure name.

    Known names (pydicom's SNOMED CT dictionary, e.g. ``"Liver"``, ``"kidney_left"``,
    ``"portal vein"``) give their SCT code with category *Anatomical Structure* (or
    *Morphologically Altered Structure* for tumour/lesion/mass); anything else gets the generic
    *Tissue* code for both.
    """
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    sct = codes.SCT
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name or "") if w]
    candidates = [words, [w for w in words if w.lower() not in _LATERALITY]]
    for cand in candidates:
        if not cand:
            continue
        attr = _camel(cand)
        if attr == "Tumour":
            attr = "Tumor"
        code = getattr(sct, attr, None) if attr.isidentifier() else None
        if code is not None:
            altered = any(w.lower() in _ALTERED for w in cand)
            category = (Code("49755003", "SCT", "Morphologically Altered Structure") if altered
                        else sct.AnatomicalStructure)
            return category, code
    return sct.Tissue, sct.Tissue


def _algorithm_identification(algorithm: str) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from .. import __version__

    name, _, version = algorithm.partition("@")
    return hd.AlgorithmIdentificationSequence(
        name=name.strip() or "napari-medfm",
        family=codes.cid7162.ArtificialIntelligence,
        version=version.strip() or f"napari-medfm {__version__}",
    )


# ---------------------------------------------------------------------------- sources
def _read_source(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise WriteError(path, "source file does not exist")
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except InvalidDicomError as exc:
        raise WriteError(path, f"source is not a DICOM file ({exc})") from exc
    except Exception as exc:  # truncated/garbled headers
        raise WriteError(path, f"source DICOM header could not be read ({exc})") from exc
    if not str(ds.get("SOPClassUID", "") or ""):
        meta_class = str(getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "") or "")
        if not meta_class:
            raise WriteError(path, "source has neither SOPClassUID nor MediaStorageSOPClassUID")
        ds.SOPClassUID = meta_class  # in memory only: highdicom needs it
    if not str(ds.get("SOPInstanceUID", "") or ""):
        meta_uid = str(getattr(ds.get("file_meta", None), "MediaStorageSOPInstanceUID", "") or "")
        if meta_uid:
            ds.SOPInstanceUID = meta_uid  # same value by definition (PS3.10)
    if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
        del ds.SpecificCharacterSet  # empty = default repertoire; highdicom rejects ''
    for key in ("Rows", "Columns", "SOPInstanceUID"):
        if not ds.get(key):
            raise WriteError(path, f"source DICOM lacks {key}: not an image of a series")
    return ds


def _repair_series_uids(datasets: list[Any]) -> list[str]:
    """Fill empty Study/Series Instance UIDs (in memory) with UIDs derived from the sources.

    Some exported series (e.g. the TotalSegmentator test series) blank these UIDs; a SEG
    must reference a series, so a deterministic UID is derived from the sources' SOP Instance
    UIDs (the same sources always give the same UID). Returns user-facing notes.
    """
    from pydicom.uid import generate_uid

    notes = []
    sops = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if all(str(ds.get(key, "") or "") for ds in datasets):
            continue
        present = {str(ds.get(key, "") or "") for ds in datasets} - {""}
        uid = next(iter(present)) if len(present) == 1 else generate_uid(
            entropy_srcs=[key, *sops])
        for ds in datasets:
            if not str(ds.get(key, "") or ""):
                setattr(ds, key, uid)
        notes.append(f"source files have no {key}; the segmentation uses {uid}")
    return notes


def _frame_planes(ds: Any, path: Path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(position, orientation(6), pixel spacing(2)) of every frame of one source dataset."""

    def _get(item: Any, seq: str, attr: str) -> Any:
        if item is None or seq not in item or not item[seq].value:
            return None
        return item[seq].value[0].get(attr)

    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if any(ds.get(k) is None for k in ("ImagePositionPatient", "ImageOrientationPatient",
                                             "PixelSpacing")):
            raise GeometryError(f"{path.name}: source image has no position/orientation/spacing "
                                "(not a cross-sectional slice)")
        plane = (np.asarray(ds.ImagePositionPatient, float), np.asarray(ds.ImageOrientationPatient, float),
                 np.asarray(ds.PixelSpacing, float))
        return [plane] * nframes
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    out = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        pos = _get(item, "PlanePositionSequence", "ImagePositionPatient") or _get(
            shared, "PlanePositionSequence", "ImagePositionPatient")
        iop = _get(item, "PlaneOrientationSequence", "ImageOrientationPatient") or _get(
            shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        sp = _get(item, "PixelMeasuresSequence", "PixelSpacing") or _get(
            shared, "PixelMeasuresSequence", "PixelSpacing")
        if pos is None or iop is None or sp is None:
            raise GeometryError(f"{path.name}: a frame has no plane position/orientation/spacing")
        out.append((np.asarray(pos, float), np.asarray(iop, float), np.asarray(sp, float)))
    return out


def _promote_2d(
    arr: np.ndarray, geometry: Geometry, datasets: list[Any], files: list[Path]
) -> tuple[np.ndarray, Geometry]:
    """A (y, x) label slice over one single-frame source -> (1, y, x) on the source's plane."""
    if len(datasets) != 1 or int(datasets[0].get("NumberOfFrames", 1) or 1) != 1:
        raise GeometryError(
            f"2D labels {arr.shape} need exactly one single-frame source image, got "
            f"{len(files)} file(s)"
        )
    pos, iop, sp = _frame_planes(datasets[0], files[0])[0]
    if not np.allclose([sp[1], sp[0]], geometry.spacing[:2], rtol=1e-3, atol=1e-4):
        raise GeometryError(
            f"{files[0].name}: pixel spacing {sp.tolist()} (row, column) differs from the "
            f"labels' spacing {list(geometry.spacing)} (x, y)"
        )
    normal = np.cross(iop[:3], iop[3:])
    direction = np.stack([iop[:3], iop[3:], normal / np.linalg.norm(normal)], axis=1)
    return arr[None], Geometry((sp[1], sp[0], 1.0), tuple(pos), direction)


def _check_source_grid(
    labels_shape: tuple[int, ...], geometry: Geometry, datasets: list[Any], files: list[Path]
) -> list[int]:
    """Check that ``labels``/``geometry`` are the grid of the sources; return the slice of each frame.

    Single-frame sources map strictly: frame ``k`` (``source_files[k]``) is slice ``k``.
    Multi-frame sources (whose frames our reader sorts by position) map each frame to the
    slice at its plane position. Raises :class:`GeometryError` on any mismatch.
    """
    planes: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    plane_file: list[Path] = []
    multiframe = False
    for ds, f in zip(datasets, files, strict=True):
        fp = _frame_planes(ds, f)
        multiframe = multiframe or int(ds.get("NumberOfFrames", 1) or 1) > 1
        planes.extend(fp)
        plane_file.extend([f] * len(fp))
        if (int(ds.Rows), int(ds.Columns)) != tuple(labels_shape[1:]):
            raise GeometryError(
                f"{f.name}: source frames are {int(ds.Rows)}x{int(ds.Columns)} (rows x columns) "
                f"but the labels are {labels_shape[1]}x{labels_shape[2]}"
            )
    if len(planes) != labels_shape[0]:
        raise GeometryError(
            f"labels have {labels_shape[0]} slices but the {len(files)} source file(s) hold "
            f"{len(planes)} frame(s); index k of axis 0 must be source frame k"
        )
    d = geometry.direction
    tol_mm = max(1e-3, 0.1 * min(geometry.spacing))
    order: list[int] = []
    for k, (pos, iop, sp) in enumerate(planes):
        name = plane_file[k].name
        if not (np.allclose(iop[:3], d[:, 0], atol=1e-3) and np.allclose(iop[3:], d[:, 1], atol=1e-3)):
            raise GeometryError(
                f"{name}: image orientation {np.round(iop, 4).tolist()} differs from the labels' "
                f"direction (x {np.round(d[:, 0], 4).tolist()}, y {np.round(d[:, 1], 4).tolist()})"
            )
        if not np.allclose([sp[1], sp[0]], geometry.spacing[:2], rtol=1e-3, atol=1e-4):
            raise GeometryError(
                f"{name}: pixel spacing {sp.tolist()} (row, column) differs from the labels' "
                f"spacing {list(geometry.spacing[:2])} (x, y)"
            )
        slice_k = k
        if multiframe:
            slice_k = int(np.round(geometry.physical_to_index(pos)[2]))
        expected = geometry.index_to_physical([0.0, 0.0, float(slice_k)])
        if not 0 <= slice_k < labels_shape[0] or np.max(np.abs(expected - pos)) > tol_mm:
            where = f"frame {k + 1}" if multiframe else f"slice {k} of the labels"
            raise GeometryError(
                f"{name}: {where} should be at {np.round(expected, 3).tolist()} mm but this "
                f"source frame is at {np.round(pos, 3).tolist()} mm: labels are not on the "
                "source grid (wrong order, spacing or series?)"
            )
        order.append(slice_k)
    if sorted(order) != list(range(labels_shape[0])):
        raise GeometryError("several source frames fall on the same slice of the labels")
    return order


# ---------------------------------------------------------------------------- write
def write_dicom_seg(
    path: str | Path,
    labels: np.ndarray,
    geometry: Geometry,
    source_files: list[str | Path],
    *,
    label_names: dict[int, str] | None = None,
    label_colors: dict[int, tuple[int, int, int]] | None = None,
    algorithm: str | None = None,
    series_description: str = "napari-medfm segmentation",
    compress: bool = False,
) -> Path:
    """Write ``labels`` as a BINARY DICOM-SEG referencing ``source_files`` (atomic).

    ``compress=True`` stores the frames as JPEG 2000 lossless (the one compression highdicom
    allows for BINARY): 18-43x smaller on the corpus, read back by pydicom with
    pylibjpeg-openjpeg, but some older viewers only read the default uncompressed
    Explicit VR Little Endian.

    ``labels`` is in numpy order ``(z, y, x)`` with index ``k`` of axis 0 on
    ``source_files[k]`` (or frame ``k`` of a single multi-frame source). Returns the path.
    Raises :class:`GeometryError` when labels/geometry are not the sources' grid and
    :class:`~napari_medfm.io.writers.WriteError` for bad labels or non-DICOM sources.
    """
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from .. import __version__

    p = Path(path)
    arr = _check_labels(p, labels, geometry)
    files = [Path(f) for f in source_files]
    if not files:
        raise WriteError(p, "no source DICOM files given: a DICOM-SEG must reference its images "
                            "(images resampled on reading, e.g. for gantry tilt or uneven slice "
                            "spacing, no longer map to files)")
    datasets = [_read_source(f) for f in files]
    for note in _repair_series_uids(datasets):
        log.warning("%s: %s", p.name, note)
    if arr.ndim == 2:  # one 2D slice: place it with the source's own plane
        arr, geometry = _promote_2d(arr, geometry, datasets, files)
    order = _check_source_grid(arr.shape, geometry, datasets, files)

    values = present_values(arr)
    if not values:
        raise WriteError(p, "labels are all zero: a DICOM-SEG needs at least one segment")
    names = {int(k): str(v) for k, v in (label_names or {}).items()}
    colors = {int(k): _norm_color(v, p) for k, v in (label_colors or {}).items()}

    lut = np.zeros(int(arr.max()) + 1, dtype=np.uint16 if len(values) > 255 else np.uint8)
    descriptions = []
    for number, value in enumerate(values, start=1):
        lut[value] = number
        seg_label = names.get(value) or f"Label {value}"
        category, prop_type = segment_codes(names.get(value))
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=seg_label[:64],
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type="AUTOMATIC" if algorithm else "MANUAL",
            algorithm_identification=_algorithm_identification(algorithm) if algorithm else None,
            display_color=hd.color.CIELabColor.from_rgb(*colors[value]) if value in colors else None,
        )
        desc.SegmentDescription = f"label value {value}"
        descriptions.append(desc)
    seg_numbers = lut[arr[order]]  # frame order of the sources
    if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) == 1:
        seg_numbers = seg_numbers[0]  # single-frame source: highdicom wants (rows, cols)

    texts = [*names.values(), series_description]
    extra: dict[str, Any] = {}
    if not all(t.isascii() for t in texts):
        extra["specific_character_set"] = "ISO_IR 192"  # UTF-8 for non-ASCII segment names
    try:
        with warnings.catch_warnings():
            # highdicom warns about odd patient names *quoting the name*: never let it reach logs
            warnings.filterwarnings("ignore", message=".*person name.*")
            seg = hd.seg.Segmentation(
                source_images=datasets,
                pixel_array=seg_numbers,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=hd.UID(),
                series_number=int(datasets[0].get("SeriesNumber", 0) or 0) + 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="napari-medfm",
                manufacturer_model_name="napari-medfm",
                software_versions=f"napari-medfm {__version__}",
                device_serial_number="none",
                series_description=series_description[:64],
                content_label="SEGMENTATION",
                content_description=series_description[:64],
                omit_empty_frames=True,
                transfer_syntax_uid=JPEG2000Lossless if compress else ExplicitVRLittleEndian,
                **extra,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise WriteError(p, f"highdicom rejected the segmentation: {exc}") from exc

    def _save(tmp: Path) -> None:
        seg.save_as(str(tmp), enforce_file_format=True)

    atomic_write(p, _save)
    log.info("wrote DICOM-SEG %s: %d segment(s) over %d source file(s)", p.name, len(values),
             len(files))
    return p


# ---------------------------------------------------------------------------- read: decoding
def _decode_frames_fallback(ds: Any, path: Path) -> np.ndarray:
    """Decode the frames of a SEG whose encoding pydicom/highdicom cannot handle: (n, rows, cols)."""
    from pydicom.encaps import generate_frames

    ts = str(ds.file_meta.TransferSyntaxUID)
    rows, cols = int(ds.Rows), int(ds.Columns)
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.BitsAllocated)
    if bits not in (1, 8):
        raise ReadError(path, f"SEG with BitsAllocated {bits} is not supported")
    npix = rows * cols
    if ts == _EXPLICIT_BE:
        try:
            arr = np.asarray(ds.pixel_array)
        except Exception as exc:
            raise ReadError(path, f"big-endian SEG pixel data could not be decoded ({exc})") from exc
        return arr.reshape(nframes, rows, cols).astype(np.uint8)
    if ts not in (_RLE, _DEFLATED_FRAMES):
        raise ReadError(path, f"SEG pixel data in transfer syntax {ts} could not be decoded")
    out = np.empty((nframes, rows, cols), dtype=np.uint8)
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=nframes))
    except Exception as exc:
        raise ReadError(path, f"encapsulated SEG pixel data is malformed ({exc})") from exc
    if len(frames) != nframes:
        raise ReadError(path, f"SEG declares {nframes} frames but holds {len(frames)}")
    for i, frame in enumerate(frames):
        if ts == _DEFLATED_FRAMES:
            try:
                raw = zlib.decompress(frame, -15)
            except zlib.error:
                try:
                    raw = zlib.decompress(frame)
                except zlib.error as exc:
                    raise ReadError(path, f"deflated frame {i + 1} is corrupt ({exc})") from exc
        else:
            raw = _rle_decode(frame, bits, npix, path, i)
        buf = np.frombuffer(raw, dtype=np.uint8)
        if bits == 1:
            buf = np.unpackbits(buf, bitorder="little")
        if buf.size < npix:
            raise ReadError(path, f"frame {i + 1} decodes to {buf.size} pixels, expected {npix}")
        out[i] = buf[:npix].reshape(rows, cols)
    return out


def _rle_decode(frame: bytes, bits: int, npix: int, path: Path, index: int) -> bytes:
    try:
        from rle.utils import decode_segment
    except ImportError as exc:  # pragma: no cover - pylibjpeg-rle is a dependency
        from ..errors import MissingDecoderError

        raise MissingDecoderError(path, "RLE SEG frames need pylibjpeg-rle (pip install "
                                  "pylibjpeg-rle)") from exc
    if len(frame) < 64:
        raise ReadError(path, f"RLE frame {index + 1} has no RLE header")
    nseg = int.from_bytes(frame[:4], "little")
    if nseg != 1:
        raise ReadError(path, f"RLE frame {index + 1} has {nseg} segments; a 1/8-bit SEG has one")
    offset = int.from_bytes(frame[4:8], "little")
    try:
        return bytes(decode_segment(frame[offset:]))
    except Exception as exc:
        raise ReadError(path, f"RLE frame {index + 1} is corrupt ({exc})") from exc


def _as_native_dataset(ds: Any, frames: np.ndarray) -> Any:
    """Re-encode ``ds`` in memory as Explicit VR Little Endian with native pixel data."""
    from pydicom.pixels import pack_bits
    from pydicom.uid import ExplicitVRLittleEndian

    for _ in ds.iterall():  # decode every raw element with the original encoding first
        pass
    if int(ds.BitsAllocated) == 1:
        data = pack_bits(frames.reshape(-1), pad=True)
    else:
        data = frames.astype(np.uint8).tobytes()
        if len(data) % 2:
            data += b"\x00"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = data
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = False
    ds.set_original_encoding(False, True, ds.original_character_set)
    return ds


def _load_segmentation(path: Path) -> Any:
    """A highdicom Segmentation of ``path`` whose frames decode (fallbacks documented above)."""
    import highdicom as hd
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not path.is_file():
        raise ReadError(path, "file does not exist")
    seg = None
    cause = ""
    try:
        seg = hd.seg.segread(str(path))
        ts = str(seg.file_meta.TransferSyntaxUID)
        if ts == _RLE and int(seg.BitsAllocated) == 1:
            raise NotImplementedError("pydicom cannot decode 1-bit RLE frames")
        seg.get_stored_frame(1)  # probe: does the pixel data decode?
        return seg
    except Exception as exc:
        cause = f"{type(exc).__name__}: {exc}"
        seg = None
    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError as exc:
        raise ReadError(path, f"not a DICOM file ({exc})") from exc
    except Exception as exc:
        raise ReadError(path, f"DICOM header could not be read ({exc})") from exc
    sop = str(ds.get("SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
    if sop != SEG_SOP_CLASS_UID:
        raise ReadError(path, f"not a DICOM Segmentation (SOP class {sop or 'missing'})")
    if "PixelData" not in ds:
        raise ReadError(path, "DICOM-SEG has no pixel data")
    try:
        frames = _decode_frames_fallback(ds, path)
    except ReadError as exc:
        raise ReadError(path, f"{exc.cause}; highdicom said: {cause}") from exc
    try:
        return hd.seg.Segmentation.from_dataset(_as_native_dataset(ds, frames), copy=False)
    except Exception as exc:
        raise ReadError(path, f"invalid DICOM-SEG ({type(exc).__name__}: {exc})") from exc


# ---------------------------------------------------------------------------- read: placement
def _segment_table(seg: Any) -> tuple[dict[int, int], dict[int, str], dict[int, tuple[int, int, int]]]:
    """Segment number -> label value, label value -> name, label value -> RGB."""
    import highdicom as hd

    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    values: dict[int, int] = {}
    for item in seg.SegmentSequence:
        m = _LABEL_VALUE_RE.search(str(item.get("SegmentDescription", "") or ""))
        if m:
            values[int(item.SegmentNumber)] = int(m.group(1))
    if len(values) != len(numbers) or len(set(values.values())) != len(values) or 0 in values.values():
        values = {n: n for n in numbers}
    names: dict[int, str] = {}
    colors: dict[int, tuple[int, int, int]] = {}
    for item in seg.SegmentSequence:
        v = values[int(item.SegmentNumber)]
        names[v] = str(item.get("SegmentLabel", "") or f"Segment {int(item.SegmentNumber)}")
        lab = item.get("RecommendedDisplayCIELabValue")
        if lab is not None:
            rgb = hd.color.CIELabColor.from_dicom_value(tuple(int(x) for x in lab)).to_rgb()
            colors[v] = tuple(int(c) for c in rgb)  # type: ignore[assignment]
    return values, names, colors


def _combine(seg: Any, values: Mapping[int, int], path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(label array in SEG volume order, 4x4 index->LPS affine, overlapping voxel count)."""
    numbers = sorted(values)
    fractional = str(seg.SegmentationType) == "FRACTIONAL"
    lut = np.zeros(max(numbers) + 1, dtype=np.int64)
    for n, v in values.items():
        lut[n] = v
    dtype = label_dtype(np.asarray([max(values.values())]))
    try:
        if fractional:
            raise RuntimeError("fractional: threshold per segment")
        vol = seg.get_volume(segment_numbers=numbers, combine_segments=True, relabel=False)
        arr = lut[np.asarray(vol.array, dtype=np.int64)].astype(dtype)
        return arr, np.asarray(vol.affine, float), 0
    except RuntimeError:
        pass  # overlapping (or fractional) segments: combine one by one, later wins
    except Exception as exc:
        raise ReadError(path, f"SEG frames do not form a regular volume ({exc})") from exc
    arr = None
    affine = None
    overlap = 0
    for n in numbers:
        try:
            vol = seg.get_volume(segment_numbers=[n], combine_segments=False)
        except Exception as exc:
            raise ReadError(path, f"segment {n} could not be read as a volume ({exc})") from exc
        mask = np.asarray(vol.array)[..., 0]
        mask = mask >= 0.5 if fractional else mask > 0
        if arr is None:
            arr = np.zeros(mask.shape, dtype=dtype)
            affine = np.asarray(vol.affine, float)
        overlap += int(np.count_nonzero(mask & (arr > 0)))
        arr[mask] = values[n]
    assert arr is not None and affine is not None
    return arr, affine, overlap


def _geometry_from_affine(arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, Geometry]:
    """Geometry of a numpy-order (k, r, c) array from its index->LPS affine; z along the normal."""
    lin = affine[:3, :3]
    origin = affine[:3, 3].copy()
    x, y, z = lin[:, 2], lin[:, 1], lin[:, 0].copy()
    if float(np.dot(z, np.cross(x, y))) < 0:
        origin = origin + (arr.shape[0] - 1) * z
        z = -z
        arr = arr[::-1]
    cols = np.stack([x, y, z], axis=1)
    spacing = np.linalg.norm(cols, axis=0)
    if arr.shape[0] == 1 and spacing[2] < 1e-6:
        spacing[2] = 1.0
        cols[:, 2] = np.cross(x, y) / np.linalg.norm(np.cross(x, y))
    return np.ascontiguousarray(arr), Geometry(tuple(spacing), tuple(origin), cols / spacing)


def _numpy_index_to_lps(geometry: Geometry) -> np.ndarray:
    """4x4 matrix mapping numpy-order (k, r, c, 1) indices to LPS (x, y, z, 1)."""
    m = np.eye(4)
    m[:3, :3] = (geometry.direction * np.asarray(geometry.spacing))[:, ::-1]
    m[:3, 3] = geometry.origin
    return m


def _place_on_reference(
    arr: np.ndarray, affine: np.ndarray, ref_geometry: Geometry, ref_shape: tuple[int, ...],
    path: Path,
) -> np.ndarray:
    """Paste a SEG volume onto the reference grid (same grid up to integer shifts and flips)."""
    t = np.linalg.inv(_numpy_index_to_lps(ref_geometry)) @ affine  # SEG index -> ref index
    rot = t[:3, :3]
    perm = np.argmax(np.abs(rot), axis=0)  # SEG axis a -> reference axis perm[a]
    signs = np.sign(rot[perm, np.arange(3)])
    expected = np.zeros((3, 3))
    expected[perm, np.arange(3)] = signs
    single = arr.shape[0] == 1  # a single SEG slice: its stacking axis spacing is meaningless
    check = rot.copy()
    if single:
        check[:, 0] = expected[:, 0]
    if sorted(perm.tolist()) != [0, 1, 2] or not np.allclose(check, expected, atol=1e-3):
        raise GeometryError(
            f"{path.name}: the segmentation grid is not the reference image grid (different "
            "pixel spacing or orientation); resample the reference or read without it"
        )
    shift = t[:3, 3]
    if np.max(np.abs(shift - np.round(shift))) > 0.05:
        raise GeometryError(
            f"{path.name}: segmentation frames are offset by a fraction of a voxel "
            f"({np.round(shift, 3).tolist()}) from the reference grid"
        )
    shift = np.round(shift).astype(int)
    out = np.zeros(ref_shape, dtype=arr.dtype)
    # reorder SEG axes into reference order, flipping reversed axes
    src = arr
    for a in range(3):
        if signs[a] < 0:
            src = np.flip(src, axis=a)
    order = np.argsort(perm)  # reference axis b comes from SEG axis order[b]
    src = np.transpose(src, order)
    start = np.empty(3, dtype=int)
    for b in range(3):
        a = order[b]
        n = arr.shape[a]
        start[b] = shift[b] if signs[a] > 0 else shift[b] - (n - 1)
    dst_sl, src_sl = [], []
    for b in range(3):
        lo, hi = start[b], start[b] + src.shape[b]
        clo, chi = max(lo, 0), min(hi, ref_shape[b])
        if chi <= clo:
            clo = chi = 0
        dst_sl.append(slice(clo, chi))
        src_sl.append(slice(clo - lo, chi - lo) if chi > clo else slice(0, 0))
    inside = src[tuple(src_sl)]
    if int(np.count_nonzero(inside)) != int(np.count_nonzero(src)):
        raise GeometryError(
            f"{path.name}: {int(np.count_nonzero(src)) - int(np.count_nonzero(inside))} "
            "segmented voxels fall outside the reference image"
        )
    out[tuple(dst_sl)] = inside
    return out


def _referenced_series(seg: Any) -> list[str]:
    series = []
    for item in seg.get("ReferencedSeriesSequence", []) or []:
        uid = str(item.get("SeriesInstanceUID", ""))
        if uid and uid not in series:
            series.append(uid)
    return series


def read_dicom_seg(path: str | Path, reference: MedicalImage | None = None) -> MedicalImage:
    """Read a DICOM-SEG as a label map (``is_label=True``).

    ``metadata`` carries ``label_names``/``label_colors`` (by label value),
    ``segment_numbers`` (label value -> DICOM segment number), ``series_instance_uid`` (of
    the SEG), ``referenced_series_instance_uids``, ``frame_of_reference_uid``,
    ``sop_class_uid``, ``source_path``, ``warnings``. With ``reference`` the data have
    exactly ``reference``'s shape and geometry.
    """
    p = Path(path)
    seg = _load_segmentation(p)
    values, names, colors = _segment_table(seg)
    arr, affine, overlap = _combine(seg, values, p)
    notes: list[str] = []
    if overlap:
        msg = (f"{overlap} voxels belong to more than one segment; the later segment "
               "(higher segment number) was kept")
        notes.append(msg)
        warnings.warn(f"{p.name}: {msg}", UserWarning, stacklevel=2)
    referenced = _referenced_series(seg)
    for_uid = str(seg.get("FrameOfReferenceUID", "") or "")
    if reference is not None:
        ref_md = reference.metadata or {}
        ref_for = str(ref_md.get("frame_of_reference_uid", "") or "")
        if ref_for and for_uid and ref_for != for_uid:
            raise GeometryError(
                f"{p.name}: the segmentation's Frame of Reference differs from the reference "
                "image's; it was not drawn on this series"
            )
        ref_series = str(ref_md.get("series_instance_uid", "") or "")
        if ref_series and referenced and ref_series not in referenced:
            notes.append("the segmentation references another series of the same frame of "
                         "reference; it was placed by position")
        if reference.multiscale or reference.rgb or len(reference.spatial_shape) != 3:
            raise GeometryError(f"{p.name}: the reference must be a 3D grey volume")
        data = _place_on_reference(arr, affine, reference.geometry,
                                   tuple(reference.spatial_shape), p)
        geometry = reference.geometry
    else:
        data, geometry = _geometry_from_affine(arr, affine)
    description = str(seg.get("SeriesDescription", "") or "segmentation")
    metadata: dict[str, Any] = {
        "source_path": str(p),
        "label_names": names,
        "label_colors": {k: list(v) for k, v in colors.items()},
        "segment_numbers": {v: n for n, v in values.items()},
        "series_instance_uid": str(seg.SeriesInstanceUID),
        "study_instance_uid": str(seg.get("StudyInstanceUID", "") or ""),
        "referenced_series_instance_uids": referenced,
        "frame_of_reference_uid": for_uid,
        "sop_class_uid": str(seg.SOPClassUID),
        "series_description": description,
        "segmentation_type": str(seg.SegmentationType),
        "warnings": notes,
    }
    return MedicalImage(
        data=data, geometry=geometry, modality="SEG", kind="volume", name=description,
        metadata=metadata, is_label=True,
    )
