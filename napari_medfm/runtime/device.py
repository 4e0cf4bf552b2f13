"""Devices, precision and memory: one place for "where and how does the model run".

* :func:`pick_device` - ``cuda`` > ``mps`` > ``cpu``; an explicit choice (``"cuda:1"``,
  ``"cpu"``) or ``$MEDFM_DEVICE`` overrides, with a clear error when it is not available.
* :func:`autocast_context` / :func:`precision_dtype` - bf16 autocast on GPUs that support it,
  fp16 on other GPUs, fp32 on the CPU unless asked.
* :func:`estimate_memory`, :func:`check_memory`, :func:`available_memory` - warn before a
  job that will not fit; :func:`is_oom`, :func:`oom_advice` - turn an out-of-memory error into
  advice the user can act on.
* :func:`describe_devices` - the device list shown by ``medfm info``.

torch is imported inside the functions only.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import TYPE_CHECKING, Any

from ..errors import MedfmError

if TYPE_CHECKING:  # pragma: no cover
    import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_ALIASES = {"float32": "fp32", "32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
            "16": "fp16"}


class DeviceError(MedfmError):
    """The requested device does not exist or is not usable here."""


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(preferred: str | Any | None = None) -> torch.device:
    """The device to run on.

    ``preferred`` (or ``$MEDFM_DEVICE`` when None) may be ``"auto"``, ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``, ``"mps"`` or a ``torch.device``. Auto picks cuda > mps > cpu. A device that is
    not available raises :class:`DeviceError` saying why.
    """
    import torch

    if isinstance(preferred, torch.device):
        preferred = str(preferred)
    choice = (preferred or os.environ.get("MEDFM_DEVICE") or "auto").strip().lower()
    if choice in ("auto", ""):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(choice)
    except (RuntimeError, ValueError):
        raise DeviceError(f"unknown device {choice!r}: use auto, cpu, cuda, cuda:N or mps") \
            from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = (f"CUDA {torch.version.cuda} build" if torch.version.cuda
                     else "a CPU-only build of torch")
            raise DeviceError(f"device {choice!r} requested but no CUDA GPU is usable "
                              f"(torch {torch.__version__}, {build}); check `nvidia-smi` and "
                              "the driver, or use --device cpu")
        n = torch.cuda.device_count()
        index = 0 if dev.index is None else dev.index
        if index >= n:
            raise DeviceError(f"device {choice!r} requested but only {n} CUDA GPU(s) exist "
                              f"(cuda:0..cuda:{n - 1})")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise DeviceError("device 'mps' requested but Apple Metal is not available here")
        return dev
    raise DeviceError(f"device type {dev.type!r} is not supported: use cpu, cuda or mps")


def _normalise_precision(precision: str | None) -> str:
    p = (precision or "auto").strip().lower()
    p = _ALIASES.get(p, p)
    if p not in PRECISIONS:
        raise MedfmError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return p


def bf16_supported(device: Any) -> bool:
    """Whether ``device`` runs bf16 autocast efficiently."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return dev.type == "cpu"


def precision_dtype(device: Any, precision: str | None = "auto") -> torch.dtype:
    """The compute dtype for ``precision`` on ``device``.

    ``auto``: bf16 on GPUs that support it, fp16 on other GPUs (and mps), fp32 on the CPU.
    """
    import torch

    dev = torch.device(device)
    p = _normalise_precision(precision)
    if p == "fp32":
        return torch.float32
    if p == "bf16":
        return torch.bfloat16
    if p == "fp16":
        return torch.float16
    if dev.type == "cuda":
        return torch.bfloat16 if bf16_supported(dev) else torch.float16
    if dev.type == "mps":
        return torch.float16
    return torch.float32


def autocast_context(device: Any, precision: str | None = "auto") -> contextlib.AbstractContextManager:
    """A context manager running the enclosed forward in the chosen precision.

    fp32 -> a no-op context; otherwise ``torch.autocast(device.type, dtype)``.
    """
    import torch

    dev = torch.device(device)
    dtype = precision_dtype(dev, precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=dtype)


# --------------------------------------------------------------------------- memory


def estimate_memory(n_params: int, activation_elems: int = 0, dtype_bytes: int = 4,
                    overhead: float = 1.2) -> int:
    """Rough peak bytes for inference: (weights + live activations) x ``overhead``.

    ``activation_elems`` is the number of activation values alive at the peak (e.g. the
    largest feature map of one sliding-window batch, x a few for the layer in/out).
    """
    if n_params < 0 or activation_elems < 0 or dtype_bytes <= 0:
        raise ValueError("n_params/activation_elems must be >= 0 and dtype_bytes > 0")
    return int((n_params + activation_elems) * dtype_bytes * overhead)


def available_memory(device: Any) -> int | None:
    """Free bytes on ``device`` (GPU memory, or available RAM for cpu/mps); None if unknown."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(dev)
            return int(free)
        except Exception:
            return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(required_bytes: int, device: Any, what: str = "this job",
                 margin: float = 0.9) -> str | None:
    """None if ``required_bytes`` fits in ``margin`` x the free memory of ``device``,
    else a warning text with advice (the caller shows it; running anyway may still work)."""
    free = available_memory(device)
    if free is None or required_bytes <= free * margin:
        return None
    return (f"{what} needs about {_gib(required_bytes)} but only {_gib(free)} is free on "
            f"{device}: {_tips(device)}")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error (CUDA, MPS, CPU allocator or Python)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        oom_types: tuple[type[BaseException], ...] = (torch.OutOfMemoryError,)
    except (ImportError, AttributeError):
        oom_types = ()
    if oom_types and isinstance(exc, oom_types):
        return True
    if isinstance(exc, RuntimeError):
        msg = str(exc).lower()
        return any(s in msg for s in ("out of memory", "not enough memory",
                                      "can't allocate memory", "cannot allocate memory",
                                      "cublas_status_alloc_failed"))
    return False


def _tips(device: Any) -> str:
    dev = str(device)
    tips = ["a smaller sliding window / batch size"]
    if not dev.startswith("cpu"):
        tips.append("half precision (--precision bf16 or fp16)")
        tips.append("--device cpu (slower, uses RAM)")
    else:
        tips.append("closing other programs, or a GPU (--device cuda)")
    return "try " + ", ".join(tips[:-1]) + " or " + tips[-1] + "."


def oom_advice(device: Any, what: str = "the model") -> str:
    """What to try after an out-of-memory error on ``device``."""
    return f"Out of memory running {what} on {device}: {_tips(device)}"


def run_inference(fn: Any, device: Any, what: str, precision: str | None = None) -> Any:
    """Run ``fn()`` under ``torch.inference_mode`` (and autocast when ``precision`` is given);
    an out-of-memory error frees the CUDA cache and becomes a :class:`MedfmError` that says
    what to try. The one guard every model adapter uses around its forward passes."""
    import torch

    from ..errors import MedfmError

    ctx = (autocast_context(device, precision) if precision is not None
           else contextlib.nullcontext())
    try:
        with torch.inference_mode(), ctx:
            return fn()
    except Exception as exc:
        if is_oom(exc):
            if getattr(device, "type", str(device)) == "cuda":
                torch.cuda.empty_cache()
            raise MedfmError(oom_advice(device, what)) from None
        raise


# --------------------------------------------------------------------------- info


def describe_devices() -> list[dict[str, Any]]:
    """Compute devices with memory in GiB (for ``medfm info`` and the widgets)."""
    out: list[dict[str, Any]] = []
    cpu: dict[str, Any] = {"device": "cpu", "name": platform.processor() or platform.machine(),
                           "cores": os.cpu_count()}
    try:
        import psutil

        mem = psutil.virtual_memory()
        cpu["memory_gib"] = round(mem.total / 2**30, 1)
        cpu["available_gib"] = round(mem.available / 2**30, 1)
    except Exception:
        pass
    out.append(cpu)
    try:
        import torch
    except Exception:
        return out
    cpu["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            d: dict[str, Any] = {"device": f"cuda:{i}", "name": p.name,
                                 "memory_gib": round(p.total_memory / 2**30, 1),
                                 "compute_capability": f"{p.major}.{p.minor}",
                                 "bf16": bool(torch.cuda.is_bf16_supported())}
            with contextlib.suppress(Exception):
                free, _ = torch.cuda.mem_get_info(i)
                d["available_gib"] = round(free / 2**30, 1)
            out.append(d)
    if _mps_available():
        out.append({"device": "mps", "name": "Apple GPU (Metal)"})
    return out


__all__ = [
    "PRECISIONS", "DeviceError", "autocast_context", "available_memory", "bf16_supported",
    "check_memory", "describe_devices", "estimate_memory", "is_oom", "oom_advice",
    "pick_device", "precision_dtype",
]
