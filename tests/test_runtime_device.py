"""Devices, precision, memory estimates and out-of-memory handling (real torch, no mocks)."""

from __future__ import annotations

import pytest
import torch

from napari_medfm.errors import MedfmError
from napari_medfm.runtime.device import (
    DeviceError,
    autocast_context,
    available_memory,
    check_memory,
    describe_devices,
    estimate_memory,
    is_oom,
    oom_advice,
    pick_device,
    precision_dtype,
)

HAS_CUDA = torch.cuda.is_available()


def test_env_override_picks_cpu(monkeypatch):
    monkeypatch.setenv("MEDFM_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("MEDFM_DEVICE", "tpu9")
    with pytest.raises(DeviceError, match="unknown device 'tpu9'"):
        pick_device()
    # an explicit argument beats the environment
    assert pick_device("cpu") == torch.device("cpu")


def test_auto_prefers_gpu(monkeypatch):
    monkeypatch.delenv("MEDFM_DEVICE", raising=False)
    dev = pick_device()
    assert dev.type == ("cuda" if HAS_CUDA else "mps" if torch.backends.mps.is_available()
                        else "cpu")
    assert pick_device("auto") == dev


@pytest.mark.skipif(HAS_CUDA, reason="checks the message shown when no GPU exists")
def test_cuda_requested_without_gpu_is_clear():
    with pytest.raises(DeviceError, match="no CUDA GPU is usable.*--device cpu"):
        pick_device("cuda")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_index_out_of_range():
    n = torch.cuda.device_count()
    assert pick_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=f"only {n} CUDA GPU"):
        pick_device(f"cuda:{n}")


def test_precision_on_cpu():
    cpu = torch.device("cpu")
    assert precision_dtype(cpu) == torch.float32  # fp32 on the CPU unless asked
    assert precision_dtype(cpu, "bf16") == torch.bfloat16
    assert precision_dtype(cpu, "half") == torch.float16
    with pytest.raises(MedfmError, match="unknown precision 'fp8'"):
        precision_dtype(cpu, "fp8")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast_context(cpu):
        assert (a @ b).dtype == torch.float32
    with autocast_context(cpu, "bf16"):
        assert (a @ b).dtype == torch.bfloat16


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_precision_on_gpu():
    dev = torch.device("cuda", 0)
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert precision_dtype(dev) == want
    a, b = torch.randn(8, 8, device=dev), torch.randn(8, 8, device=dev)
    with autocast_context(dev):
        assert (a @ b).dtype == want
    with autocast_context(dev, "fp32"):
        assert (a @ b).dtype == torch.float32
    assert available_memory(dev) > 0


def test_memory_estimate_and_check():
    assert estimate_memory(1000, 500, 4) == int(1500 * 4 * 1.2)
    assert estimate_memory(10, 0, 2, overhead=1.0) == 20
    with pytest.raises(ValueError):
        estimate_memory(-1, 0, 4)
    free = available_memory("cpu")
    assert free is not None and free > 0
    assert check_memory(1024, "cpu") is None
    warn = check_memory(free * 4, "cpu", what="Merlin")
    assert warn is not None and "Merlin needs about" in warn and "GiB" in warn
    assert "smaller sliding window" in warn


def test_is_oom_detects_real_allocation_failure():
    try:
        torch.empty(2**62, dtype=torch.uint8)  # 4 EiB
    except Exception as exc:  # what torch really raises here
        assert is_oom(exc), repr(exc)
    else:  # pragma: no cover - an allocator that overcommits without limit
        pytest.skip("this machine let a 4 EiB allocation through")
    assert is_oom(MemoryError())
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_is_oom_detects_cuda_oom():
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(Exception) as ei:
        torch.empty(total * 2, dtype=torch.uint8, device="cuda")
    assert is_oom(ei.value)


def test_oom_advice():
    gpu = oom_advice("cuda:0", "segmentation")
    assert gpu.startswith("Out of memory running segmentation on cuda:0")
    assert "smaller sliding window" in gpu and "half precision" in gpu and "--device cpu" in gpu
    cpu = oom_advice("cpu")
    assert "--device cpu" not in cpu and "smaller sliding window" in cpu


def test_describe_devices():
    devs = describe_devices()
    assert devs[0]["device"] == "cpu" and devs[0]["memory_gib"] > 0
    assert devs[0]["threads"] == torch.get_num_threads()
    assert sum(d["device"].startswith("cuda") for d in devs) == (
        torch.cuda.device_count() if HAS_CUDA else 0)
