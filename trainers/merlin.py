"""Merlin pretraining (I3D ResNet + Clinical-Longformer, InfoNCE + phenotype BCE), on the engine.

    medfm train merlin --data MANIFEST.csv --out DIR [--preset tiny|paper] [--config FILE]
                       [--max-steps N] [--save-every N] [--seed S] [--resume]
    torchrun --nproc_per_node 8 trainers/merlin.py --data MANIFEST.csv --out DIR --preset paper

Manifest columns: image (NIfTI/NRRD/MHA file or DICOM series folder), report (findings text),
phecodes (';'-separated, may be empty), optional split (rows with split "train" or empty train).
Output: DIR/checkpoints/step-N/, DIR/metrics.csv, DIR/config.yaml, DIR/export/<the released CLIP
file name> (+ merlin_config.json, tokenizer files, model_card.json) - the export opens with
`medfm embed --model merlin --weights DIR/export/<file>` and the Findings dock.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if __name__ == "__main__" and __package__ in (None, ""):  # `torchrun trainers/merlin.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import nn

from trainers.engine import (
    Recipe,
    RunContext,
    activation_checkpoint,
    add_engine_arguments,
    convert_batchnorm,
    image_readable,
    run_cli,
)
from trainers.engine import main as engine_main
from trainers.merlin_lib import phecodes as P
from trainers.merlin_lib.losses import MAX_LOGIT_SCALE, info_nce, phenotype_bce
from trainers.merlin_lib.sections import choose_text

log = logging.getLogger("trainers.merlin")

__all__ = ["MerlinRecipe", "MerlinTrainNet", "RECIPE", "add_arguments", "main", "PRESETS",
           "image_config", "text_config", "preprocess_config"]

TEXT_FULL = {"vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 4098, "attention_window": 512, "max_length": 1024,
             "dropout": 0.1}

PRESETS: dict[str, dict[str, Any]] = {
    # a few CTs on a laptop CPU in minutes; also the tests' preset
    "tiny": {
        "train": {"max_steps": 20, "batch_size": 2, "lr": 1e-3, "weight_decay": 0.01,
                  "warmup_steps": 0, "schedule": "constant", "save_every": 10, "keep_last": 2,
                  "grad_clip": 1.0},
        "model": {
            "image": {"layers": [1, 1, 1, 1], "widths": [4, 8, 8, 16], "expansion": 4,
                      "init": "random", "torchvision_weights": None, "batchnorm": "global"},
            "text": {"vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "intermediate_size": 64,
                     "max_position_embeddings": 514, "attention_window": 16, "max_length": 256,
                     "dropout": 0.1, "pretrained": None, "tokenizer": None,
                     "train_tokenizer": True},
            "logit_scale_init": 1.0,
        },
        "data": {"pixdim": [12.0, 12.0, 12.0], "spatial_size": [32, 32, 32], "cache": True,
                 "report_sections": False, "p_section": 0.5, "validate_full": False},
        "loss": {"stage1_fraction": 0.5, "stage1": {"contrastive": 1.0, "phenotype": 1.0},
                 "stage2": {"contrastive": 1.0, "phenotype": 0.1}},
    },
    # Merlin as published: ResNet-152 inflated from ImageNet, Clinical-Longformer, batch 18 on
    # one GPU, bf16 + gradient checkpointing. The paper does not publish lr/schedule/steps:
    # these are our choices (documented in docs/training.md).
    "paper": {
        "train": {"max_steps": 85200, "batch_size": 18, "lr": 1e-5, "min_lr": 1e-7,
                  "weight_decay": 0.05, "warmup_steps": 1000, "schedule": "cosine",
                  "save_every": 2000, "keep_last": 3, "grad_clip": 1.0, "precision": "bf16",
                  "grad_checkpointing": True, "num_workers": 4},
        "model": {
            "image": {"layers": [3, 8, 36, 3], "widths": [64, 128, 256, 512], "expansion": 4,
                      "init": "imagenet", "torchvision_weights": "torchvision",
                      "batchnorm": "global"},
            "text": {**TEXT_FULL, "pretrained": "yikuan8/Clinical-Longformer",
                     "tokenizer": None, "train_tokenizer": False},
            "logit_scale_init": 1.0,
        },
        "data": {"pixdim": [1.5, 1.5, 3.0], "spatial_size": [224, 224, 160], "cache": False,
                 "report_sections": False, "p_section": 0.5, "validate_full": False},
        "loss": {"stage1_fraction": 0.8, "stage1": {"contrastive": 1.0, "phenotype": 1.0},
                 "stage2": {"contrastive": 1.0, "phenotype": 0.1}},
    },
}


# ---------------------------------------------------------------------------------- configs
def image_config(cfg: Mapping[str, Any]) -> Any:
    from napari_medfm.models.merlin.network import MerlinImageConfig

    m = cfg["model"]["image"]
    return MerlinImageConfig(layers=tuple(m["layers"]), widths=tuple(m["widths"]),
                             expansion=int(m["expansion"]), n_phenotypes=P.N_OUTPUTS,
                             contrastive_dim=512)


def text_config(cfg: Mapping[str, Any]) -> Any:
    from napari_medfm.models.merlin.text import MerlinTextConfig

    t = cfg["model"]["text"]
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "attention_window", "max_length",
            "dropout")
    return MerlinTextConfig(**{k: t[k] for k in keys})


def preprocess_config(cfg: Mapping[str, Any]) -> Any:
    from napari_medfm.models.merlin.preprocess import PreprocessConfig

    d = cfg["data"]
    return PreprocessConfig(pixdim=tuple(float(v) for v in d["pixdim"]),
                            spatial_size=tuple(int(v) for v in d["spatial_size"]))


# ---------------------------------------------------------------------------------- network
def _clip_base() -> type:
    from napari_medfm.models.merlin.model import MerlinCLIP

    return MerlinCLIP


class MerlinTrainNet(nn.Module):
    """Merlin's CLIP model with a training forward. ``state_dict()`` has exactly the released
    checkpoint's keys (``logit_scale``, ``encode_image.i3_resnet.*``, ``encode_text.*``)."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        from napari_medfm.models.merlin.network import I3DResNet
        from napari_medfm.models.merlin.text import MerlinTextEncoder

        clip = _clip_base()(I3DResNet(image_config(cfg)), MerlinTextEncoder(text_config(cfg)))
        self.logit_scale = clip.logit_scale
        self.encode_image = clip.encode_image
        self.encode_text = clip.encode_text
        with torch.no_grad():
            self.logit_scale.fill_(float(cfg["model"]["logit_scale_init"]))
        # in the released layout but unused by Merlin's text feature (CLS of the last hidden
        # state, no global attention mask): the pooler and the global-attention projections
        for name, p in self.encode_text.text_encoder.named_parameters():
            if name.startswith("pooler.") or "_global." in name:
                p.requires_grad_(False)

    @property
    def image(self) -> nn.Module:
        return self.encode_image.i3_resnet

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.image(image)
        return {"image": out["contrastive_embedding"],
                "image_embedding": out["image_embedding"],
                "phenotype_logits": out["phenotype_logits"],
                "text": self.encode_text(input_ids, attention_mask),
                "logit_scale": self.logit_scale}


def _init_text(net: MerlinTrainNet, source: str) -> None:
    """Load a pretrained Longformer (a local folder, or a Hugging Face id already in the local
    cache) into the text tower; the 768->512 projection stays freshly initialised."""
    from transformers import LongformerModel

    from napari_medfm.errors import WeightsError

    try:
        pre = LongformerModel.from_pretrained(source, local_files_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot load the text tower's initial weights from {source!r} "
                           f"({exc}); pass a local Clinical-Longformer folder with --text-weights "
                           "or set model.text.pretrained=null (random init)") from None
    sd = pre.state_dict()
    missing, unexpected = net.encode_text.text_encoder.load_state_dict(sd, strict=False)
    bad = [k for k in missing if "position_ids" not in k]
    if bad or [k for k in unexpected if "position_ids" not in k]:
        raise WeightsError(f"{source}: does not fit the text tower (missing {bad[:5]}, "
                           f"unexpected {list(unexpected)[:5]})")


def _init_image(net: MerlinTrainNet, source: str) -> None:
    from trainers.merlin_lib.inflate import inflate_state_dict, load_torchvision_state_dict

    target = net.image.state_dict()
    inflated = inflate_state_dict(load_torchvision_state_dict(source), target)
    missing, unexpected = net.image.load_state_dict(inflated, strict=False)
    assert not unexpected and all(k.startswith(("classifier.", "contrastive_head."))
                                  for k in missing), (missing, unexpected)


# ---------------------------------------------------------------------------------- data
class MerlinDataset:
    """Manifest rows -> (preprocessed CT, report text, expanded phenotype targets)."""

    def __init__(self, rows: Any, cfg: Mapping[str, Any]) -> None:
        self.rows = list(rows)
        self.pre = preprocess_config(cfg)
        d = cfg["data"]
        self.cache_on = bool(d["cache"])
        self.sections, self.p_section = bool(d["report_sections"]), float(d["p_section"])
        self._cache: dict[int, torch.Tensor] = {}
        self._targets = [torch.from_numpy(P.targets(P.parse_codes(r["phecodes"])))
                         for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        """The plugin's Merlin preprocessing (models/merlin/preprocess.py) of row ``i``."""
        x = self._cache.get(i)
        if x is None:
            from napari_medfm import io
            from napari_medfm.models.merlin.preprocess import preprocess

            img = io.read(self.rows[i].path("image"))[0]
            x = preprocess(img, self.pre).tensor
            if self.cache_on:
                self._cache[i] = x
        return x

    def get(self, i: int, rng: np.random.Generator) -> dict[str, Any]:
        # no image augmentation: the public Merlin release documents none
        return {"image": self.image(i),
                "text": choose_text(self.rows[i]["report"], rng, self.sections, self.p_section),
                "phenotypes": self._targets[i]}


# ---------------------------------------------------------------------------------- recipe
class MerlinRecipe(Recipe):
    name = "merlin"
    description = (__doc__ or "").strip()
    presets = PRESETS
    default_preset = "tiny"
    required_columns = ("image", "report", "phecodes")
    optional_columns = ("split",)

    def __init__(self) -> None:
        self.tokenizer: Any = None
        self.tokenizer_dir: Path | None = None

    # ------------------------------------------------------------ command line
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("merlin")
        g.add_argument("--torchvision-weights", default=None, metavar="PATH",
                       help="torchvision ResNet-152 state dict to inflate into the image tower "
                            "('torchvision' = ImageNet weights from the torch hub cache)")
        g.add_argument("--text-weights", default=None, metavar="DIR",
                       help="pretrained Longformer (Clinical-Longformer folder or cached HF id)")
        g.add_argument("--tokenizer", default=None, metavar="DIR",
                       help="tokenizer folder (vocab.json + merges.txt)")
        g.add_argument("--report-sections", action="store_true", default=None,
                       help="alternate full reports with single anatomical sections")

    def flags_to_config(self, args: argparse.Namespace) -> dict[str, Any]:
        out: dict[str, Any] = {"model.text.pretrained": getattr(args, "text_weights", None),
                               "model.text.tokenizer": getattr(args, "tokenizer", None),
                               "data.report_sections": getattr(args, "report_sections", None)}
        tv = getattr(args, "torchvision_weights", None)
        if tv:
            out["model.image.torchvision_weights"] = tv
            out["model.image.init"] = "imagenet"
        return out

    # ------------------------------------------------------------ data
    def check_row(self, row: Any, cfg: Mapping[str, Any]) -> list[str]:
        problems = []
        if not row["image"]:
            problems.append("empty image path")
        else:
            why = image_readable(row.path("image"), full=bool(cfg["data"]["validate_full"]))
            if why:
                problems.append(why)
        if not row["report"].strip():
            problems.append("empty report")
        try:
            codes = P.parse_codes(row["phecodes"])
        except ValueError as exc:
            problems.append(str(exc))
        else:
            unknown = P.unknown_codes(codes)
            if unknown:
                problems.append(f"unknown phecode(s) {', '.join(unknown[:5])}")
        return problems

    def prepare(self, ctx: RunContext) -> None:
        from napari_medfm.models.merlin.text import find_tokenizer_dir, load_tokenizer

        t = ctx.cfg["model"]["text"]
        if t["tokenizer"]:
            folder = find_tokenizer_dir(t["tokenizer"])
        elif t["train_tokenizer"]:  # tiny preset: a BPE trained on the manifest's reports
            folder = ctx.out / "tokenizer"
            if ctx.dist.is_main and not (folder / "vocab.json").is_file():
                from napari_medfm.models.merlin.testing import train_tokenizer
                from napari_medfm.models.merlin.text import sanitize_report

                corpus = sorted({sanitize_report(r["report"]) for r in ctx.rows})
                tmp = ctx.out / ".tokenizer-tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                train_tokenizer(tmp, vocab_size=int(t["vocab_size"]), corpus=corpus)
                tmp.rename(folder)
            ctx.dist.barrier()
        else:
            folder = find_tokenizer_dir(None)
        self.tokenizer_dir = Path(folder)
        self.tokenizer = load_tokenizer(folder, int(t["max_length"]))
        if len(self.tokenizer) > int(t["vocab_size"]):
            from napari_medfm.errors import WeightsError

            raise WeightsError(f"tokenizer in {folder} has {len(self.tokenizer)} tokens, more "
                               f"than model.text.vocab_size={t['vocab_size']}")
        self._window = int(t["attention_window"])
        self._max_length = int(t["max_length"])

    def build_dataset(self, ctx: RunContext) -> MerlinDataset:
        return MerlinDataset(ctx.rows, ctx.cfg)

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        from napari_medfm.models.merlin.text import tokenize

        enc = tokenize(self.tokenizer, [s["text"] for s in samples], self._max_length,
                       pad_to_multiple_of=self._window)
        return {"image": torch.stack([s["image"] for s in samples]),
                "phenotypes": torch.stack([s["phenotypes"] for s in samples]), **enc}

    # ------------------------------------------------------------ model
    def build_model(self, ctx: RunContext) -> nn.Module:
        cfg = ctx.cfg
        net = MerlinTrainNet(cfg)
        if cfg["model"]["image"]["init"] == "imagenet":
            _init_image(net, cfg["model"]["image"]["torchvision_weights"] or "torchvision")
        elif cfg["model"]["image"]["init"] != "random":
            raise ValueError("model.image.init must be random or imagenet")
        if cfg["model"]["text"]["pretrained"]:
            _init_text(net, cfg["model"]["text"]["pretrained"])
        bn = cfg["model"]["image"].get("batchnorm", "global")
        if bn == "global":  # statistics over the global batch, on gloo and nccl alike
            convert_batchnorm(net)
        elif bn != "local":  # local: each rank's own batch (no all-reduce; ranks differ)
            raise ValueError("model.image.batchnorm must be global or local")
        return net

    def fsdp_blocks(self, model: nn.Module) -> list[nn.Module]:
        img = model.encode_image.i3_resnet
        blocks = [b for i in range(1, 5) for b in getattr(img, f"layer{i}")]
        return blocks + list(model.encode_text.text_encoder.encoder.layer)

    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        # as upstream: every bottleneck of layer1..4, and the Longformer's own checkpointing
        img = model.encode_image.i3_resnet
        for i in range(1, 5):
            for b in getattr(img, f"layer{i}"):
                activation_checkpoint(b)
        model.encode_text.text_encoder.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------ step
    @staticmethod
    def stage_weights(cfg: Mapping[str, Any], step: int, max_steps: int) -> tuple[int, float, float]:
        """(stage, contrastive weight, phenotype weight) at optimizer step ``step`` (0-based)."""
        loss = cfg["loss"]
        stage = 1 if step < int(round(float(loss["stage1_fraction"]) * max_steps)) else 2
        w = loss[f"stage{stage}"]
        return stage, float(w["contrastive"]), float(w["phenotype"])

    def training_step(self, model: nn.Module, batch: dict[str, Any], ctx: RunContext
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["image"], batch["input_ids"], batch["attention_mask"])
        l_clip, acc = info_nce(out["image"], out["text"], out["logit_scale"])
        l_phe = phenotype_bce(out["phenotype_logits"], batch["phenotypes"])
        stage, wc, wp = self.stage_weights(ctx.cfg, ctx.step, ctx.max_steps)
        loss = wc * l_clip + wp * l_phe
        return loss, {"contrastive": l_clip.detach(), "phenotype": l_phe.detach(),
                      "clip_acc": acc, "stage": float(stage),
                      "logit_scale": out["logit_scale"].detach().float()}

    def after_optimizer_step(self, model: nn.Module, ctx: RunContext) -> None:
        with torch.no_grad():  # CLIP's clamp of the learnable temperature
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    # ------------------------------------------------------------ export
    def export(self, model: nn.Module, ctx: RunContext) -> dict[str, Any]:
        from napari_medfm.models.merlin.model import EXPORT_CONFIG
        from napari_medfm.models.merlin.spec import CLIP_CHECKPOINT
        from trainers.engine.export import save_state_dict, write_json

        out = ctx.export_dir
        out.mkdir(parents=True, exist_ok=True)
        save_state_dict(model.state_dict(), out / CLIP_CHECKPOINT)
        pre = preprocess_config(ctx.cfg).to_dict()
        pre.pop("chain", None)
        write_json({"weights": CLIP_CHECKPOINT, "image": image_config(ctx.cfg).to_dict(),
                    "text": text_config(ctx.cfg).to_dict(), "preprocess": pre},
                   out / EXPORT_CONFIG)
        files = {"weights": CLIP_CHECKPOINT, "config": EXPORT_CONFIG}
        assert self.tokenizer_dir is not None
        for name in ("vocab.json", "merges.txt"):
            src = self.tokenizer_dir / name
            if src.is_file():
                data = src.read_bytes()
                from napari_medfm.io.writers import atomic_write

                atomic_write(out / name, lambda tmp, data=data: tmp.write_bytes(data))
                files[name] = name
        return {"files": files,
                "load_with": f"medfm embed --model merlin --weights {out / CLIP_CHECKPOINT}"}


RECIPE = MerlinRecipe()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `medfm train merlin` (= `torchrun trainers/merlin.py`)."""
    add_engine_arguments(parser, RECIPE)


def main(args: argparse.Namespace) -> int:
    return run_cli(RECIPE, args)


if __name__ == "__main__":
    sys.exit(engine_main(RECIPE))
