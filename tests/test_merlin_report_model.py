"""Merlin's report generator on tiny random weights through the model-folder contract:
released key layout, strict loading, logits against a plain re-computation of the spec's
forward, a SentencePiece tokenizer trained here on real report texts, greedy decoding against
a hand-written loop, LoRA merge, the organ report and the bad-input errors."""

from __future__ import annotations

import copy
import dataclasses
import math
import random

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from napari_medfm.errors import (
    EmptyPromptError,
    MedfmError,
    MissingTokenizerError,
    VolumeTooLargeError,
    WeightsError,
    WrongModalityError,
)
from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.models.merlin_report.spec import CHECKPOINTS, ORGAN_PROMPT, ORGANS
from napari_medfm.runtime.registry import load_model
from tests.conftest import real_path

CT_SMALL = "ct/totalseg_nifti/example_ct_sm.nii.gz"
REPORTS = "cxr/reports_iu_xray"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def texts():
    from napari_medfm.models.merlin_report.testing import report_corpus

    t = report_corpus(real_path(REPORTS))
    assert len(t) >= 16
    return t


@pytest.fixture(scope="module")
def folder(tmp_path_factory, texts):
    from napari_medfm.models.merlin_report.testing import write_model_folder

    return write_model_folder(tmp_path_factory.mktemp("merlin_report"), texts)


@pytest.fixture(scope="module")
def model(folder):
    return load_model("merlin-report", weights=folder, device="cpu")


@pytest.fixture(scope="module")
def sd(folder):
    return torch.load(folder / CHECKPOINTS[0], weights_only=True)


@pytest.fixture(scope="module")
def ct():
    return MedicalImage.from_sitk(sitk.ReadImage(str(real_path(CT_SMALL))), modality="CT",
                                  name="example_ct_sm")


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(3)
    return torch.rand((1, 1, 64, 64, 32), generator=g)


# --------------------------------------------------------------------------- the spec's forward
def _bn(x, sd, p, eps=1e-5):
    shape = (1, -1, 1, 1, 1)
    return ((x - sd[p + "running_mean"].view(shape)) / torch.sqrt(sd[p + "running_var"].view(shape)
            + eps)) * sd[p + "weight"].view(shape) + sd[p + "bias"].view(shape)


def plain_image_tokens(sd, x, blocks=(1, 1, 1, 1)):
    """I3D trunk from the state dict: (B,1,H,W,D) -> (B, D'H'W', 2048-ish) tokens."""
    f = "encode_image.vision_model.features."
    x = x.permute(0, 1, 4, 2, 3).repeat(1, 3, 1, 1, 1)  # (B, 3, D, H, W), as the CLIP tower
    x = F.conv3d(x, sd[f + "0.weight"], stride=(1, 2, 2), padding=(1, 3, 3))
    x = F.relu(_bn(x, sd, f + "1."))
    x = F.max_pool3d(x, 3, 2, 1)
    for i, n in enumerate(blocks):
        for b in range(n):
            p = f"{f}{4 + i}.{b}."
            stride = 2 if (i > 0 and b == 0) else 1
            idt = x
            if p + "downsample.0.weight" in sd:
                idt = _bn(F.conv3d(x, sd[p + "downsample.0.weight"], stride=stride), sd,
                          p + "downsample.1.")
            y = F.relu(_bn(F.conv3d(x, sd[p + "conv1.weight"]), sd, p + "bn1."))
            y = F.relu(_bn(F.conv3d(y, sd[p + "conv2.weight"], stride=stride, padding=1), sd,
                           p + "bn2."))
            y = _bn(F.conv3d(y, sd[p + "conv3.weight"]), sd, p + "bn3.")
            x = F.relu(y + idt)
    b, c = x.shape[:2]
    return x.reshape(b, c, -1).transpose(1, 2)  # index d*(H'W') + h*W' + w


def _rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def plain_llm_logits(sd, embeds, heads=4, layers=2, scaling=16 / 4):
    """LLaMA with unmerged LoRA on q/v, written from the spec: logits [B, T, V]."""
    m = "decode_text.text_decoder.base_model.model."
    b, t, h = embeds.shape
    hd = h // heads
    pos = torch.arange(t)
    mask = torch.full((t, t), float("-inf")).triu(1)
    x = embeds
    for i in range(layers):
        p = f"{m}model.layers.{i}."
        y = _rms(x, sd[p + "input_layernorm.weight"])

        def lora(name, y=y, p=p):
            a = p + f"self_attn.{name}."
            return (y @ sd[a + "base_layer.weight"].T
                    + scaling * (y @ sd[a + "lora_A.default.weight"].T)
                    @ sd[a + "lora_B.default.weight"].T)

        q = lora("q_proj")
        k = y @ sd[p + "self_attn.k_proj.weight"].T
        v = lora("v_proj")
        q, k, v = (z.view(b, t, heads, hd).transpose(1, 2) for z in (q, k, v))
        q, k = _rope(q, pos), _rope(k, pos)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, t, h)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T
        y = _rms(x, sd[p + "post_attention_layernorm.weight"])
        mlp = F.silu(y @ sd[p + "mlp.gate_proj.weight"].T) * (y @ sd[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ sd[p + "mlp.down_proj.weight"].T
    x = _rms(x, sd[m + "model.norm.weight"])
    return x @ sd[m + "lm_head.weight"].T


def plain_embeds(sd, image, ids):
    tok = plain_image_tokens(sd, image)
    img = tok @ sd["adapter.linear2.weight"].T + sd["adapter.linear2.bias"]
    emb = sd["decode_text.text_decoder.base_model.model.model.embed_tokens.weight"]
    return torch.cat([img, emb[ids[:, 1:]]], dim=1)  # BOS dropped, image first


def hand_greedy(sd, image, ids, n, penalty):
    """Greedy with full re-computation at every step; the penalty sees generated ids only."""
    emb = sd["decode_text.text_decoder.base_model.model.model.embed_tokens.weight"]
    embeds = plain_embeds(sd, image, ids)
    out: list[int] = []
    for _ in range(n):
        logits = plain_llm_logits(sd, embeds)[0, -1].clone()
        for tid in set(out):
            logits[tid] = logits[tid] / penalty if logits[tid] > 0 else logits[tid] * penalty
        nxt = int(torch.argmax(logits))
        out.append(nxt)
        if nxt == 2:
            break
        embeds = torch.cat([embeds, emb[nxt][None, None]], dim=1)
    return out


# --------------------------------------------------------------------------- layout and loading
def test_spec_and_config_defaults():
    from napari_medfm.models.merlin_report.network import MerlinReportConfig
    from napari_medfm.runtime.registry import get_spec

    spec = get_spec("merlin-report")
    assert spec.tasks == ("report",) and spec.dims == (3,) and spec.extras["exclusive"] is True
    assert {f.filename for f in spec.files} == set(CHECKPOINTS)
    rel = MerlinReportConfig()
    assert rel.resnet_blocks == (3, 8, 36, 3) and rel.n_image_tokens == 490
    assert rel.llm["hidden_size"] == 4096 and rel.llm["num_hidden_layers"] == 32
    assert rel.lora == {"r": 512, "lora_alpha": 16, "lora_dropout": 0.1,
                        "target_modules": ["q_proj", "v_proj"]}
    part = MerlinReportConfig.from_dict({"llm": {"num_hidden_layers": 2}})
    assert part.llm["num_hidden_layers"] == 2 and part.llm["hidden_size"] == 4096  # missing = release
    assert part.resnet_blocks == rel.resnet_blocks
    with pytest.raises(WeightsError, match="unknown key.*bogus"):
        MerlinReportConfig.from_dict({"bogus": 1})


def test_released_layout_key_count_and_shapes():
    from napari_medfm.models.merlin_report.network import MerlinReportConfig, MerlinReportNet

    with torch.device("meta"):
        net = MerlinReportNet(MerlinReportConfig())
    sd = net.state_dict()
    assert len(sd) == 1351  # the release's key count
    n = sum(p.numel() for p in net.parameters())
    assert 7.10e9 < n < 7.16e9  # ~7.13 B parameters
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["encode_image.vision_model.features.0.weight"] == (64, 3, 3, 7, 7)
    assert "encode_image.vision_model.features.1.running_var" in shapes
    assert shapes["encode_image.vision_model.features.7.2.conv3.weight"] == (2048, 512, 1, 1, 1)
    assert not any(k.startswith(("encode_image.vision_model.features.2",
                                 "encode_image.vision_model.features.3")) for k in shapes)
    assert shapes["adapter.linear2.weight"] == (4096, 2048) and "adapter.linear2.bias" in shapes
    q = "decode_text.text_decoder.base_model.model.model.layers.31.self_attn.q_proj."
    assert shapes[q + "base_layer.weight"] == (4096, 4096)
    assert shapes[q + "lora_A.default.weight"] == (512, 4096)
    assert shapes[q + "lora_B.default.weight"] == (4096, 512)
    assert shapes["decode_text.text_decoder.base_model.model.lm_head.weight"] == (32000, 4096)
    assert not any("k_proj.lora" in k or "inv_freq" in k for k in shapes)


def test_strict_loading_names_keys(folder, sd, tmp_path):
    import shutil

    from napari_medfm.models.merlin_report.testing import TINY_CONFIG  # noqa: F401

    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    (bad / CHECKPOINTS[0]).unlink()
    extra = dict(sd)
    extra["decode_text.text_decoder.base_model.model.model.layers.0.self_attn.rotary_emb."
          "inv_freq"] = torch.zeros(4)
    torch.save(extra, bad / CHECKPOINTS[1])  # the other released name is found too
    with pytest.raises(WeightsError, match=r"unexpected keys: .*rotary_emb\.inv_freq"):
        load_model("merlin-report", weights=bad, device="cpu")
    less = dict(sd)
    less.pop("adapter.linear2.bias")
    torch.save(less, bad / CHECKPOINTS[1])
    with pytest.raises(WeightsError, match=r"missing keys: adapter\.linear2\.bias"):
        load_model("merlin-report", weights=bad, device="cpu")
    torch.save(sd, bad / CHECKPOINTS[1])
    m = load_model("merlin-report", weights=bad, device="cpu")
    assert m.weights_path.name == CHECKPOINTS[1]
    with pytest.raises(MedfmError, match="options of this model"):
        load_model("merlin-report", weights=bad, device="cpu", merge=True)


# --------------------------------------------------------------------------- tokenizer
def test_tokenizer_trained_on_reports(model, folder, texts, image):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer" / "tokenizer.model"))
    prompt = ORGAN_PROMPT.format(organ="liver")
    ids = model.tokenize(prompt)[0].tolist()
    assert ids[0] == 1 and ids[1:] == sp.encode(prompt)  # BOS + the SentencePiece ids
    assert 2 not in ids  # no EOS added
    sent = texts[0]
    assert model.tokenizer.decode(sp.encode(sent)) == sp.decode(sp.encode(sent))
    logits = model.logits(image, torch.tensor([ids]))
    n_img = model.config.n_image_tokens
    assert n_img == 8
    assert logits.shape == (1, n_img + len(ids) - 1, 512)  # image tokens + prompt minus BOS


def test_missing_tokenizer(folder, tmp_path):
    import shutil

    d = tmp_path / "notok"
    shutil.copytree(folder, d, ignore=shutil.ignore_patterns("tokenizer"))
    with pytest.raises(MissingTokenizerError, match="RadLLaMA-7b"):
        load_model("merlin-report", weights=d, device="cpu")
    # tokenizer=PATH overrides the folder contract
    m = load_model("merlin-report", weights=d, device="cpu", tokenizer=folder / "tokenizer")
    assert len(m.tokenizer) == 500


# --------------------------------------------------------------------------- numbers
def test_logits_match_plain_forward(model, sd, image):
    ids = model.tokenize(ORGAN_PROMPT.format(organ="kidneys"))
    ref = plain_llm_logits(sd, plain_embeds(sd, image, ids))
    got = model.logits(image, ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the plain (unfused) image trunk agrees too
    model.net.encode_image.unfuse()
    try:
        torch.testing.assert_close(model.logits(image, ids), ref, rtol=1e-4, atol=1e-4)
    finally:
        model.net.encode_image.fuse()


@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_matches_hand_loop(model, sd, image, penalty):
    ids = model.tokenize(ORGAN_PROMPT.format(organ="spleen"))
    got = model.generate_ids(image, ids, max_new_tokens=12, repetition_penalty=penalty)
    ref = hand_greedy(sd, image, ids, 12, penalty)
    assert got[0].tolist() == ref


def test_repetition_penalty_changes_ids(model, image):
    ids = model.tokenize(ORGAN_PROMPT.format(organ="bowel"))
    plain = model.generate_ids(image, ids, max_new_tokens=40, repetition_penalty=1.0)[0].tolist()
    pen = model.generate_ids(image, ids, max_new_tokens=40, repetition_penalty=1.2)[0].tolist()
    # a small random LLM loops; the penalty (on generated tokens only) breaks the loop
    assert len(set(plain)) < len(plain)
    assert pen != plain


def test_batched_generate_equals_one_by_one(model, image):
    ids = model.tokenize(ORGAN_PROMPT.format(organ="liver"))
    two = torch.cat([image, image.flip(-1)])
    both = model.generate_ids(two, ids, max_new_tokens=6)
    for i in range(2):
        one = model.generate_ids(two[i:i + 1], ids, max_new_tokens=6)[0].tolist()
        row = both[i].tolist()[:len(one)]
        assert row == one


def test_lora_merged_equals_unmerged(folder, model, image):
    merged = load_model("merlin-report", weights=folder, device="cpu", merge_lora=True)
    assert merged.merged and not model.merged
    assert not any("lora_" in k for k in merged.net.state_dict())
    ids = model.tokenize(ORGAN_PROMPT.format(organ="pancreas"))
    torch.testing.assert_close(merged.logits(image, ids), model.logits(image, ids),
                               rtol=1e-4, atol=1e-4)
    assert merged.generate_ids(image, ids, 16).tolist() == model.generate_ids(image, ids,
                                                                              16).tolist()


# --------------------------------------------------------------------------- text assembly
def test_text_stream_and_section_cut(model, texts):
    from napari_medfm.models.merlin_report.model import TextStream, _SectionCut

    sent = " ".join(texts[:3]) + " café ###extra"
    ids = model.tokenizer(sent)["input_ids"][1:]
    ts = TextStream(model.tokenizer)
    pieces = [ts.push(i) for i in ids] + [ts.flush()]
    assert "".join(pieces) == model.tokenizer.decode(ids, skip_special_tokens=True)
    rng = random.Random(0)
    for _ in range(20):
        s = "abc # de ## f" + "###" + "tail ### more"
        cuts = sorted(rng.sample(range(1, len(s)), 6))
        chunks = [s[i:j] for i, j in zip([0, *cuts], [*cuts, len(s)], strict=True)]
        c = _SectionCut()
        got = "".join(c.feed(ch) for ch in chunks) + c.finish()
        assert got == s.split("###")[0]
    c = _SectionCut()
    assert c.feed("ends with ##") == "ends with " and c.finish() == "##"


def test_report_is_organs_in_order(model, ct):
    pieces: list[str] = []
    text = model.report(ct, stream=pieces.append, max_new_tokens=6)
    assert "".join(pieces) == text
    # reference: each organ on its own (image encoded again, no prefix cache), cut, joined
    pre = model.prepare(ct)
    parts = []
    for organ in ORGANS:
        ids = model.generate_ids(pre, model.tokenize(ORGAN_PROMPT.format(organ=organ)), 6)
        parts.append(model.tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
                     .split("###")[0])
    assert text == " ".join(parts)
    assert model.report(pre, max_new_tokens=6, early_stop=False) == text
    # the contract's stream: the organ template gives the same text
    assert "".join(model.stream([pre], ORGAN_PROMPT, max_new_tokens=6)) == text


def test_stream_contract_and_close(model, image):
    ct = image
    gen = model.stream([ct], "Describe the liver.", max_new_tokens=8)
    first = next(gen)
    assert isinstance(first, str)
    gen.close()  # stops at the next token
    with pytest.raises(TypeError):
        list(model.stream([ct], "x", max_new_tokens=2, temperature=0.5))
    with pytest.raises(EmptyPromptError):
        list(model.stream([ct], "   "))


# --------------------------------------------------------------------------- bad input
def test_bad_inputs(model, ct, monkeypatch):
    cxr = MedicalImage(np.zeros((64, 64), np.float32), Geometry.identity(2), modality="DX",
                       kind="image2d", name="cxr")
    with pytest.raises(WrongModalityError, match="3D CT"):
        model.report(cxr)
    import napari_medfm.runtime.device as device

    monkeypatch.setattr(device, "available_memory", lambda _d: 1 << 20)
    with pytest.raises(VolumeTooLargeError, match="GiB"):
        model.report(ct)


def test_hash_mismatch_is_an_error(folder):
    from napari_medfm.runtime import registry

    spec = registry.get_spec("merlin-report")
    pinned = dataclasses.replace(spec, files=tuple(
        dataclasses.replace(f, sha256="0" * 64) for f in spec.files))
    registry.register(pinned, replace=True)
    try:
        with pytest.raises(WeightsError, match="sha256 mismatch"):
            load_model("merlin-report", weights=folder, device="cpu")
    finally:
        registry.register(spec, replace=True)
    assert copy.copy(spec) == registry.get_spec("merlin-report")
