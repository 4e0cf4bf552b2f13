"""Pixel decoding for the DICOM reader (private helper of :mod:`napari_medfm.io.dicom`).

Stored values are decoded one frame at a time straight into a preallocated output array.
Uncompressed little/big-endian single-frame data is read with one ``readinto`` from the byte
offset pydicom recorded while parsing the header (no second parse, no extra copy); everything
else goes through pydicom's pixel handlers (pylibjpeg/openjpeg/libjpeg/pyjpegls/RLE).

Known traps handled here (see the corpus MANIFEST):

* JPEG 2000 codestream *signed* while PixelRepresentation is 0 -> values re-read as signed
  (pydicom already corrects the opposite case, unsigned codestream with PixelRepresentation 1);
* BitsStored < BitsAllocated -> high bits masked / sign-extended;
* big-endian data -> native byte order;
* MONOCHROME1 -> inverted so that it displays like MONOCHROME2 (recorded by the caller);
* PALETTE COLOR -> RGB through the palette; YBR_* -> RGB (pydicom's colour conversion).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDecoderError, ReadError

PIXEL_DATA_TAG = 0x7FE00010

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
NATIVE_TS = {IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE}
J2K_TS = {
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
}

#: Which package decodes which transfer syntax (for "needs package Y" messages).
_TS_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg + pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg + pylibjpeg-libjpeg (or Pillow)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.91": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg>=2",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg>=2",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg>=2",
    "1.2.840.10008.1.2.5": "pylibjpeg + pylibjpeg-rle (or numpy only)",
}


def ts_name(uid: str) -> str:
    """Human name of a transfer syntax UID (falls back to the UID)."""
    try:
        from pydicom.uid import UID

        name = UID(uid).name
        return name if name and name != uid else uid
    except Exception:  # pragma: no cover - defensive
        return uid


def _num(ds: Any, keyword: str, default: Any = None) -> Any:
    v = ds.get(keyword, None)
    if v is None or v == "":
        return default
    return v


@dataclass
class PixelFormat:
    """How the stored values of one image (file) are laid out."""

    rows: int
    cols: int
    frames: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    transfer_syntax: str
    warnings: list[str] = field(default_factory=list)

    @property
    def is_color(self) -> bool:
        return self.samples > 1 or self.photometric == "PALETTE COLOR"

    def stored_range(self) -> tuple[int, int]:
        """Range of possible stored values (after sign handling)."""
        b = self.bits_stored
        if self.signed:
            return -(2 ** (b - 1)), 2 ** (b - 1) - 1
        return 0, 2**b - 1

    def native_dtype(self) -> np.dtype:
        """numpy dtype of one stored sample as it lies in the file (native byte order later)."""
        kind = "i" if self.signed else "u"
        nbytes = max(1, self.bits_allocated // 8)
        return np.dtype(f"{kind}{nbytes}")


def pixel_format(ds: Any, path: Path) -> PixelFormat:
    """Read the pixel module of a header, raising :class:`ReadError` when it is unusable."""
    rows, cols = _num(ds, "Rows"), _num(ds, "Columns")
    ba = _num(ds, "BitsAllocated")
    if rows is None or cols is None or ba is None:
        raise ReadError(path, "missing Rows/Columns/BitsAllocated: not an image")
    fm = getattr(ds, "file_meta", None)
    ts = str(fm.get("TransferSyntaxUID", "")) if fm is not None else ""
    if not ts:
        ts = IMPLICIT_LE
    frames = int(_num(ds, "NumberOfFrames", 1) or 1)
    return PixelFormat(
        rows=int(rows),
        cols=int(cols),
        frames=max(1, frames),
        samples=int(_num(ds, "SamplesPerPixel", 1)),
        bits_allocated=int(ba),
        bits_stored=int(_num(ds, "BitsStored", ba)),
        signed=int(_num(ds, "PixelRepresentation", 0)) == 1,
        photometric=str(_num(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper(),
        transfer_syntax=ts,
    )


def check_decoder(ds: Any, path: Path, fmt: PixelFormat) -> None:
    """Raise :class:`MissingDecoderError` / :class:`ReadError` before decoding when the
    transfer syntax cannot be decoded here."""
    ts = fmt.transfer_syntax
    if ts in NATIVE_TS or ts == "1.2.840.10008.1.2.1.99":
        return
    try:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(ts)
    except NotImplementedError:
        raise ReadError(
            path,
            f"transfer syntax {ts_name(ts)} ({ts}) is not supported by pydicom; "
            "convert the file (e.g. with dcmtk/gdcm) to a standard transfer syntax",
        ) from None
    if not decoder.is_available:
        need = _TS_PACKAGES.get(ts) or ", ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise MissingDecoderError(
            path, f"transfer syntax {ts_name(ts)} needs package {need} (pip install it)"
        )


def _j2k_signed_codestream(ds: Any) -> tuple[bool, int] | None:
    """(is_signed, precision) of the first J2K frame, or None when it cannot be parsed."""
    try:
        from pydicom.encaps import generate_frames
        from pydicom.pixels.utils import get_j2k_parameters

        nframes = int(_num(ds, "NumberOfFrames", 1) or 1)
        frame = next(generate_frames(ds.PixelData, number_of_frames=nframes))
        params = get_j2k_parameters(frame)
    except Exception:
        return None
    if "is_signed" not in params:
        return None
    return bool(params["is_signed"]), int(params.get("precision") or 16)


def _as_signed(arr: np.ndarray, precision: int) -> np.ndarray:
    """Re-read unsigned stored values as two's complement numbers of ``precision`` bits."""
    a = arr.astype(np.int32) & ((1 << precision) - 1)
    a[a >= (1 << (precision - 1))] -= 1 << precision
    return a.astype(np.int16 if precision <= 16 else np.int32)


def _mask_bits(arr: np.ndarray, fmt: PixelFormat) -> np.ndarray:
    """Keep only BitsStored bits (sign-extending for signed data)."""
    bs, ba = fmt.bits_stored, fmt.bits_allocated
    if bs >= ba or arr.dtype.kind not in "iu":
        return arr
    if fmt.signed:
        shift = ba - bs
        return (arr << shift) >> shift  # arithmetic shift on a signed dtype sign-extends
    return arr & np.array((1 << bs) - 1, dtype=arr.dtype)


class FrameDecoder:
    """Decodes the frames of one DICOM file into stored values (grey) or RGB samples."""

    def __init__(self, ds: Any, path: Path, fmt: PixelFormat):
        self.ds = ds
        self.path = path
        self.fmt = fmt
        self.signed_fix: int | None = None  # precision when the J2K sign trap applies
        self._native = self._native_location()

    # ------------------------------------------------------------------ fast path
    def _native_location(self) -> tuple[int, int] | None:
        """(byte offset, length) of uncompressed, deferred pixel data, if usable."""
        f = self.fmt
        if f.transfer_syntax not in NATIVE_TS or f.samples != 1 or f.frames != 1:
            return None
        if f.bits_allocated not in (8, 16, 32) or f.photometric == "PALETTE COLOR":
            return None
        raw = self.ds._dict.get(PIXEL_DATA_TAG)
        if raw is None or getattr(raw, "value", 1) is not None:
            return None
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            return None
        return int(tell), int(length)

    def _read_native(self, out: np.ndarray) -> None:
        f = self.fmt
        dt = f.native_dtype()
        expected = f.rows * f.cols * dt.itemsize
        tell, length = self._native  # type: ignore[misc]
        size = os.path.getsize(self.path)
        available = min(length, max(0, size - tell))
        if available < expected:
            raise ReadError(
                self.path,
                f"truncated pixel data: expected {expected} bytes, found {available}",
            )
        big = f.transfer_syntax == EXPLICIT_BE
        with open(self.path, "rb") as fh:
            fh.seek(tell)
            target = out if (out.dtype == dt and not big and out.flags.c_contiguous) else None
            if target is not None:
                n = fh.readinto(memoryview(target).cast("B"))
                if n != expected:
                    raise ReadError(self.path, f"truncated pixel data: expected {expected} bytes, found {n}")
                arr = target
            else:
                buf = fh.read(expected)
                arr = np.frombuffer(buf, dtype=dt.newbyteorder(">" if big else "<"))
                arr = arr.reshape(f.rows, f.cols).astype(dt)
        masked = _mask_bits(arr, f)
        if masked is not out:
            out[...] = masked

    # ------------------------------------------------------------------ general path
    def _decode_all(self, indices: list[int]):
        from pydicom.pixels import iter_pixels

        try:
            yield from iter_pixels(self.ds, indices=indices)
        except (MissingDecoderError, ReadError):
            raise
        except ValueError as exc:
            msg = str(exc)
            if "less than expected" in msg or "truncated" in msg.lower():
                raise ReadError(self.path, f"truncated pixel data: {msg}") from None
            raise ReadError(self.path, f"cannot decode pixel data ({ts_name(self.fmt.transfer_syntax)}): {msg}") from None
        except Exception as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ReadError(
                self.path,
                f"cannot decode pixel data ({ts_name(self.fmt.transfer_syntax)}): {type(exc).__name__}: {msg}",
            ) from None

    def _post(self, arr: np.ndarray) -> np.ndarray:
        f = self.fmt
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        if f.photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, self.ds)
            if arr.dtype != np.uint8:  # 16-bit LUT entries -> 8-bit RGB for display
                arr = (arr >> 8).astype(np.uint8)
            return arr
        if self.signed_fix is not None:
            arr = _as_signed(arr, self.signed_fix)
        return arr

    def frames(self, indices: list[int] | None = None):
        """Yield decoded frames (native byte order, traps fixed) in the order of ``indices``."""
        f = self.fmt
        idx = list(range(f.frames)) if indices is None else list(indices)
        if self._native is not None:
            out = np.empty((f.rows, f.cols), dtype=f.native_dtype())
            self._read_native(out)
            yield out
            return
        check_decoder(self.ds, self.path, f)
        if f.transfer_syntax in J2K_TS and not f.signed and f.samples == 1:
            sc = _j2k_signed_codestream(self.ds)
            if sc is not None and sc[0]:
                self.signed_fix = sc[1]
                f.warnings.append(
                    "JPEG 2000 codestream is signed but PixelRepresentation is 0: "
                    "values re-read as signed"
                )
        for arr in self._decode_all(idx):
            yield self._post(np.asarray(arr))

    def release(self) -> None:
        """Drop the (compressed) pixel bytes pydicom loaded into the header dataset."""
        if self._native is None and PIXEL_DATA_TAG in self.ds._dict:
            with contextlib.suppress(Exception):
                del self.ds[PIXEL_DATA_TAG]

    @property
    def effective_signed(self) -> bool:
        return self.fmt.signed or self.signed_fix is not None

    def read_into(self, out: np.ndarray) -> None:
        """Decode a single-frame image straight into ``out`` (shape rows x cols, its dtype)."""
        for arr in self.frames([0]):
            if arr is not out:
                out[...] = arr


def output_dtype(fmt: PixelFormat, slopes: list[float], intercepts: list[float],
                 rescale: bool, signed_fix: bool = False) -> np.dtype:
    """dtype of the output volume: the stored type, int16 HU, or float32 for real slopes."""
    if fmt.is_color:
        return np.dtype(np.uint8) if fmt.bits_allocated <= 8 or fmt.photometric == "PALETTE COLOR" else np.dtype(np.uint16)
    lo, hi = fmt.stored_range()
    if signed_fix:
        lo, hi = -(2 ** (fmt.bits_stored - 1)), 2 ** (fmt.bits_stored - 1) - 1
    if not rescale:
        slopes, intercepts = [1.0], [0.0]
    integral = all(float(s).is_integer() for s in slopes) and all(
        float(i).is_integer() for i in intercepts
    )
    if not integral:
        return np.dtype(np.float32)
    cands = [lo * s + i for s in slopes for i in intercepts] + [hi * s + i for s in slopes for i in intercepts]
    vmin, vmax = min(cands), max(cands)
    for dt in (np.uint8, np.int16, np.uint16):
        info = np.iinfo(dt)
        if info.min <= vmin and vmax <= info.max:
            if dt is np.uint8 and fmt.bits_allocated > 8:
                continue
            return np.dtype(dt)
    # Theoretical range too wide (e.g. 16-bit signed + intercept): real CT fits int16; the
    # caller checks each slice and widens to int32 when needed.
    return np.dtype(np.int16)


def rescale_into(out: np.ndarray, k: int, arr: np.ndarray, slope: float, intercept: float,
                 rescale: bool) -> np.ndarray:
    """Write ``arr * slope + intercept`` into ``out[k]``; returns ``out`` (widened if needed)."""
    if not rescale or (slope == 1.0 and intercept == 0.0):
        if out.dtype.kind in "iu" and arr.dtype != out.dtype and arr.size:
            info = np.iinfo(out.dtype)
            if arr.min() < info.min or arr.max() > info.max:
                out = out.astype(np.int32)
        out[k] = arr
        return out
    if out.dtype.kind == "f":
        np.multiply(arr, np.float32(slope), out=out[k], casting="unsafe")
        out[k] += np.float32(intercept)
        return out
    s, i = int(slope), int(intercept)
    if arr.size:
        lo, hi = int(arr.min()) * s + i, int(arr.max()) * s + i
        if s < 0:
            lo, hi = hi, lo
        info = np.iinfo(out.dtype)
        if lo < info.min or hi > info.max:
            out = out.astype(np.int32 if out.dtype != np.int32 else np.int64)
    if s == 1:
        np.add(arr, out.dtype.type(i), out=out[k], casting="unsafe")
    else:
        np.add(arr.astype(np.int64) * s, i, out=out[k], casting="unsafe")
    return out
