"""RadFM: visually conditioned generative training on interleaved image-text data (2D and 3D).

    medfm train radfm --data MANIFEST.csv --out DIR [--preset tiny|paper|lora] [--loss hf|weighted]
                      [--lora] [--init RADFM_DIR] [--tokenizer tokenizer.model] [--max-steps N] [--resume]
    torchrun --nproc_per_node 8 trainers/radfm.py --preset paper --data M.csv --out DIR  # FSDP2, bf16

Manifest columns: ``images`` (paths separated by ``;``), ``question`` (may place images with
``<image>`` markers), ``answer``; optional ``stage`` / ``dataset`` (stage 1 = MedMD, stage 2 =
RadMD as dataset lists: ``data.stages = {"1": [names], "2": [names]}``, ``data.stage`` picks
one), ``dims`` (2/3, else from the file type), ``split``.

Samples are built with the plugin's RadFM preprocessing and token stream (labels only on the
answer and EOS); 2D groups (``data.batch_2d``) and 3D groups (``data.batch_3d``) are never mixed
and are the unit the engine shuffles and strides over ranks (seeded, resumable); each forward
pass sees one group. Loss ``hf`` (plain cross-entropy on the answer: what the release
optimises) or ``weighted`` (3 inside medical entities of the answer - dictionary tagger over
``trainers/radfm_terms.txt`` or scispaCy - 1 elsewhere in the answer, 0 on the rest); both are
logged. ``--lora`` trains peft LoRA adapters on the LLM only. The export folder is a RadFM model
folder the plugin loads (``model.safetensors`` in the released key layout, or
``pytorch_model.bin`` with ``export.format=bin``; ``radfm_config.json``; ``tokenizer.model``;
with LoRA also ``adapters/``) plus the engine's ``model_card.json``. No hyper-parameters are
published for RadFM: the ``paper`` preset's values are ours.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # `python trainers/radfm.py` / torchrun: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from napari_medfm.models.radfm.network import RadFMConfig, RadFMNetwork
from trainers.engine import (
    Recipe,
    RunContext,
    activation_checkpoint,
    add_engine_arguments,
    deep_merge,
    image_readable,
    run_cli,
)
from trainers.engine import main as engine_main
from trainers.radfm_data import RadFMGroups, collate_group, split_paths
from trainers.radfm_loss import hf_loss, make_tagger, weighted_loss

__all__ = ["RadFMRecipe", "RadFMTrainNet", "RECIPE", "PRESETS", "add_arguments", "main"]

TINY_MODEL = {
    "vision": {"dim": 24, "depth": 2, "heads": 2, "dim_head": 8, "mlp_dim": 32,
               "image_size": 64, "frames": 64, "patch_size": 32, "frame_patch_size": 4},
    "perceiver": {"depth": 1, "heads": 2, "dim_head": 8, "num_latents": 4, "ff_mult": 2},
    "llm": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512},
}

_BASE: dict[str, Any] = {
    "model": {"config": {}, "init": None, "tokenizer": None, "train_tokenizer": False,
              "vocab_size": 400},
    "data": {"batch_2d": 4, "batch_3d": 1, "max_depth": 64, "max_length": 2048, "stage": None,
             "stages": {}},
    "loss": {"mode": "hf", "tagger": "dictionary", "terms": None, "entity_weight": 3.0},
    "lora": {"enabled": False, "r": 16, "alpha": 32, "dropout": 0.0,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "export": {"format": "safetensors"},
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": deep_merge(_BASE, {
        "train": {"max_steps": 8, "batch_size": 2, "lr": 3e-3, "warmup_steps": 1,
                  "schedule": "cosine", "save_every": 4, "progress": False,
                  "tensorboard": False, "log_every": 1},
        "model": {"config": TINY_MODEL, "train_tokenizer": True, "vocab_size": 400},
        "data": {"batch_2d": 2, "batch_3d": 1, "max_depth": 16, "max_length": 256},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }),
    "paper": deep_merge(_BASE, {  # the released 13B shape, full fine-tuning with FSDP2
        "train": {"max_steps": 10000, "batch_size": 32, "lr": 5e-6, "min_lr": 5e-7,
                  "weight_decay": 0.0, "warmup_steps": 200, "grad_clip": 1.0,
                  "precision": "bf16", "parallel": "fsdp", "grad_checkpointing": True,
                  "save_every": 500},
    }),
    "lora": deep_merge(_BASE, {  # one GPU: LoRA adapters on the LLM, bf16
        "train": {"max_steps": 5000, "batch_size": 8, "grad_accum": 8, "lr": 1e-4,
                  "warmup_steps": 100, "grad_clip": 1.0, "precision": "bf16",
                  "grad_checkpointing": True, "save_every": 500},
        "lora": {"enabled": True},
    }),
}


class RadFMTrainNet(RadFMNetwork):
    """The plugin's network (same keys) with a training forward over one homogeneous group."""

    def forward(self, images: torch.Tensor, counts: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        el = self.embedding_layer
        feats = el.vision_encoder(images.to(el.fc.weight.dtype))
        lat = el.fc(el.perceiver(feats))  # [N_images, n_lat, hidden]
        n_lat, hidden = lat.shape[1], lat.shape[2]
        b, s_max = counts.shape[0], int(counts.max())
        vis = lat.new_zeros(b, s_max * n_lat, hidden)
        start = 0
        for i, c in enumerate(counts.tolist()):
            vis[i, : c * n_lat] = lat[start:start + c].reshape(c * n_lat, hidden)
            start += c
        emb = el.lookup(input_ids, vis)
        return self.lang_model(inputs_embeds=emb, attention_mask=attention_mask,
                               use_cache=False).logits


def _model_config(cfg: Mapping[str, Any], vocab: int | None) -> RadFMConfig:
    d = copy.deepcopy(dict(cfg["model"]["config"] or {}))
    init = cfg["model"]["init"]
    if init:
        f = Path(init).expanduser() / "radfm_config.json"
        if f.is_file():
            import json

            d = json.loads(f.read_text())
    if vocab is not None and not init:
        d.setdefault("llm", {})["vocab_size"] = int(vocab)
    return RadFMConfig.from_dict(d)


class RadFMRecipe(Recipe):
    name = "radfm"
    description = (__doc__ or "").strip()
    presets = PRESETS
    default_preset = "tiny"
    required_columns = ("images", "question", "answer")
    optional_columns = ("stage", "dataset", "dims", "split")

    def __init__(self) -> None:
        self.sp: Any = None
        self.tokenizer_path: Path | None = None
        self.model_cfg: RadFMConfig | None = None
        self.tagger: Any = None

    # ------------------------------------------------------------ command line
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("radfm")
        g.add_argument("--loss", choices=("hf", "weighted"), default=None,
                       help="hf: plain cross-entropy on the answer (what the release optimises); "
                            "weighted: 3 on medical entities, 1 elsewhere in the answer")
        g.add_argument("--lora", action="store_true", default=None,
                       help="train LoRA adapters on the LLM only (peft)")
        g.add_argument("--init", default=None, metavar="RADFM_DIR",
                       help="start from a RadFM model folder (e.g. the release)")
        g.add_argument("--tokenizer", default=None, metavar="tokenizer.model",
                       help="LLaMA SentencePiece model (default: the --init folder's)")

    def flags_to_config(self, args: argparse.Namespace) -> dict[str, Any]:
        return {"loss.mode": getattr(args, "loss", None),
                "lora.enabled": True if getattr(args, "lora", None) else None,
                "model.init": getattr(args, "init", None),
                "model.tokenizer": getattr(args, "tokenizer", None)}

    # ------------------------------------------------------------ data
    def check_row(self, row: Any, cfg: Mapping[str, Any]) -> list[str]:
        problems = []
        paths = split_paths(row["images"])
        if not paths:
            problems.append("no image paths in `images`")
        for p in paths:
            path = Path(p) if Path(p).is_absolute() else row.base / p
            why = image_readable(path)
            if why:
                problems.append(why)
        if not row["question"].strip():
            problems.append("empty question")
        if not row["answer"].strip():
            problems.append("empty answer")
        marks = row["question"].count("<image>")
        if marks and marks != len(paths):
            problems.append(f"{marks} <image> markers for {len(paths)} image(s)")
        if row["dims"].strip() not in ("", "2", "3"):
            problems.append(f"dims must be 2 or 3, not {row['dims']!r}")
        return problems

    def _rows(self, ctx: RunContext) -> list[Any]:
        d = ctx.cfg["data"]
        stage = d["stage"]
        if stage in (None, ""):
            return list(ctx.rows)
        names = set((d["stages"] or {}).get(str(stage), []))
        rows = [r for r in ctx.rows if r["stage"] == str(stage) or (names and r["dataset"] in names)]
        if not rows:
            from trainers.engine import TrainError

            raise TrainError(f"data.stage={stage}: no manifest row belongs to it (stage column "
                             f"or datasets {sorted(names)})")
        return rows

    def prepare(self, ctx: RunContext) -> None:
        import sentencepiece as spm

        m = ctx.cfg["model"]
        tok = m["tokenizer"] or (Path(m["init"]) / "tokenizer.model" if m["init"] else None)
        vocab = None
        if tok is None and m["train_tokenizer"]:
            tok = ctx.out / "tokenizer.model"
            if ctx.dist.is_main and not Path(tok).is_file():
                from napari_medfm.models.radfm.testing import train_tokenizer

                texts = sorted({t for r in ctx.rows for t in (r["question"].replace("<image>", " "),
                                                              r["answer"])})
                tmp = ctx.out / ".tokenizer.model.tmp"
                train_tokenizer(texts, tmp, vocab_size=int(m["vocab_size"]))
                tmp.rename(tok)
            ctx.dist.barrier()
        if tok is None or not Path(tok).is_file():
            from napari_medfm.errors import WeightsError

            raise WeightsError(f"radfm: tokenizer {tok or '(none)'} not found: pass --tokenizer "
                               "tokenizer.model (LLaMA SentencePiece) or --init a RadFM folder")
        self.tokenizer_path = Path(tok)
        self.sp = spm.SentencePieceProcessor(model_file=str(tok))
        if m["train_tokenizer"] and not m["tokenizer"] and not m["init"]:
            vocab = self.sp.get_piece_size()
        self.model_cfg = _model_config(ctx.cfg, vocab)
        if self.sp.get_piece_size() > self.model_cfg.vocab_size:
            from napari_medfm.errors import WeightsError

            raise WeightsError(f"{tok} has {self.sp.get_piece_size()} pieces, more than the "
                               f"model's vocabulary {self.model_cfg.vocab_size}")
        lo = ctx.cfg["loss"]
        self.tagger = (make_tagger(lo["tagger"], lo["terms"]) if lo["mode"] == "weighted"
                       or lo["tagger"] == "dictionary" else None)
        if ctx.dist.world_size > 1 and ctx.micro_batch != 1:
            from trainers.engine import TrainError

            raise TrainError("radfm: with several processes each rank takes one group per "
                             "micro-step: set train.batch_size = world size x grad_accum")

    def build_dataset(self, ctx: RunContext) -> RadFMGroups:
        return RadFMGroups(self._rows(ctx), ctx.cfg, self.model_cfg, self.sp, self.tagger)

    def collate(self, samples: list[Any]) -> list[dict[str, Any]]:
        assert self.model_cfg is not None
        return [collate_group(g, self.model_cfg.pad_id) for g in samples]

    # ------------------------------------------------------------ model
    def build_model(self, ctx: RunContext) -> nn.Module:
        assert self.model_cfg is not None
        net = RadFMTrainNet(self.model_cfg)
        init = ctx.cfg["model"]["init"]
        if init:
            from napari_medfm.models.radfm.model import (
                _check_keys,
                _read_checkpoint,
                drop_unused_keys,
                find_checkpoint,
            )

            files = find_checkpoint(Path(init).expanduser())
            if not files:
                from napari_medfm.errors import WeightsError

                raise WeightsError(f"--init {init}: no pytorch_model.bin or *.safetensors")
            sd, _ = drop_unused_keys(_read_checkpoint(files))
            _check_keys({k: v.shape for k, v in net.state_dict().items()}, sd, files[0].name)
            net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        lo = ctx.cfg["lora"]
        if lo["enabled"]:
            from trainers.radfm_lora import apply_lora

            apply_lora(net, r=lo["r"], alpha=lo["alpha"], dropout=lo["dropout"],
                       target_modules=lo["target_modules"])
        return net

    def _llm(self, model: nn.Module) -> Any:
        lm = model.lang_model
        return lm.get_base_model() if hasattr(lm, "get_base_model") else lm

    def fsdp_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [*self._llm(model).model.layers,
                *[blk for pair in model.embedding_layer.vision_encoder.transformer.layers
                  for blk in pair]]

    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        for layer in self._llm(model).model.layers:
            activation_checkpoint(layer)
        for pair in model.embedding_layer.vision_encoder.transformer.layers:
            for blk in pair:
                activation_checkpoint(blk)

    # ------------------------------------------------------------ step
    def training_step(self, model: nn.Module, batch: list[dict[str, Any]], ctx: RunContext
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        mode = ctx.cfg["loss"]["mode"]
        losses, hf, wt = [], [], []
        tokens = 0
        dev = ctx.device
        for g in batch:
            logits = model(g["images"].to(dev), g["counts"], g["input_ids"].to(dev),
                           g["attention_mask"].to(dev))
            labels = g["labels"].to(dev)
            tokens += int(g["attention_mask"].sum())
            l_hf = hf_loss(logits, labels)
            l_w = weighted_loss(logits, labels, g["weights"].to(dev))
            losses.append(l_hf if mode == "hf" else l_w)
            hf.append(l_hf.detach())
            wt.append(l_w.detach())
        loss = torch.stack(losses).mean()
        return loss, {"loss_hf": torch.stack(hf).mean(), "loss_weighted": torch.stack(wt).mean(),
                      "dims": float(batch[0]["dims"]), "tokens": float(tokens)}

    # ------------------------------------------------------------ export
    def export(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        from napari_medfm.io.writers import atomic_write
        from trainers.engine.export import save_state_dict, write_json
        from trainers.radfm_lora import is_lora, merged_state_dict, save_adapters

        assert self.model_cfg is not None and self.tokenizer_path is not None
        out = ctx.export_dir
        out.mkdir(parents=True, exist_ok=True)
        lora = is_lora(model)
        sd = merged_state_dict(model) if lora else dict(model.state_dict())
        files: dict[str, str] = {}
        if ctx.cfg["export"]["format"] == "bin":
            save_state_dict(sd, out / "pytorch_model.bin")
            files["weights"] = "pytorch_model.bin"
        else:
            from napari_medfm.models.radfm.convert import _atomic_save

            _atomic_save({k: v.detach().cpu().float().contiguous().clone() for k, v in sd.items()},
                         out / "model.safetensors", {"format": "pt", "model": "radfm"})
            files["weights"] = "model.safetensors"
        write_json(self.model_cfg.to_dict(), out / "radfm_config.json")
        files["config"] = "radfm_config.json"
        data = self.tokenizer_path.read_bytes()
        atomic_write(out / "tokenizer.model", lambda tmp: tmp.write_bytes(data))
        files["tokenizer"] = "tokenizer.model"
        extra: dict[str, Any] = {}
        if lora:
            save_adapters(model, out / "adapters")
            files["adapters"] = "adapters/adapter_model.safetensors"
            extra["lora"] = {"merged_into": files["weights"], "adapters": "adapters/",
                             "base": ctx.cfg["model"]["init"]}
        shutil.rmtree(out / ".tmp", ignore_errors=True)
        return {"files": files, **extra,
                "load_with": f"napari_medfm.load_model('radfm', weights='{out}')"}


RECIPE = RadFMRecipe()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `medfm train radfm` (= `torchrun trainers/radfm.py`)."""
    add_engine_arguments(parser, RECIPE)


def main(args: argparse.Namespace) -> int:
    return run_cli(RECIPE, args)


if __name__ == "__main__":
    sys.exit(engine_main(RECIPE))
