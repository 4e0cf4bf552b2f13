"""Sliding-window inference as a cancellable generator (MONAI machinery, one yield per batch).

:func:`sliding_window_gen` computes exactly what :func:`monai.inferers.sliding_window_inference`
computes for a predictor returning one tensor with the window's spatial size (same window grid
from :func:`monai.data.utils.dense_patch_slices`, same blending weights from
:func:`monai.data.utils.compute_importance_map`, same padding and cropping), but it is written as
a generator that yields :class:`~napari_medfm.progress.Progress` after every batch of
``sw_batch_size`` windows. A napari worker therefore shows real progress and ``worker.quit()``
stops the run within one batch; the CLI drains it with a progress bar.

Memory: windows are cut from the input where it lives (usually the CPU), moved to ``sw_device``
batch by batch, predicted (optionally under autocast), weighted and added straight into the
output accumulator on ``device`` (default: the CPU) - the full-size volume never sits on the GPU.
The accumulator is float32 ``(N, C, *spatial)``; the summed blending weights are rebuilt slab
by slab at the end and divided out in place, so no full-size weight map is stored (MONAI keeps
one): peak memory is input + output + one window batch + one slab.

torch and MONAI are imported on call, not at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any

from ..errors import MedfmError
from ..progress import Progress

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


class OutOfMemoryError(MedfmError):
    """A window batch did not fit in the device's memory (message holds the advice)."""


def _oom_message(roi_size: Sequence[int], sw_batch_size: int, device: Any) -> str:
    from .device import oom_advice

    return (f"{oom_advice(device, what=f'windows of {tuple(roi_size)} x batch {sw_batch_size}')} "
            "(CLI: --roi-size, --sw-batch-size 1, --precision fp16/bf16, --device cpu)")


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int],
                  overlap: Sequence[float]) -> tuple[int, ...]:
    """Window step per axis, as MONAI's sliding-window inferer computes it."""
    out = []
    for img, roi, o in zip(image_size, roi_size, overlap, strict=True):
        if roi == img:
            out.append(int(roi))
        else:
            step = int(roi * (1 - o))
            out.append(step if step > 0 else 1)
    return tuple(out)


def window_count(image_size: Sequence[int], roi_size: Sequence[int] | int,
                 overlap: float | Sequence[float] = 0.25) -> int:
    """Number of windows the inferer will run on one image (after padding small images)."""
    from monai.data.utils import dense_patch_slices
    from monai.utils import ensure_tuple_rep, fall_back_tuple

    nd = len(image_size)
    roi = fall_back_tuple(roi_size, image_size)
    size = tuple(max(i, r) for i, r in zip(image_size, roi, strict=True))
    ov = ensure_tuple_rep(overlap, nd)
    return len(dense_patch_slices(size, roi, scan_interval(size, roi, ov)))


def _normalise(output: Any, slices: Sequence[Sequence[slice]], importance: Any,
               roi: Sequence[int]) -> None:
    """Divide ``output`` in place by the summed window weights, one slab at a time.

    The weight sum is built slab by slab along the first spatial axis (adding the windows'
    importance maps in the same order as MONAI, hence bit-identical), so no full-size weight
    map is ever allocated: peak memory stays at input + output + one slab.
    """
    import torch

    size = output.shape[2]
    step = max(int(roi[0]), -(-size // 4), 1)  # <= 4 slabs: few split windows, small slabs
    for z0 in range(0, size, step):
        z1 = min(z0 + step, size)
        cnt = torch.zeros((1, 1, z1 - z0, *output.shape[3:]), dtype=output.dtype,
                          device=output.device)
        for sl in slices:
            a, b = max(sl[0].start, z0), min(sl[0].stop, z1)
            if a >= b:
                continue
            cnt[(slice(None), slice(None), slice(a - z0, b - z0), *sl[1:])] += \
                importance[:, :, a - sl[0].start:b - sl[0].start]
        output[:, :, z0:z1] /= cnt


def sliding_window_gen(
    inputs: Any,
    predictor: Callable[[Any], Any],
    roi_size: Sequence[int] | int,
    sw_batch_size: int = 1,
    overlap: float | Sequence[float] = 0.25,
    mode: str = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: Any = None,
    device: Any = None,
    precision: str = "fp32",
    message: str = "window",
) -> Generator[Progress, None, Any]:
    """Sliding-window inference on ``inputs`` ``(N, C, *spatial)``; yields once per window batch.

    Parameters mirror :func:`monai.inferers.sliding_window_inference`. ``device`` is where the
    stitched output lives (default: the input's device); ``sw_device`` where windows run
    (default: the input's device). ``precision`` runs the predictor under autocast; the
    accumulator is always float32. Returns the stitched tensor ``(N, C_out, *spatial)`` (a
    MetaTensor when ``inputs`` is one).
    """
    import torch
    import torch.nn.functional as F
    from monai.data.meta_tensor import MetaTensor
    from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
    from monai.utils import PytorchPadMode, ensure_tuple_rep, fall_back_tuple, look_up_option

    from .device import autocast_context, is_oom

    nd = inputs.ndim - 2
    if nd < 1:
        raise ValueError(f"inputs must be (N, C, *spatial), got shape {tuple(inputs.shape)}")
    if sw_batch_size < 1:
        raise MedfmError(f"sw batch size must be >= 1, got {sw_batch_size}")
    ov = ensure_tuple_rep(overlap, nd)
    for o in ov:
        if o < 0 or o >= 1:
            raise MedfmError(f"overlap must be >= 0 and < 1, got {overlap}")
    if precision not in PRECISIONS:
        raise MedfmError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

    temp_meta = None
    if isinstance(inputs, MetaTensor):
        temp_meta = MetaTensor([]).copy_meta_from(inputs, copy_attr=False)
        inputs = inputs.as_tensor()
    compute_dtype = inputs.dtype
    batch_size, _, *image_size_ = inputs.shape
    device = torch.device(device) if device is not None else inputs.device
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    roi = fall_back_tuple(roi_size, image_size_)
    if len(roi) != nd:
        raise MedfmError(f"roi size {tuple(roi)} does not match the {nd}D input")

    # pad when the image is smaller than a window (same symmetric padding as MONAI)
    image_size = tuple(max(image_size_[i], roi[i]) for i in range(nd))
    pad_size: list[int] = []
    for k in range(inputs.ndim - 1, 1, -1):
        diff = max(roi[k - 2] - inputs.shape[k], 0)
        half = diff // 2
        pad_size.extend([half, diff - half])
    if any(pad_size):
        inputs = F.pad(inputs, pad=pad_size, mode=look_up_option(padding_mode, PytorchPadMode),
                       value=cval)

    interval = scan_interval(image_size, roi, ov)
    slices = dense_patch_slices(image_size, roi, interval)
    num_win = len(slices)
    total_windows = num_win * batch_size
    n_batches = (total_windows + sw_batch_size - 1) // sw_batch_size

    valid = get_valid_patch_size(image_size, roi)
    importance = compute_importance_map(tuple(valid), mode=mode, sigma_scale=sigma_scale,
                                        device=sw_device, dtype=compute_dtype)
    importance = importance[None, None].to(device=sw_device, dtype=compute_dtype)
    importance_out = importance.to(device)

    output = None
    yield Progress(0, n_batches, f"0/{total_windows} {message}s")
    for b, start in enumerate(range(0, total_windows, sw_batch_size)):
        idxs = range(start, min(start + sw_batch_size, total_windows))
        where = [(idx // num_win, slices[idx % num_win]) for idx in idxs]
        win = torch.cat([inputs[(slice(n, n + 1), slice(None), *sl)] for n, sl in where])
        win = win.to(sw_device)
        try:
            with torch.no_grad(), autocast_context(sw_device, precision):
                pred = predictor(win)
        except (RuntimeError, MemoryError) as exc:
            if is_oom(exc):
                raise OutOfMemoryError(_oom_message(roi, sw_batch_size, sw_device)) from exc
            raise
        if not isinstance(pred, torch.Tensor):
            raise MedfmError("the network must return one tensor per window batch, got "
                             f"{type(pred).__name__}")
        if tuple(pred.shape[2:]) != tuple(roi):
            raise MedfmError(f"the network returned windows of spatial size {tuple(pred.shape[2:])}"
                             f" for inputs of {tuple(roi)}; only same-size outputs are supported")
        pred = pred.to(compute_dtype)
        if output is None:
            output = torch.zeros((batch_size, pred.shape[1], *image_size), dtype=compute_dtype,
                                 device=device)
        pred = pred.mul_(importance).to(device)
        for p, (n, sl) in zip(pred, where, strict=True):
            output[(slice(n, n + 1), slice(None), *sl)] += p[None]
        del pred, win
        yield Progress(b + 1, n_batches, f"{min(start + sw_batch_size, total_windows)}/"
                       f"{total_windows} {message}s")

    _normalise(output, slices, importance_out, roi)
    if any(pad_size):
        crop = []
        for sp in range(nd):
            si = nd - sp - 1
            crop.insert(0, slice(pad_size[sp * 2], pad_size[sp * 2] + image_size_[si]))
        output = output[(slice(None), slice(None), *crop)]
    if temp_meta is not None:
        out = MetaTensor(output)
        out.copy_meta_from(temp_meta, copy_attr=False)
        return out
    return output
