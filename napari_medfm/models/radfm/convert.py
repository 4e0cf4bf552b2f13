"""One-time conversion of RadFM's released ``pytorch_model.bin`` to bf16 safetensors shards.

``medfm weights convert radfm [--weights DIR] [--out DIR] [--dtype bf16] [--shard-size 5GB]``
reads the fp32 checkpoint memory-mapped, drops the documented unused keys and legacy
``inv_freq`` buffers, checks the rest against the network strictly, and writes
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json`` (Hugging Face layout)
shard by shard, each atomically; ``radfm_config.json`` and ``tokenizer.model`` are copied.
The loader then prefers the shards (half the size, lazily memory-mapped, no pickle).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ...errors import WeightsError
from .model import _check_keys, drop_unused_keys
from .network import RadFMConfig, RadFMNetwork
from .spec import CHECKPOINT, CONFIG_FILE, TOKENIZER

__all__ = ["convert", "convert_cli", "parse_size"]

DEFAULT_SHARD = 5 * 10**9


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"40000"`` -> bytes."""
    if isinstance(text, int):
        return text
    t = str(text).strip().upper().replace(" ", "")
    for unit, mul in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mul)
    return int(t)


def _atomic_save(tensors: dict[str, torch.Tensor], dst: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def convert(src: str | Path, out: str | Path | None = None, *, dtype: torch.dtype = torch.bfloat16,
            shard_size: int | str = DEFAULT_SHARD) -> list[Path]:
    """Convert the model folder (or ``pytorch_model.bin``) ``src`` into shards in ``out``
    (default: the same folder). Returns the shard paths."""
    from ...runtime.safe_load import load_state_dict

    src = Path(src).expanduser()
    folder = src.parent if src.is_file() else src
    ckpt = src if src.is_file() else folder / CHECKPOINT
    if not ckpt.is_file():
        raise WeightsError(f"convert radfm: {ckpt} does not exist (fetch or import it first)")
    out = Path(out).expanduser() if out else folder
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / CONFIG_FILE
    cfg = RadFMConfig.from_file(cfg_path) if cfg_path.is_file() else RadFMConfig()
    with torch.device("meta"):
        net = RadFMNetwork(cfg)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    sd, _ = drop_unused_keys(load_state_dict(ckpt, mmap=True))
    _check_keys(expected, sd, ckpt.name)
    need = sum(t.numel() * torch.finfo(dtype).bits // 8 for t in sd.values())
    free = shutil.disk_usage(out).free
    if free < need:
        raise WeightsError(f"not enough disk space in {out} for the converted shards: "
                           f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    limit = parse_size(shard_size)
    groups: list[list[str]] = [[]]
    size = 0
    for k in expected:  # network order: a shard holds whole consecutive layers
        n = sd[k].numel() * torch.finfo(dtype).bits // 8
        if groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map: dict[str, str] = {}
    paths = []
    meta = {"format": "pt", "source": ckpt.name, "model": "radfm"}
    for keys, name in zip(groups, names, strict=True):
        tensors = {k: sd[k].to(dtype).contiguous().clone() for k in keys}
        _atomic_save(tensors, out / name, meta)
        del tensors
        weight_map.update({k: name for k in keys})
        paths.append(out / name)
    index = {"metadata": {"total_size": need, "dtype": str(dtype).replace("torch.", "")},
             "weight_map": weight_map}
    tmp = out / ".model.safetensors.index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "model.safetensors.index.json")
    for extra in (CONFIG_FILE, TOKENIZER):
        if (folder / extra).is_file() and out != folder:
            shutil.copyfile(folder / extra, out / extra)
    return paths


def convert_cli(args: Any) -> int:
    """``medfm weights convert radfm`` (args: weights, out, dtype, shard_size)."""
    from ...runtime.weights import WeightsManager

    src = Path(args.weights).expanduser() if getattr(args, "weights", None) \
        else WeightsManager().model_dir("radfm")
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    paths = convert(src, getattr(args, "out", None), dtype=dtypes[getattr(args, "dtype", None) or "bf16"],
                    shard_size=getattr(args, "shard_size", None) or DEFAULT_SHARD)
    for p in paths:
        print(p)
    print(f"the loader now uses these shards; {CHECKPOINT} can be deleted to save space")
    return 0
