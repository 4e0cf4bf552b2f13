"""MerMED-FM recipe, the math: schedules, EMA teacher, memory bank, block partition, masked loss.

Everything here is written from the equations of ``shared/specs/mermed-fm.md`` (no upstream code):

* schedules (closed forms, functions of the global step, so a resumed run gets the same values):
  lr = linear warm-up 0 -> base, then cosine base -> final; weight decay cosine 0.04 -> 0.4;
  teacher momentum cosine m0 -> 1; teacher temperature linear 0.04 -> 0.07 over its warm-up;
* EMA: theta_t <- m theta_t + (1 - m) theta_s over parameters only (buffers are not averaged);
* :class:`MemoryBank`: K slots (dim x K) of unit vectors with a modality label per slot, initialised
  to random unit vectors with label -1; FIFO push of the all-gathered teacher embeddings (rank order);
  modality masking switches on only once no label is -1;
* :func:`partition`: a permutation of the K slots cut into P equal blocks, derived from (seed, step)
  only, hence identical on every rank and after a resume;
* :func:`mermed_loss`: the 22-pair block loss with a masked softmax that gives loss 0 *and* gradient
  0 on a block row without any same-modality slot (the release's backward gives NaN there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- schedules


def cosine(step: int, total: int, start: float, end: float) -> float:
    """``end + (start - end) * (1 + cos(pi * step / total)) / 2`` (constant ``end`` after ``total``)."""
    if total <= 0 or step >= total:
        return float(end)
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * step / total)))


def lr_at(step: int, *, base: float, final: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to ``base`` over ``warmup`` steps, then cosine to ``final``."""
    if step < warmup:
        return float(base * step / warmup)
    return cosine(step - warmup, max(1, total - warmup), base, final)


def wd_at(step: int, *, start: float, end: float, total: int) -> float:
    return cosine(step, total, start, end)


def momentum_at(step: int, *, start: float, total: int) -> float:
    """Teacher momentum: cosine from ``start`` (0.9995 in the release) to 1."""
    return cosine(step, total, start, 1.0)


def teacher_temp_at(step: int, *, start: float, end: float, warmup: int) -> float:
    """Teacher temperature: linear ``start`` -> ``end`` over ``warmup`` steps, then ``end``."""
    if warmup <= 0 or step >= warmup:
        return float(end)
    return float(start + (end - start) * step / warmup)


# ---------------------------------------------------------------------------- EMA


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, m: float) -> None:
    """``t <- m t + (1 - m) s`` for every parameter (matched by name); buffers untouched."""
    s_params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        s = s_params[name]
        t.mul_(m).add_(s.detach().to(t.dtype), alpha=1.0 - m)


# ---------------------------------------------------------------------------- memory bank


def _generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (stable across processes and runs)."""
    seed = 0x9E3779B97F4A7C15
    for k in keys:
        seed = (seed * 6364136223846793005 + int(k) + 1442695040888963407) % (2 ** 63)
    return torch.Generator().manual_seed(seed)


class MemoryBank:
    """FIFO queue of ``K`` unit vectors (stored ``K x dim``) with one modality label per slot.

    Labels start at -1 (the slots hold random unit vectors); :attr:`full` becomes true once every
    slot has been written, and only then does :meth:`mask` exclude other modalities.
    """

    def __init__(self, size: int, dim: int, *, seed: int = 0, device: Any = "cpu"):
        self.size = int(size)
        self.dim = int(dim)
        g = _generator(seed, 0xBA4C)
        q = torch.randn(self.size, self.dim, generator=g)
        self.queue = F.normalize(q, dim=1).to(device)
        self.labels = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.ptr = 0

    @property
    def full(self) -> bool:
        return bool((self.labels >= 0).all())

    @torch.no_grad()
    def push(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        """Write ``emb`` (G x dim, already all-gathered in rank order) at the pointer, FIFO."""
        n = emb.shape[0]
        if self.size % n:
            raise ValueError(f"memory size {self.size} is not divisible by the global batch {n}")
        self.queue[self.ptr:self.ptr + n] = F.normalize(emb.detach().float(), dim=1).to(self.queue)
        self.labels[self.ptr:self.ptr + n] = labels.to(self.labels)
        self.ptr = (self.ptr + n) % self.size

    def mask(self, sample_labels: torch.Tensor) -> torch.Tensor | None:
        """``B x K`` bool (True = slot usable) once full; None (everything usable) before."""
        if not self.full:
            return None
        return sample_labels.view(-1, 1).to(self.labels.device) == self.labels.view(1, -1)

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.detach().cpu().clone(), "labels": self.labels.cpu().clone(),
                "ptr": torch.tensor(self.ptr)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if tuple(sd["queue"].shape) != (self.size, self.dim):
            raise ValueError(f"memory bank shape {tuple(sd['queue'].shape)} != "
                             f"{(self.size, self.dim)}")
        self.queue.copy_(sd["queue"])
        self.labels.copy_(sd["labels"])
        self.ptr = int(sd["ptr"])


def partition(size: int, blocks: int, *, seed: int, step: int) -> torch.Tensor:
    """``blocks x (size // blocks)`` slot indices: a random permutation from (seed, step)."""
    if size % blocks:
        raise ValueError(f"memory size {size} is not divisible into {blocks} blocks")
    perm = torch.randperm(size, generator=_generator(seed, step, 0x9A27))
    return perm.view(blocks, size // blocks)


# ---------------------------------------------------------------------------- loss


def masked_log_softmax(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """(log-probabilities with 0 at invalid entries, the valid mask) along the last axis.

    Finite for every input, including rows without any valid entry (all terms 0 there): no
    ``-inf`` is ever formed, so no ``0 * inf`` can appear in the backward pass either.
    """
    x = x.float()
    if valid is None:
        valid = torch.ones_like(x, dtype=torch.bool)
    any_valid = valid.any(dim=-1, keepdim=True)
    neg = torch.finfo(x.dtype).min
    m = torch.where(valid, x, torch.full_like(x, neg)).amax(dim=-1, keepdim=True).detach()
    m = torch.where(any_valid, m, torch.zeros_like(m))
    shifted = torch.where(valid, x - m, torch.zeros_like(x))
    e = torch.where(valid, shifted.exp(), torch.zeros_like(x))
    s = e.sum(dim=-1, keepdim=True)
    lse = torch.where(any_valid, s, torch.ones_like(s)).log()
    logp = torch.where(valid, shifted - lse, torch.zeros_like(x))
    return logp, valid


def block_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        blocks: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over (block, sample) rows of ``-sum softmax(t) log softmax(s)`` within each block.

    ``*_logits`` are ``B x K`` (already divided by their temperatures); ``blocks`` is ``P x K/P``;
    ``valid`` ``B x K`` or None. Fully masked rows count in the mean with loss 0.
    """
    s = student_logits[:, blocks]  # B x P x K/P
    t = teacher_logits[:, blocks]
    v = None if valid is None else valid[:, blocks]
    logp_s, v_s = masked_log_softmax(s, v)
    logp_t, _ = masked_log_softmax(t.detach(), v)
    p_t = torch.where(v_s, logp_t.exp(), torch.zeros_like(logp_t))
    row = -(p_t * logp_s).sum(dim=-1)  # B x P
    return row.mean()


def mermed_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                queue: torch.Tensor, blocks: torch.Tensor, valid: torch.Tensor | None, *,
                tau_s: float, tau_t: float) -> torch.Tensor:
    """The MerMED loss: mean over the pairs (g, v), g in the teacher's global views, v != g.

    ``student``: one ``B x dim`` L2-normalised embedding per view (globals first); ``teacher``: one
    per global view; ``queue``: ``K x dim`` (the bank *before* this step's push).
    """
    q = queue.detach()
    s_logits = [(z.float() @ q.t().float()) / tau_s for z in student]
    t_logits = [(z.detach().float() @ q.t().float()) / tau_t for z in teacher]
    total = student[0].new_zeros((), dtype=torch.float32)
    n = 0
    for g, tl in enumerate(t_logits):
        for v, sl in enumerate(s_logits):
            if v == g:
                continue
            total = total + block_cross_entropy(sl, tl, blocks, valid)
            n += 1
    return total / n


def mermed_loss_reference(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                          queue: torch.Tensor, blocks: torch.Tensor, sample_labels: torch.Tensor,
                          slot_labels: torch.Tensor, full: bool, *, tau_s: float,
                          tau_t: float) -> float:
    """Straightforward loop re-computation of :func:`mermed_loss` (tests only; float64)."""
    total, n = 0.0, 0
    q = queue.double()
    for g, zt in enumerate(teacher):
        for v, zs in enumerate(student):
            if v == g:
                continue
            acc, rows = 0.0, 0
            for blk in blocks.tolist():
                for b in range(zs.shape[0]):
                    slots = [k for k in blk if not full or int(slot_labels[k]) == int(sample_labels[b])]
                    rows += 1
                    if not slots:
                        continue
                    a = torch.stack([zs[b].double() @ q[k] for k in slots]) / tau_s
                    c = torch.stack([zt[b].double() @ q[k] for k in slots]) / tau_t
                    acc += float(-(torch.softmax(c, 0) * torch.log_softmax(a, 0)).sum().detach())
            total += acc / rows
            n += 1
    return total / n


# ---------------------------------------------------------------------------- optimiser groups


def layer_id(name: str, depth: int) -> int:
    """Layer-decay id: embeddings 0, blocks 1..depth, final norm depth+1, projection head depth+2."""
    n = name
    for pre in ("module.", "_orig_mod."):
        if n.startswith(pre):
            n = n[len(pre):]
    if n.startswith("head."):
        return depth + 2
    if n.startswith("backbone."):
        n = n[len("backbone."):]
    if n.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "mask_token")):
        return 0
    if n.startswith("blocks."):
        return int(n.split(".")[1]) + 1
    return depth + 1  # norm, fc_norm


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))


def param_groups(named: Iterable[tuple[str, torch.Tensor]], depth: int,
                 layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups keyed by (layer id, decay?) with ``lr_scale = layer_decay ** (depth+2 - id)``."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    top = depth + 2
    for name, p in named:
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        nd = no_weight_decay(name, p)
        key = (lid, nd)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "layer_id": lid,
                           "lr_scale": float(layer_decay ** (top - lid)),
                           "wd_scale": 0.0 if nd else 1.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        g["weight_decay"] = wd * g.get("wd_scale", 1.0)


@torch.no_grad()
def clip_per_parameter(params: Iterable[torch.Tensor], max_norm: float) -> list[float]:
    """Clip each gradient tensor to norm ``max_norm`` on its own (as the release does)."""
    norms = []
    for p in params:
        if p.grad is None:
            continue
        n = float(p.grad.norm(2))
        norms.append(n)
        coef = max_norm / (n + 1e-6)
        if coef < 1:
            p.grad.mul_(coef)
    return norms
