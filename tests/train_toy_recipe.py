"""A tiny recipe exercising every engine feature (used by tests/test_train_engine.py).

Run: ``python tests/train_toy_recipe.py --data M.csv --out DIR`` or under torchrun.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainers.engine import Recipe, all_gather_with_grad, convert_batchnorm  # noqa: E402
from trainers.engine import main as engine_main  # noqa: E402


class _DS:
    def __init__(self, rows):
        self.x = [float(r["x"]) for r in rows]

    def __len__(self):
        return len(self.x)

    def get(self, i, rng):
        base = torch.arange(4, dtype=torch.float32) * self.x[i]
        noise = torch.from_numpy(rng.normal(size=4).astype(np.float32)) * 0.1
        return {"x": base + noise, "y": torch.tensor([self.x[i] * 0.5])}


class Toy(Recipe):
    name = "toy"
    required_columns = ("x",)
    presets = {"tiny": {"train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "save_every": 2,
                                  "progress": False, "tensorboard": False, "schedule": "cosine",
                                  "warmup_steps": 1},
                        "model": {"hidden": 8, "nan_at_step": 0, "dropout": 0.2,
                                  "sigterm_at_step": 0}}}

    def check_row(self, row, cfg):
        try:
            float(row["x"])
        except ValueError:
            return [f"x is not a number: {row['x']!r}"]
        return []

    def build_dataset(self, ctx):
        return _DS(ctx.rows)

    def build_model(self, ctx):
        h = ctx.cfg["model"]["hidden"]
        return convert_batchnorm(nn.Sequential(nn.Linear(4, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(),
                                               nn.Dropout(ctx.cfg["model"].get("dropout", 0.2)), nn.Linear(h, 1)))

    def fsdp_blocks(self, model):
        return [model[0], model[4]]

    def training_step(self, model, batch, ctx):
        pred = model(batch["x"])
        mse = ((pred - batch["y"]) ** 2).mean()
        g = all_gather_with_grad(pred)           # global-batch term
        spread = g.var()
        loss = mse + 0.1 * spread
        if ctx.cfg["model"]["sigterm_at_step"] == ctx.step + 1:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster pre-empting the job does
        nan_at = ctx.cfg["model"]["nan_at_step"]
        if nan_at and ctx.step + 1 == nan_at:
            loss = loss * float("nan")
        return loss, {"mse": mse.detach()}

    def export(self, model, ctx):
        from trainers.engine.export import save_state_dict

        save_state_dict(model.state_dict(), ctx.export_dir / "toy.pt")
        return {"files": {"weights": "toy.pt"}}


RECIPE = Toy()

if __name__ == "__main__":
    sys.exit(engine_main(RECIPE))
