"""RadFM training data: interleaved image-text samples and 2D/3D-separated batches.

A manifest row (columns ``images`` = paths separated by ``;``, ``question``, ``answer``,
optional ``stage``, ``dataset``, ``dims``) becomes one sample:

* images read with the plugin's readers and preprocessed by the plugin's RadFM preprocessing
  (2D: 512x512, [0, 1], depth 4; 3D: depth snapped to {4..64}, global min-max);
* tokens: BOS, then ``<image>`` + 32 image ids + ``</image>`` at each ``<image>`` marker of the
  question (or all images first), the question, the answer, EOS - built with the plugin's
  :func:`~napari_medfm.models.radfm.model.interleaved_ids`;
* labels: -100 on BOS/prompt/image tokens, the answer ids and EOS elsewhere;
* token weights for the ``weighted`` loss: 3 for answer tokens inside a tagged entity, 1 for
  other answer tokens and EOS, 0 elsewhere.

Batches: 2D and 3D samples are never mixed. :func:`make_groups` cuts the 2D samples into groups
of ``batch_2d`` and the 3D samples into groups of ``batch_3d`` (each kind shuffled with a seeded
generator); a group is the unit the engine's deterministic stream shuffles as a whole and strides
over ranks (the release's sampler, with a seeded generator instead of the global ``random``).
:class:`ModalityBatchSampler` is the same thing for a plain ``DataLoader`` (per-rank batches,
seeded per epoch, resumable from a batch position). In a 3D group every volume's depth is
resized (nearest) to the group's largest depth snapped to {4..64}, as the release's collator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Sample", "make_groups", "ModalityBatchSampler", "RadFMGroups", "encode_sample",
           "collate_group", "row_dims", "split_paths"]


def split_paths(value: str) -> list[str]:
    return [p.strip() for p in str(value).split(";") if p.strip()]


_VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".npy")


def row_dims(paths: Sequence[Path], declared: str = "") -> int:
    """2 or 3: the ``dims`` column when given, else from the images (volume formats -> 3)."""
    if declared.strip():
        d = int(declared)
        if d not in (2, 3):
            raise ValueError(f"dims must be 2 or 3, not {declared!r}")
        return d
    from napari_medfm.models.radfm.preprocess import image_dims

    kinds = set()
    for p in paths:
        name = p.name.lower()
        if name.endswith(_VOLUME_SUFFIXES):
            kinds.add(3)
        elif name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
            kinds.add(2)
        else:
            from napari_medfm import io

            kinds.add(image_dims(io.read(p)[0]))
    if len(kinds) != 1:
        raise ValueError("a sample mixes 2D and 3D images")
    return kinds.pop()


def make_groups(dims: Sequence[int], batch_2d: int, batch_3d: int, seed: int,
                drop_last: bool = False) -> list[list[int]]:
    """Indices cut into groups that never mix 2D and 3D (2D groups first, then 3D; the engine
    shuffles the groups). Seeded: the same groups for the same (dims, seed)."""
    rng = np.random.default_rng([int(seed), 0x52AD])
    groups: list[list[int]] = []
    for kind, size in ((2, batch_2d), (3, batch_3d)):
        idx = [i for i, d in enumerate(dims) if d == kind]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        for s in range(0, len(idx), size):
            g = idx[s:s + size]
            if len(g) == size or (g and not drop_last):
                groups.append(g)
    return groups


class ModalityBatchSampler(torch.utils.data.Sampler):
    """Per-rank batches of sample indices that never mix 2D and 3D.

    Per epoch the groups of :func:`make_groups` are permuted with ``default_rng([seed, epoch])``
    and strided over ranks (rank r takes groups r, r + W, ...; the tail that does not fill all
    ranks is dropped so every rank takes as many steps). ``start`` (a batch position of this
    rank within the epoch, e.g. from a checkpoint) resumes exactly there.
    """

    def __init__(self, dims: Sequence[int], batch_2d: int, batch_3d: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, epoch: int = 0, start: int = 0) -> None:
        self.groups = make_groups(dims, batch_2d, batch_3d, seed)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world_size)
        self.epoch, self.start = int(epoch), int(start)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return len(self.groups) // self.world - self.start

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))
        per_rank = len(self.groups) // self.world
        for k in range(self.start, per_rank):
            yield list(self.groups[int(order[k * self.world + self.rank])])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}


@dataclass
class Sample:
    images: list[torch.Tensor]          # [3, H, W, D] each
    input_ids: list[int]
    labels: list[int]
    weights: list[float]
    dims: int


def encode_sample(cfg: Any, sp: Any, question: str, answer: str, n_images: int,
                  tagger: Callable[[str], list[tuple[int, int]]] | None,
                  max_length: int, entity_weight: float = 3.0
                  ) -> tuple[list[int], list[int], list[float]]:
    """(input_ids, labels, weights) of one sample (see the module docstring)."""
    from napari_medfm.models.radfm.model import interleaved_ids
    from trainers.radfm_loss import token_weights

    prompt = interleaved_ids(cfg, lambda t: list(sp.encode(t)), question, n_images)
    proto = sp.encode(answer.strip(), return_type="proto")
    ans = [p.id for p in proto.pieces]
    offsets = [(p.begin, p.end) for p in proto.pieces]
    spans = tagger(answer.strip()) if tagger is not None else []
    w_ans = token_weights(offsets, spans, entity_weight) if tagger is not None else [1.0] * len(ans)
    ids = prompt + ans + [cfg.eos_id]
    labels = [-100] * len(prompt) + ans + [cfg.eos_id]
    weights = [0.0] * len(prompt) + w_ans + [1.0]
    if len(prompt) >= max_length:
        raise ValueError(f"the prompt alone has {len(prompt)} tokens (max_length {max_length})")
    return ids[:max_length], labels[:max_length], weights[:max_length]


def _resize_depth(t: torch.Tensor, depth: int) -> torch.Tensor:
    if t.shape[-1] == depth:
        return t
    return F.interpolate(t[None], size=(*t.shape[1:3], depth), mode="nearest")[0]


def collate_group(samples: Sequence[Sample], pad_id: int, max_depth: int = 64) -> dict[str, Any]:
    """One homogeneous group -> tensors: ``images [N, 3, H, W, D]`` (all images of the group,
    sample order), ``counts [B]``, right-padded ``input_ids``/``labels``/``weights``/mask."""
    from napari_medfm.models.radfm.preprocess import snap_depth

    if len({s.dims for s in samples}) != 1:
        raise ValueError("a batch mixes 2D and 3D samples")
    imgs = [im for s in samples for im in s.images]
    if samples[0].dims == 3:
        depth = snap_depth(max(im.shape[-1] for im in imgs), max_depth)
        imgs = [_resize_depth(im, depth) for im in imgs]
    n = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), -100, dtype=torch.long)
    weights = torch.zeros((len(samples), n), dtype=torch.float32)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for i, s in enumerate(samples):
        L = len(s.input_ids)
        ids[i, :L] = torch.tensor(s.input_ids)
        labels[i, :L] = torch.tensor(s.labels)
        weights[i, :L] = torch.tensor(s.weights)
        mask[i, :L] = 1
    return {"images": torch.stack(imgs), "counts": torch.tensor([len(s.images) for s in samples]),
            "input_ids": ids, "labels": labels, "weights": weights, "attention_mask": mask,
            "dims": samples[0].dims}


class RadFMGroups:
    """The engine dataset: item ``i`` is group ``i`` (a list of samples of one kind)."""

    def __init__(self, rows: Sequence[Any], cfg: dict[str, Any], model_cfg: Any, sp: Any,
                 tagger: Callable[[str], list[tuple[int, int]]] | None) -> None:
        d = cfg["data"]
        self.rows = list(rows)
        self.model_cfg, self.sp, self.tagger = model_cfg, sp, tagger
        self.image_size = int(model_cfg.vision.image_size)
        self.max_depth = int(d["max_depth"])
        self.max_length = int(d["max_length"])
        self.entity_weight = float(cfg["loss"]["entity_weight"])
        self.paths = [[r.base / p if not Path(p).is_absolute() else Path(p)
                       for p in split_paths(r["images"])] for r in self.rows]
        self.dims = [row_dims(p, r["dims"]) for p, r in zip(self.paths, self.rows, strict=True)]
        self.groups = make_groups(self.dims, int(d["batch_2d"]), int(d["batch_3d"]),
                                  int(cfg["train"]["seed"]))
        self._cache: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.groups)

    def _image(self, path: Path) -> torch.Tensor:
        key = str(path)
        t = self._cache.get(key)
        if t is None:
            from napari_medfm import io
            from napari_medfm.models.radfm.preprocess import preprocess_image

            t = preprocess_image(io.read(path)[0], image_size=self.image_size,
                                 max_depth=self.max_depth)
            if len(self._cache) < 256:
                self._cache[key] = t
        return t

    def sample(self, i: int) -> Sample:
        r = self.rows[i]
        ids, labels, weights = encode_sample(
            self.model_cfg, self.sp, r["question"], r["answer"], len(self.paths[i]),
            self.tagger, self.max_length, self.entity_weight)
        return Sample([self._image(p) for p in self.paths[i]], ids, labels, weights,
                      self.dims[i])

    def get(self, index: int, rng: np.random.Generator) -> list[Sample]:
        return [self.sample(i) for i in self.groups[index]]
