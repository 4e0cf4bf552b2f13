"""MerMED-FM data: manifest, multi-crop augmentation, balanced modality sampling over all ranks.

Manifest: a CSV with columns ``image`` (path, relative to the CSV's folder or absolute) and
``modality`` (any name :func:`napari_medfm.models.encoder2d.canonical_modality` knows: CXR, fundus,
pathology, CT, OCT, ultrasound, dermatology, or a DICOM code). Images are read by the plugin's own
readers and mapped to [0, 1] RGB by its 2D preprocessing (CT windowing, robust scaling, grey ->
3 channels), then augmented on tensors.

Augmentation order per view (release): rotation (+-30 deg) -> random resized crop (bicubic;
global 224 / scale 0.2-1, local 96 / scale 0.05-0.2) -> horizontal flip -> colour jitter
(0.2, 0.2, 0.1, 0.02) with p 0.8 -> Gaussian blur sigma ~ U(0.1, 1.0) with p 1.0 (global 1),
0.1 (global 2), 0.5 (locals) -> per-modality mean/std. Every view's randomness comes from a
generator seeded by (seed, step, global sample position, view), so an epoch is reproducible
whatever the number of data-loader workers, and a resumed run sees the same crops.

Sampling (:class:`BalancedModalitySampler`): each modality has an endless stream, a fresh seeded
permutation of its samples per pass. The global batch of step s is the concatenation of the
ranks' local batches (rank order, *global* rank: the release passes the local rank, so on several
nodes the nodes train on the same data); rank r's local batch holds ``B_local // n_mod`` samples
of every modality plus ``B_local % n_mod`` extra ones of modalities drawn from (seed, step, r).
Streams are consumed in that global order, so no two ranks ever see the same stream position.
With ``B_local`` divisible by the number of modalities the global batch is independent of the
world size (1 process == 2 processes at the same global batch).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_medfm.errors import MedfmError
from napari_medfm.models import encoder2d
from trainers.mermed_core import _generator

# ---------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class Sample:
    path: str
    modality: str


def read_manifest(path: str | Path, *, required: tuple[str, ...] = ("image", "modality")
                  ) -> tuple[list[dict[str, str]], Path]:
    """Rows of a manifest CSV (paths made absolute against the CSV's folder)."""
    p = Path(path)
    if not p.is_file():
        raise MedfmError(f"{p}: manifest not found")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in required if c not in cols]
        if missing:
            raise MedfmError(f"{p.name}: manifest lacks column(s) {', '.join(missing)} "
                             f"(has {', '.join(cols)})")
        rows = [dict(r) for r in reader]
    if not rows:
        raise MedfmError(f"{p.name}: manifest has no rows")
    base = p.parent
    for i, r in enumerate(rows):
        img = (r.get("image") or "").strip()
        if not img:
            raise MedfmError(f"{p.name}: row {i + 2} has an empty image path")
        ip = Path(img)
        r["image"] = str(ip if ip.is_absolute() else base / ip)
    return rows, base


def check_row(row: Any) -> list[str]:
    """Problems of one MerMED manifest row (cheap: existence, reader sniffing, modality name)."""
    from napari_medfm import io

    problems = []
    if encoder2d.canonical_modality(row["modality"]) is None:
        problems.append(f"unknown modality {row['modality']!r} (known: "
                        f"{', '.join(encoder2d.MODALITY_NORMS)})")
    p = row.path("image")
    if not row["image"]:
        problems.append("empty image path")
    elif not p.exists():
        problems.append(f"file not found: {p}")
    elif not io.can_read(p):
        problems.append(f"not an image the plugin reads: {p.name}")
    return problems


def mermed_samples(path: str | Path) -> list[Sample]:
    """The manifest's training rows (split train/empty), validated by the engine's manifest
    checker: every bad row is reported at once, before anything is written."""
    from trainers.engine.manifest import validate_manifest

    rows = validate_manifest(path, ("image", "modality"), ("split",), check_row=check_row)
    return [Sample(str(r.path("image")), encoder2d.canonical_modality(r["modality"]))
            for r in rows]


def load_unit_rgb(path: str, modality: str, size: int) -> torch.Tensor:
    """``float32 (3, H, W)`` in [0, 1]: the plugin's reader + 2D intensity mapping, pre-reduced
    to about ``2 * size`` on the short side (no aspect change, no crop)."""
    from napari_medfm import io

    try:
        images = io.read(path, modality=modality)
    except TypeError:
        images = io.read(path)
    image = images[0]
    plane = encoder2d.select_plane(image, size=size, slice_index="middle")
    dtype = plane.dtype
    unit = encoder2d.to_unit(encoder2d.prereduce(plane, size),
                             ct=encoder2d._is_ct(image, modality), dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(encoder2d.to_rgb_chw(unit)))


# ---------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class CropSpec:
    global_size: int = 224
    local_size: int = 96
    n_local: int = 10
    global_scale: tuple[float, float] = (0.2, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.2)
    rotation: float = 30.0
    jitter: tuple[float, float, float, float] = (0.2, 0.2, 0.1, 0.02)
    jitter_p: float = 0.8
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, locals
    blur_sigma: tuple[float, float] = (0.1, 1.0)


def _view(img: torch.Tensor, size: int, scale: tuple[float, float], blur_p: float,
          spec: CropSpec, g: torch.Generator) -> torch.Tensor:
    """One augmented view in [0, 1] (release order), randomness from ``g`` only."""
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    def u(a: float = 0.0, b: float = 1.0) -> float:
        return float(a + (b - a) * torch.rand((), generator=g))

    angle = u(-spec.rotation, spec.rotation)
    x = TF.rotate(img, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)
    _, h, w = x.shape
    area = h * w
    top, left, ch, cw = 0, 0, h, w
    for _ in range(10):  # random resized crop: area scale, log-uniform aspect 3/4..4/3
        target = area * u(*scale)
        ratio = math.exp(u(math.log(3 / 4), math.log(4 / 3)))
        cw_ = int(round(math.sqrt(target * ratio)))
        ch_ = int(round(math.sqrt(target / ratio)))
        if 0 < cw_ <= w and 0 < ch_ <= h:
            top = int(torch.randint(0, h - ch_ + 1, (), generator=g))
            left = int(torch.randint(0, w - cw_ + 1, (), generator=g))
            ch, cw = ch_, cw_
            break
    x = TF.resized_crop(x, top, left, ch, cw, [size, size],
                        interpolation=InterpolationMode.BICUBIC, antialias=True).clamp_(0, 1)
    if u() < 0.5:
        x = TF.horizontal_flip(x)
    if u() < spec.jitter_p:
        b, c, s, hue = spec.jitter
        order = torch.randperm(4, generator=g).tolist()
        fb, fc, fs, fh = u(1 - b, 1 + b), u(1 - c, 1 + c), u(1 - s, 1 + s), u(-hue, hue)
        for k in order:
            if k == 0:
                x = TF.adjust_brightness(x, fb)
            elif k == 1:
                x = TF.adjust_contrast(x, fc)
            elif k == 2:
                x = TF.adjust_saturation(x, fs)
            else:
                x = TF.adjust_hue(x, fh)
    if u() < blur_p:
        sigma = u(*spec.blur_sigma)
        k = 2 * math.ceil(3 * spec.blur_sigma[1]) + 1
        x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    return x.clamp_(0, 1)


def multi_crop(img: torch.Tensor, modality: str, spec: CropSpec, seed: int) -> list[torch.Tensor]:
    """2 global + ``n_local`` local views, normalised with the modality's mean/std."""
    mean, std = encoder2d.norm_for(modality)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    views = []
    for v in range(2 + spec.n_local):
        g = _generator(seed, v, 0xC809)
        if v < 2:
            x = _view(img, spec.global_size, spec.global_scale, spec.blur_p[v], spec, g)
        else:
            x = _view(img, spec.local_size, spec.local_scale, spec.blur_p[2], spec, g)
        views.append((x - m) / s)
    return views


class MultiCropDataset(torch.utils.data.Dataset):
    """Item ``(index, view_seed)`` -> (list of views, modality id)."""

    def __init__(self, samples: list[Sample], modalities: list[str], spec: CropSpec):
        self.samples = samples
        self.modalities = modalities
        self.spec = spec

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
        idx, seed = key
        s = self.samples[idx]
        img = load_unit_rgb(s.path, s.modality, self.spec.global_size)
        return multi_crop(img, s.modality, self.spec, seed), self.modalities.index(s.modality)


def collate(batch: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    n_views = len(batch[0][0])
    views = [torch.stack([b[0][v] for b in batch]) for v in range(n_views)]
    return views, torch.tensor([b[1] for b in batch], dtype=torch.long)


# ---------------------------------------------------------------------------- sampler


class BalancedModalitySampler:
    """Per-step local batches of ``(sample index, view seed)`` keys (see the module docstring).

    ``rank`` must be the *global* rank. State = the step and every modality stream's position;
    :meth:`state_dict` / :meth:`load_state_dict` round-trip it. :meth:`batch` is deterministic in
    the state, so the keys of any step can be recomputed.
    """

    def __init__(self, modality_of: list[str], *, batch_size: int, rank: int, world_size: int,
                 seed: int = 0):
        self.mods = sorted(set(modality_of))
        self.index = {m: [i for i, x in enumerate(modality_of) if x == m] for m in self.mods}
        self.B = int(batch_size)
        self.rank = int(rank)
        self.world = int(world_size)
        self.seed = int(seed)
        self.step = 0
        self.pos = {m: 0 for m in self.mods}
        self.history: dict[int, dict[str, int]] = {}
        self._perm_cache: dict[tuple[str, int], list[int]] = {}

    # counts of every modality for every rank at ``step`` (identical on all ranks)
    def counts(self, step: int) -> list[list[str]]:
        n = len(self.mods)
        per, rem = divmod(self.B, n)
        out = []
        for r in range(self.world):
            seq = [m for _ in range(per) for m in self.mods]  # round robin
            if rem:
                g = _generator(self.seed, step, r, 0x5A3)
                extra = torch.randperm(n, generator=g)[:rem].tolist()
                seq += [self.mods[i] for i in sorted(extra)]
            out.append(seq)
        return out

    def _stream(self, m: str, p: int) -> int:
        items = self.index[m]
        epoch, k = divmod(p, len(items))
        key = (m, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            g = _generator(self.seed, self.mods.index(m), epoch, 0x57E)
            self._perm_cache[key] = torch.randperm(len(items), generator=g).tolist()
        return items[self._perm_cache[key][k]]

    def global_keys(self, step: int, pos: dict[str, int]) -> tuple[list[list[tuple[int, int]]],
                                                                   dict[str, int]]:
        """Every rank's keys at ``step`` from stream positions ``pos`` (and the new positions)."""
        pos = dict(pos)
        keys = []
        for r, seq in enumerate(self.counts(step)):
            mine = []
            for j, m in enumerate(seq):
                idx = self._stream(m, pos[m])
                pos[m] += 1
                gpos = r * self.B + j
                mine.append((idx, int(_generator(self.seed, step, gpos, 0xA06).initial_seed())))
            keys.append(mine)
        return keys, pos

    def batch(self) -> list[tuple[int, int]]:
        """This rank's keys for the current step; advances the state."""
        self.history[self.step] = dict(self.pos)
        for old in [k for k in self.history if k < self.step - 256]:
            del self.history[old]
        keys, self.pos = self.global_keys(self.step, self.pos)
        self.step += 1
        return keys[self.rank]

    def state_at(self, step: int) -> dict[str, Any]:
        """The state just before ``step`` was drawn (the loader may have drawn further ahead)."""
        if step == self.step:
            return self.state_dict()
        return {"step": step, "pos": dict(self.history[step]), "seed": self.seed,
                "mods": list(self.mods)}

    def __iter__(self):
        while True:
            yield self.batch()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "pos": dict(self.pos), "seed": self.seed, "mods": list(self.mods)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if list(sd["mods"]) != self.mods:
            raise MedfmError(f"sampler state is for modalities {sd['mods']}, data has {self.mods}")
        self.step = int(sd["step"])
        self.pos = {m: int(v) for m, v in sd["pos"].items()}
