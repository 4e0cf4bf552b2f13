"""MerMED-FM trainer, the math and the data: EMA, schedules, memory bank, partition, masked loss,
layer decay, clipping, augmentations, balanced sampler (fast, single process)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers import mermed_core as core
from trainers.mermed_data import BalancedModalitySampler, CropSpec, multi_crop
from trainers.mermed_model import ProjectionHead, build_nets

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- schedules / EMA


def test_schedules_match_their_formulas():
    base, final, warm, total = 5e-5 * 1024 / 256, 1e-6, 10, 100
    for s in (0, 3, 9):
        assert core.lr_at(s, base=base, final=final, warmup=warm, total=total) == \
            pytest.approx(base * s / warm)
    for s in (10, 40, 99):
        want = final + 0.5 * (base - final) * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        assert core.lr_at(s, base=base, final=final, warmup=warm, total=total) == pytest.approx(want)
    for s in (0, 50, 99):
        c = 0.5 * (1 + math.cos(math.pi * s / total))
        assert core.wd_at(s, start=0.04, end=0.4, total=total) == pytest.approx(0.4 + (0.04 - 0.4) * c)
        assert core.momentum_at(s, start=0.9995, total=total) == pytest.approx(1 - (1 - 0.9995) * c)
    assert core.momentum_at(total, start=0.9995, total=total) == 1.0
    assert core.teacher_temp_at(0, start=0.04, end=0.07, warmup=10) == pytest.approx(0.04)
    assert core.teacher_temp_at(5, start=0.04, end=0.07, warmup=10) == pytest.approx(0.055)
    assert core.teacher_temp_at(50, start=0.04, end=0.07, warmup=10) == pytest.approx(0.07)


def test_ema_teacher_equals_closed_form_over_recorded_students():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    teacher.load_state_dict(student.state_dict())
    t0 = {k: v.clone() for k, v in teacher.named_parameters()}
    teacher[1].running_mean.fill_(7.0)
    ms, states = [0.9, 0.95, 0.99, 0.5], []
    for m in ms:
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        states.append({k: v.detach().clone() for k, v in student.named_parameters()})
        core.ema_update(teacher, student, m)
    # closed form: t_n = prod(m) t_0 + sum_i (1 - m_i) prod_{j>i} m_j s_i
    for name, t in teacher.named_parameters():
        want = t0[name] * math.prod(ms)
        for i, m in enumerate(ms):
            want = want + (1 - m) * math.prod(ms[i + 1:]) * states[i][name]
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
    assert torch.all(teacher[1].running_mean == 7.0)  # buffers are not averaged


# ---------------------------------------------------------------------------- memory bank


def test_fifo_order_wrap_around_and_labels():
    bank = core.MemoryBank(8, 3, seed=1)
    init = bank.queue.clone()
    torch.testing.assert_close(bank.queue.norm(dim=1), torch.ones(8))
    assert (bank.labels == -1).all() and not bank.full
    assert bank.mask(torch.tensor([0, 1])) is None
    pushes = []
    for i in range(3):
        e = torch.randn(4, 3)
        pushes.append(torch.nn.functional.normalize(e, dim=1))
        bank.push(e, torch.tensor([i, i, i, i]))
        if i == 0:
            torch.testing.assert_close(bank.queue[:4], pushes[0])
            torch.testing.assert_close(bank.queue[4:], init[4:])  # untouched slots
            assert bank.ptr == 4 and not bank.full
            assert bank.mask(torch.tensor([0])) is None  # no masking until full
            assert (bank.labels[4:] == -1).all()
    # third push wrapped around onto the oldest slots
    assert bank.ptr == 4 and bank.full
    torch.testing.assert_close(bank.queue[:4], pushes[2])
    torch.testing.assert_close(bank.queue[4:], pushes[1])
    assert bank.labels.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    mask = bank.mask(torch.tensor([1, 2]))
    assert mask.tolist() == [[False] * 4 + [True] * 4, [True] * 4 + [False] * 4]
    sd = bank.state_dict()
    other = core.MemoryBank(8, 3, seed=99)
    other.load_state_dict(sd)
    assert other.ptr == 4 and torch.equal(other.queue, bank.queue)
    with pytest.raises(ValueError, match="divisible"):
        bank.push(torch.randn(3, 3), torch.zeros(3, dtype=torch.long))


def test_partition_covers_every_slot_once_and_is_reproducible():
    p = core.partition(64, 4, seed=3, step=7)
    assert p.shape == (4, 16)
    assert sorted(p.flatten().tolist()) == list(range(64))
    assert torch.equal(p, core.partition(64, 4, seed=3, step=7))  # any rank, any resume
    assert not torch.equal(p, core.partition(64, 4, seed=3, step=8))
    assert not torch.equal(p, core.partition(64, 4, seed=4, step=7))
    with pytest.raises(ValueError):
        core.partition(10, 4, seed=0, step=0)


# ---------------------------------------------------------------------------- loss


def _views(n_views, B, D, seed=0, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_views):
        z = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(dtype)
        out.append(z.requires_grad_(grad))
    return out


def test_loss_equals_loop_recomputation_before_and_after_full():
    B, D, K = 3, 8, 12
    student = _views(12, B, D, seed=1)
    teacher = _views(2, B, D, seed=2, grad=False)
    bank = core.MemoryBank(K, D, seed=0)
    blocks = core.partition(K, 3, seed=0, step=5)
    labels = torch.tensor([0, 1, 2])
    for full in (False, True):
        if full:
            bank.push(torch.randn(K, D), torch.tensor([0, 1, 1, 0, 2, 2, 0, 1, 0, 1, 0, 0]))
        valid = bank.mask(labels)
        assert (valid is not None) == full
        got = core.mermed_loss(student, teacher, bank.queue, blocks, valid, tau_s=0.1, tau_t=0.05)
        ref = core.mermed_loss_reference(student, teacher, bank.queue, blocks, labels,
                                         bank.labels, full, tau_s=0.1, tau_t=0.05)
        assert float(got.detach()) == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fully_masked_rows_give_zero_loss_and_zero_grad(dtype):
    B, D, K = 2, 8, 8
    bank = core.MemoryBank(K, D, seed=0)
    bank.push(torch.randn(K, D), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    blocks = torch.arange(K).view(2, 4)  # block 0 only modality 0, block 1 only modality 1
    labels = torch.tensor([0, 0])  # every block-1 row is fully masked
    valid = bank.mask(labels)
    s = _views(12, B, D, seed=3, dtype=dtype)
    t = _views(2, B, D, seed=4, dtype=dtype, grad=False)
    # a student whose only valid slots are in block 0: loss must be finite and gradients finite
    loss = core.mermed_loss(s, t, bank.queue.to(dtype), blocks, valid, tau_s=0.1, tau_t=0.04)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(z.grad).all() for z in s)
    # a row with no valid slot at all: loss 0, gradient 0 (exactly)
    x = torch.randn(1, 4, dtype=dtype, requires_grad=True)
    none = torch.zeros(1, 4, dtype=torch.bool)
    row = core.block_cross_entropy(x, x.detach() * 2, torch.arange(4).view(1, 4), none)
    row.backward()
    assert float(row.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    # nothing valid anywhere: still finite zero
    z = _views(12, 1, D, seed=5, dtype=dtype)
    none = torch.zeros(1, K, dtype=torch.bool)
    total = core.mermed_loss(z, z[:2], bank.queue.to(dtype), blocks, none, tau_s=0.1, tau_t=0.04)
    total.backward()
    assert float(total.detach()) == 0.0
    assert all(torch.equal(v.grad, torch.zeros_like(v)) for v in z)


# ---------------------------------------------------------------------------- optimiser


def test_layer_decay_groups_and_no_decay_rules():
    preset = {"vit": {"img_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 3,
                      "num_heads": 1, "mlp_ratio": 1.0, "qkv_bias": True},
              "head_hidden": 16, "head_out": 8}
    student, teacher = build_nets(preset, drop_path=0.1)
    assert not any(p.requires_grad for p in teacher.parameters())
    groups = core.param_groups(student.named_parameters(), 3, 0.8)
    by_name = {n: g for g in groups for n in g["names"]}
    top = 3 + 2
    assert by_name["backbone.cls_token"]["layer_id"] == 0
    assert by_name["backbone.pos_embed"]["wd_scale"] == 0.0
    assert by_name["backbone.cls_token"]["wd_scale"] == 0.0
    assert by_name["backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.8 ** top)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["layer_id"] == 1
    assert by_name["backbone.blocks.2.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.8 ** 2)
    assert by_name["backbone.blocks.2.mlp.fc1.bias"]["wd_scale"] == 0.0
    assert by_name["backbone.norm.weight"]["layer_id"] == 4
    assert by_name["head.mlp.0.weight"]["lr_scale"] == 1.0
    assert by_name["head.mlp.0.weight"]["wd_scale"] == 1.0
    assert by_name["head.mlp.1.weight"]["wd_scale"] == 0.0  # BN weight is 1-D
    n_params = sum(1 for p in student.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    core.apply_schedules(opt, 1e-3, 0.1)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["weight_decay"] == pytest.approx(0.1 * g["wd_scale"])


def test_clipping_is_per_parameter():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0])  # norm 5 -> clipped to 1
    b.grad = torch.tensor([0.3, 0.4])  # norm 0.5 -> untouched (a global clip would shrink it)
    core.clip_per_parameter([a, b], 1.0)
    assert float(a.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(b.grad, torch.tensor([0.3, 0.4]))


def test_head_output_is_l2_normalised_and_shapes():
    head = ProjectionHead(16, 32, 8)
    z = head(torch.randn(5, 16))
    assert z.shape == (5, 8)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- data


def test_multi_crop_views_sizes_determinism_and_normalisation():
    spec = CropSpec(global_size=32, local_size=16, n_local=10)
    img = torch.rand(3, 50, 60)
    v1 = multi_crop(img, "fundus", spec, seed=11)
    v2 = multi_crop(img, "fundus", spec, seed=11)
    v3 = multi_crop(img, "fundus", spec, seed=12)
    assert len(v1) == 12
    assert [tuple(v.shape) for v in v1] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 10
    assert all(torch.equal(a, b) for a, b in zip(v1, v2, strict=True))
    assert not torch.equal(v1[0], v3[0])
    # per-modality normalisation: a black image maps to -mean/std of the modality
    black = multi_crop(torch.zeros(3, 40, 40), "CXR", spec, seed=0)[0]
    torch.testing.assert_close(black[:, 16, 16], torch.full((3,), -0.5076 / 0.3122),
                               rtol=1e-4, atol=1e-4)


def _simulate(world, B, mods, steps, seed=0, nodes=None):
    samplers = [BalancedModalitySampler(mods, batch_size=B, rank=r, world_size=world, seed=seed)
                for r in range(world)]
    per_rank = [[s.batch() for _ in range(steps)] for s in samplers]
    return samplers, per_rank


def test_sampler_balance_no_overlap_two_nodes_and_resume():
    # 3 modalities of very different sizes; 2 nodes x 2 processes = global ranks 0..3
    mods = ["CXR"] * 60 + ["fundus"] * 40 + ["pathology"] * 45  # no stream wraps in 3 steps
    B, world, steps = 7, 4, 3  # 7 = 2 x 3 + 1: one extra sample per rank
    samplers, per_rank = _simulate(world, B, mods, steps)
    all_seen = []
    for t in range(steps):
        seen = []
        for r in range(world):
            idx = [i for i, _ in per_rank[r][t]]
            counts = {m: sum(mods[i] == m for i in idx) for m in set(mods)}
            assert len(idx) == B
            assert all(c in (2, 3) for c in counts.values()) and sum(counts.values()) == B
            seen += idx
        assert len(set(seen)) == len(seen)  # no two ranks (also across nodes) share a sample
        all_seen.append(seen)
    flat = [i for s_ in all_seen for i in s_]
    assert len(set(flat)) == len(flat)  # nor across steps within one pass of each stream
    # local ranks (release bug) would make node 1 repeat node 0 exactly; global ranks do not
    assert [i for i, _ in per_rank[0][0]] != [i for i, _ in per_rank[2][0]]
    # view seeds differ for every sample position
    seeds = [s for r in range(world) for s_ in per_rank[r] for _, s in s_]
    assert len(set(seeds)) == len(seeds)
    # resume: a fresh sampler loaded with the state reproduces the next batches
    st = samplers[1].state_dict()
    nxt = samplers[1].batch()
    fresh = BalancedModalitySampler(mods, batch_size=B, rank=1, world_size=world)
    fresh.load_state_dict(st)
    assert fresh.batch() == nxt
    assert samplers[1].state_at(steps) == st


def test_sampler_global_batch_does_not_depend_on_world_size():
    mods = ["CXR"] * 9 + ["fundus"] * 5
    _, one = _simulate(1, 8, mods, 4)
    _, two = _simulate(2, 4, mods, 4)
    for t in range(4):
        assert one[0][t] == two[0][t] + two[1][t]


def test_sampler_epoch_streams_cover_each_modality_before_repeating():
    mods = ["CXR"] * 6 + ["fundus"] * 4
    s = BalancedModalitySampler(mods, batch_size=2, rank=0, world_size=1, seed=5)
    drawn = [i for _ in range(4) for i, _ in s.batch()]
    fundus = [i for i in drawn if mods[i] == "fundus"]
    assert sorted(fundus) == [6, 7, 8, 9]  # one full pass of the fundus stream
    cxr = [i for i in drawn if mods[i] == "CXR"]
    assert len(set(cxr)) == 4
    np.testing.assert_array_equal(sorted(set(cxr)), sorted(cxr))


def test_init_from_pretrained_file_or_hub_folder_with_pos_embed_resampling(tmp_path):
    from safetensors.torch import save_file

    from napari_medfm.errors import WeightsError
    from napari_medfm.models.mermed.model import build_vit

    vit = {"img_size": 32, "patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 1,
           "mlp_ratio": 1.0, "qkv_bias": True}
    torch.manual_seed(5)
    src = build_vit(vit)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["head.weight"] = torch.zeros(10, 64)  # a classifier head in the file is ignored
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(sd, str(hub / "model.safetensors"))
    preset = {"vit": dict(vit, img_size=64), "head_hidden": 16, "head_out": 8}  # 4x4 grid
    student, teacher = build_nets(preset, drop_path=0.0, init=str(hub))
    got = student.backbone.state_dict()
    assert torch.equal(got["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"])
    assert got["pos_embed"].shape == (1, 17, 64)  # resampled from 2x2 to 4x4 (+ CLS)
    assert torch.equal(got["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    assert torch.equal(teacher.backbone.state_dict()["cls_token"], sd["cls_token"])
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}},
               tmp_path / "ckpt.pth")  # a MerMED/DINO training checkpoint layout
    s2, _ = build_nets(preset, drop_path=0.0, init=str(tmp_path / "ckpt.pth"))
    assert torch.equal(s2.backbone.state_dict()["blocks.0.mlp.fc1.weight"],
                       sd["blocks.0.mlp.fc1.weight"])
    with pytest.raises(WeightsError, match="does not match"):
        build_nets(dict(preset, vit=dict(vit, depth=3)), drop_path=0.0, init=str(hub))
