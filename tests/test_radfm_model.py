"""RadFM: strict loading of the released layout, the forward against a plain re-computation of
the published description, tokenizer ids, greedy/KV-cache generation, batching, streaming,
findings, memory estimate, safetensors conversion. Tiny random configs through the model
folder contract; the tokenizer is trained here on the IU X-ray report texts."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import real_path

import napari_medfm
from napari_medfm.errors import MedfmError, WeightsError
from napari_medfm.models.radfm.model import estimate_memory_bytes
from napari_medfm.models.radfm.network import RadFMConfig, RadFMNetwork, count_parameters
from napari_medfm.models.radfm.testing import (
    released_state_dict,
    tiny_config,
    train_tokenizer,
    write_model_folder,
)

torch.set_num_threads(1)


def _report_texts() -> list[str]:
    folder = real_path("cxr/reports_iu_xray")
    texts = []
    for f in sorted(folder.glob("*.xml")):
        for node in ET.parse(f).getroot().iter("AbstractText"):
            if node.text and node.text.strip():
                texts.append(node.text.strip())
    assert texts
    return texts


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("radfm")
    tok = train_tokenizer(_report_texts(), d / "tok.model", vocab_size=400)
    import sentencepiece as spm

    V = spm.SentencePieceProcessor(model_file=str(tok)).get_piece_size()
    write_model_folder(d / "model", tiny_config(vocab_size=V), tokenizer=tok)
    return d / "model"


@pytest.fixture(scope="module")
def model(folder):
    return napari_medfm.load_model("radfm", weights=folder, device="cpu")


def _vx(seed: int, b: int = 1, s: int = 1, d: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, s, 3, 64, 64, d, generator=g)


# --------------------------------------------------------------------------- loading


def test_released_layout_loads_strictly_and_bad_keys_are_named(tmp_path, folder, model, caplog):
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert any(k.endswith("rotary_emb.inv_freq") for k in sd)
    assert any(k.startswith("embedding_layer.bert_model.") for k in sd)
    # loaded: every parameter equals the checkpoint's
    own = model.net.state_dict()
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k
    assert model.net.lang_model.model.embed_tokens.weight is model.net.embedding_layer.weight
    assert model.weights_sha256 and len(model.weights_sha256) == 64
    cfg = json.loads((folder / "radfm_config.json").read_text())
    # an unexpected key is an error that names it
    bad = write_model_folder(tmp_path / "bad", cfg,
                             extra={"embedding_layer.mystery.weight": torch.zeros(2)})
    with pytest.raises(WeightsError, match=r"unexpected keys: embedding_layer\.mystery\.weight"):
        napari_medfm.load_model("radfm", weights=bad, device="cpu")
    # a missing key too
    miss = write_model_folder(tmp_path / "miss", cfg, drop=["embedding_layer.fc.bias"])
    with pytest.raises(WeightsError, match=r"missing keys: embedding_layer\.fc\.bias"):
        napari_medfm.load_model("radfm", weights=miss, device="cpu")
    # and a different size
    other = dict(cfg, llm=dict(cfg["llm"], intermediate_size=48))
    shape = write_model_folder(tmp_path / "shape", other)
    (shape / "radfm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="shape mismatches: lang_model.model.layers.0.mlp"):
        napari_medfm.load_model("radfm", weights=shape, device="cpu")
    # no checkpoint at all
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no pytorch_model.bin or \\*.safetensors"):
        napari_medfm.load_model("radfm", weights=tmp_path / "empty", device="cpu")
    with pytest.raises(MedfmError, match="options of this model"):
        napari_medfm.load_model("radfm", weights=folder, device="cpu", quantise="4bit")
    with pytest.raises(MedfmError, match="needs a CUDA GPU"):
        napari_medfm.load_model("radfm", weights=folder, device="cpu", quantize="4bit")


def test_config_defaults_are_the_release():
    cfg = RadFMConfig.from_dict({"vision": {"depth": 2}})
    assert cfg.vision.depth == 2 and cfg.vision.dim == 768 and cfg.vision.frames == 512
    assert (cfg.perceiver.depth, cfg.perceiver.num_latents, cfg.perceiver.ff_mult) == (6, 32, 4)
    assert cfg.llm["hidden_size"] == 5120 and cfg.llm["num_hidden_layers"] == 40
    assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (1, 2, 0)
    assert (cfg.image_token, cfg.end_image_token, cfg.patch_token(0), cfg.patch_token(31)) == \
        (32000, 32001, 32002, 32033)
    with pytest.raises(WeightsError, match="unknown vision keys"):
        RadFMConfig.from_dict({"vision": {"dimm": 3}})
    full = count_parameters(RadFMConfig())
    assert 13.0e9 < full["total"] < 13.3e9  # LLaMA-13B + ~0.1 B vision/perceiver
    est = estimate_memory_bytes(RadFMConfig(), dtype_bytes=2)
    assert 24 * 2**30 < est["weights"] < 26 * 2**30
    assert estimate_memory_bytes(RadFMConfig(), quantize="4bit")["weights"] < est["weights"] / 2.5


def test_parameter_count_matches_the_network(model):
    n = sum(p.numel() for p in {id(p): p for p in model.net.parameters()}.values())
    assert count_parameters(model.cfg)["total"] == n
    d = model.describe()
    assert d["model_id"] == "radfm" and d["parameters"] == n and d["weights_sha256"]


# --------------------------------------------------------------------------- forward


def _patchify(x, p, pf):
    """``b c (h p1) (w p2) (f pf) -> b (h w f) (p1 p2 pf c)``, patch by patch."""
    b, c, H, W, D = x.shape
    rows = []
    for i in range(H // p):
        for j in range(W // p):
            for k in range(D // pf):
                blk = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p, k * pf:(k + 1) * pf]
                rows.append(blk.permute(0, 2, 3, 4, 1).reshape(b, -1))  # p1 p2 pf c
    return torch.stack(rows, 1)


def _ln(x, sd, pre, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[pre + ".weight"], sd[pre + ".bias"], eps)


def _mha(q, k, v, heads):
    b, n, _ = q.shape
    q, k, v = (t.reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return (a @ v).transpose(1, 2).reshape(b, n, -1)


def _reference_vision(x, sd, cfg):
    """The published description, step by step, on one image ``[1, 3, H, W, D]``."""
    v, pc = cfg["vision"], cfg["perceiver"]
    P = "embedding_layer.vision_encoder."
    t = _patchify(x, v["patch_size"], v["frame_patch_size"])
    t = _ln(t, sd, P + "to_patch_embedding.1")
    t = t @ sd[P + "to_patch_embedding.2.weight"].T + sd[P + "to_patch_embedding.2.bias"]
    t = _ln(t, sd, P + "to_patch_embedding.3")
    h, w, f = (x.shape[2] // v["patch_size"], x.shape[3] // v["patch_size"],
               x.shape[4] // v["frame_patch_size"])
    R, C, Dp = (sd[P + f"pos_embedding.{n}_embed.weight"] for n in ("row", "col", "dep"))
    pos = []
    for i in range(h):
        for j in range(w):
            for k in range(f):
                ii = (i + 1) * (R.shape[0] // h) - 1
                jj = (j + 1) * (C.shape[0] // w) - 1
                kk = (k + 1) * (Dp.shape[0] // f) - 1
                pos.append(torch.cat([R[ii], C[jj], Dp[kk]]))
    t = t + torch.stack(pos)
    for L in range(v["depth"]):
        q = f"{P}transformer.layers.{L}."
        y = _ln(t, sd, q + "0.norm")
        qq, kk_, vv = (y @ sd[q + "0.fn.to_qkv.weight"].T).chunk(3, -1)
        t = t + _mha(qq, kk_, vv, v["heads"]) @ sd[q + "0.fn.to_out.0.weight"].T \
            + sd[q + "0.fn.to_out.0.bias"]
        y = _ln(t, sd, q + "1.norm")
        y = F.gelu(y @ sd[q + "1.fn.net.0.weight"].T + sd[q + "1.fn.net.0.bias"])
        t = t + y @ sd[q + "1.fn.net.3.weight"].T + sd[q + "1.fn.net.3.bias"]
    Q = "embedding_layer.perceiver."
    lat = sd[Q + "latents"][None]
    for L in range(pc["depth"]):
        q = f"{Q}layers.{L}."
        xm = _ln(t, sd, q + "0.norm_media")
        ln_lat = _ln(lat, sd, q + "0.norm_latents")
        qq = ln_lat @ sd[q + "0.to_q.weight"].T
        kk_, vv = (torch.cat([xm, ln_lat], 1) @ sd[q + "0.to_kv.weight"].T).chunk(2, -1)
        lat = lat + _mha(qq, kk_, vv, pc["heads"]) @ sd[q + "0.to_out.weight"].T
        y = _ln(lat, sd, q + "1.0")
        lat = lat + F.gelu(y @ sd[q + "1.1.weight"].T) @ sd[q + "1.3.weight"].T
    lat = _ln(lat, sd, Q + "norm")
    return lat @ sd["embedding_layer.fc.weight"].T + sd["embedding_layer.fc.bias"]  # [1, n, H]


def _rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2).float() / d))
    fr = pos[:, None].float() * inv[None]
    emb = torch.cat([fr, fr], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def _reference_llama(emb, sd, llm):
    """Plain LLaMA forward (RMSNorm, rotary, causal attention, SwiGLU) on ``[L, H]``."""
    eps = llm.get("rms_norm_eps", 1e-6)
    nh = llm["num_attention_heads"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    n = emb.shape[0]
    pos = torch.arange(n)
    causal = torch.full((n, n), float("-inf")).triu(1)
    h = emb
    for L in range(llm["num_hidden_layers"]):
        p = f"lang_model.model.layers.{L}."
        y = rms(h, sd[p + "input_layernorm.weight"])
        q, k, v = (y @ sd[p + f"self_attn.{n_}_proj.weight"].T for n_ in "qkv")
        q, k, v = (t.reshape(n, nh, -1).transpose(0, 1) for t in (q, k, v))
        q, k = _rope(q, pos), _rope(k, pos)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + causal, -1)
        h = h + (a @ v).transpose(0, 1).reshape(n, -1) @ sd[p + "self_attn.o_proj.weight"].T
        y = rms(h, sd[p + "post_attention_layernorm.weight"])
        g = F.silu(y @ sd[p + "mlp.gate_proj.weight"].T) * (y @ sd[p + "mlp.up_proj.weight"].T)
        h = h + g @ sd[p + "mlp.down_proj.weight"].T
    h = rms(h, sd["lang_model.model.norm.weight"])
    return h @ sd["lang_model.lm_head.weight"].T


def test_logits_match_a_plain_recomputation_of_the_spec(folder, model):
    sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    cfg = json.loads((folder / "radfm_config.json").read_text())
    V = cfg["llm"]["vocab_size"]
    imgs = [_vx(1, d=8)[0, 0], _vx(2, d=4)[0, 0]]  # two images of different depth
    ids = [1] + model.image_block(0) + [7, 8, 9] + model.image_block(1) + [10, 11]
    # release's lookup: one_hot(ids) @ cat(embed_tokens, figure_token_weight, image latents)
    vis = torch.cat([_reference_vision(im[None], sd, cfg)[0] for im in imgs])
    table = torch.cat([sd["embedding_layer.weight"], sd["embedding_layer.figure_token_weight"], vis])
    emb = F.one_hot(torch.tensor(ids), table.shape[0]).float() @ table
    ref = _reference_llama(emb, sd, cfg["llm"])
    # through the model (images of different depth: one sample encoded image by image)
    got = model.net.embedding_layer
    with torch.inference_mode():
        v2 = model._encode_sample(imgs)
        e2 = got.lookup(torch.tensor([ids]), v2)
        out = model.net.lang_model(inputs_embeds=e2).logits[0]
    assert v2.shape == (1, 2 * cfg["perceiver"]["num_latents"], cfg["llm"]["hidden_size"])
    torch.testing.assert_close(v2[0], vis, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)
    # the public logits() on same-shape images [B, S, 3, H, W, D]
    vx = torch.stack([imgs[1], _vx(3)[0, 0]])[None]
    lg = model.logits(vx, [ids])
    vis = torch.cat([_reference_vision(vx[0, i][None], sd, cfg)[0] for i in range(2)])
    table = torch.cat([sd["embedding_layer.weight"], sd["embedding_layer.figure_token_weight"], vis])
    ref = _reference_llama(F.one_hot(torch.tensor(ids), table.shape[0]).float() @ table, sd,
                           cfg["llm"])
    assert lg.shape == (1, len(ids), V) and lg.dtype == torch.float32
    torch.testing.assert_close(lg[0], ref, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="image latent"):
        model.logits(_vx(1), [ids])  # two image blocks, one image


# --------------------------------------------------------------------------- tokenizer


def test_prompt_ids_with_image_tokens(model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model.tokenizer_path))
    V = model.cfg.vocab_size
    assert sp.get_piece_size() == V
    q = "Is there a pleural effusion?"
    ids = model.prompt_ids(q, 1)
    n = model.cfg.perceiver.num_latents
    assert ids[:2] == [1, V] and ids[2:2 + n] == list(range(V + 2, V + 2 + n))
    assert ids[2 + n] == V + 1
    assert ids[3 + n:] == sp.encode(q) and sp.id_to_piece(ids[3 + n]).startswith("\u2581")
    assert sp.decode(ids[3 + n:]) == q
    # two images, second placed where the prompt says
    two = model.prompt_ids("Compare <image> with <image>", 2)
    assert two[0] == 1 and two.count(V) == 2 and two.count(V + 1) == 2
    assert V + 2 + n in two and two.index(V + 2 + n) > two.index(V + 1)
    with pytest.raises(MedfmError, match="prompt is empty"):
        model.prompt_ids("  ", 1)


# --------------------------------------------------------------------------- generation


def _greedy_by_hand(model, vx, ids, n):
    out = []
    seq = list(ids)
    for _ in range(n):
        nxt = int(model.logits(vx, [seq])[0, -1].argmax())
        out.append(nxt)
        if nxt == model.cfg.eos_id:
            break
        seq.append(nxt)
    return out


def test_greedy_ids_match_a_hand_written_loop(model):
    vx = _vx(4)
    ids = model.prompt_ids("Findings:", 1)
    got = model.generate_ids(vx, [ids], max_new_tokens=12)
    assert got.shape[0] == 1 and 1 <= got.shape[1] <= 12
    assert got[0].tolist() == _greedy_by_hand(model, vx, ids, 12)
    # eos stops generation (force it: a model whose eos is the first greedy token)
    first = int(got[0, 0])
    saved = model.cfg.llm["eos_token_id"]
    model.cfg.llm["eos_token_id"] = first
    try:
        assert model.generate_ids(vx, [ids], max_new_tokens=12).tolist() == [[first]]
    finally:
        model.cfg.llm["eos_token_id"] = saved


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(model):
    prompts = [model.prompt_ids(q, 1) for q in
               ("Is there cardiomegaly?", "Describe the findings of this chest radiograph.",
                "Normal?")]
    assert len({len(p) for p in prompts}) == 3
    vx = torch.cat([_vx(10 + i) for i in range(3)])
    batched = model.generate_ids(vx, prompts, max_new_tokens=10)
    for i, p in enumerate(prompts):
        alone = model.generate_ids(vx[i:i + 1], [p], max_new_tokens=10)[0].tolist()
        row = batched[i].tolist()[:len(alone)]
        assert row == alone, i
        assert all(t == model.cfg.pad_id for t in batched[i].tolist()[len(alone):])
    # the logits of the left-padded batch equal the unpadded ones at every real position
    lb = model.logits(vx, prompts)
    for i, p in enumerate(prompts):
        la = model.logits(vx[i:i + 1], [p])[0]
        torch.testing.assert_close(lb[i, -len(p):], la, atol=1e-5, rtol=1e-5)


def test_stream_pieces_join_to_the_decoded_ids_and_close_stops(model, monkeypatch):
    from napari_medfm.io.types import MedicalImage

    g = np.random.default_rng(0)
    img = MedicalImage(data=(g.random((80, 70)) * 255).astype(np.uint8),
                       geometry=_geom2d(), modality="DX", kind="image2d")
    pieces = list(model.stream([img], "What do you see", max_new_tokens=15))
    vx = model.preprocess([img])[0][None, None]
    ids = model.generate_ids(vx, [model.prompt_ids("What do you see.", 1)], max_new_tokens=15)[0]
    toks = [t for t in ids.tolist() if t != model.cfg.eos_id]
    assert "".join(pieces) == model.tokenizer.decode(toks)
    seen = []
    assert model.generate(img, "What do you see", max_new_tokens=15, stream=seen.append) == \
        "".join(pieces).strip()
    assert seen == pieces
    assert model.generate([img], "What do you see", max_new_tokens=15) == "".join(pieces).strip()
    # closing the iterator stops at the next token
    calls = []
    real = model.net.lang_model.forward
    monkeypatch.setattr(model.net.lang_model, "forward",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    it = model.stream([img], "What do you see?", max_new_tokens=15)
    next(it)
    n = len(calls)
    it.close()
    assert len(calls) == n <= 3
    with pytest.raises(MedfmError, match="prompt is empty"):
        list(model.stream([img], ""))


def _geom2d():
    from napari_medfm.geometry import Geometry

    return Geometry.identity(2)


# --------------------------------------------------------------------------- findings


def test_findings_probabilities_from_answer_likelihoods(model, folder, tmp_path):
    from napari_medfm.io.types import MedicalImage

    g = np.random.default_rng(1)
    img = MedicalImage(data=(g.random((64, 64, 3)) * 255).astype(np.uint8), geometry=_geom2d(),
                       modality="OP", kind="image2d", rgb=True)
    rows = model.findings(img)
    import yaml

    shipped = yaml.safe_load(model_file("findings.yaml").read_text())
    assert [r["finding"] for r in rows] == list(shipped["modalities"]["fundus"])
    for r in rows:
        p_yes = r["probability"]
        p_no = math.exp(r["loglik_no"]) / (math.exp(r["loglik_yes"]) + math.exp(r["loglik_no"]))
        assert 0.0 < p_yes < 1.0 and p_yes + p_no == pytest.approx(1.0, abs=1e-9)
    # log-likelihood of "Yes." recomputed from the full-sequence logits
    r = rows[0]
    vx = model.preprocess([img])[0][None, None]
    base = model.prompt_ids(r["question"], 1)
    ans = model.encode_text("Yes.")
    lp = torch.log_softmax(model.logits(vx, [base + ans])[0], -1)
    ll = sum(float(lp[len(base) - 1 + i, t]) for i, t in enumerate(ans))
    assert r["loglik_yes"] == pytest.approx(ll, abs=1e-4)
    # own questions (a dict), a group name, and a CXR needs no argument
    own = model.findings(img, prompts={"edema": "Is there edema?"})
    assert [o["finding"] for o in own] == ["edema"]
    assert len(model.findings(img, prompts="pathology")) == len(shipped["modalities"]["pathology"])
    cxr = MedicalImage(data=np.zeros((40, 40), np.uint16), geometry=_geom2d(), modality="CR",
                       kind="image2d")
    assert [c["finding"] for c in model.findings(cxr)] == list(shipped["modalities"]["CXR"])
    unknown = MedicalImage(data=np.zeros((40, 40), np.uint8), geometry=_geom2d(), kind="image2d")
    with pytest.raises(MedfmError, match="pass prompts="):
        model.findings(unknown)


def model_file(name):
    from napari_medfm.models.radfm import model as m

    return m.Path(m.__file__).with_name(name)


# --------------------------------------------------------------------------- conversion / offload


def test_safetensors_shards_load_to_the_same_logits(folder, model, tmp_path):
    from napari_medfm.models.radfm.convert import convert

    out = tmp_path / "st"
    shards = convert(folder, out, dtype=torch.float32, shard_size=40_000)
    assert len(shards) > 1 and all(p.suffix == ".safetensors" for p in shards)
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "radfm_config.json").is_file() and (out / "tokenizer.model").is_file()
    m2 = napari_medfm.load_model("radfm", weights=out, device="cpu")
    vx, ids = _vx(5), [model.prompt_ids("Findings:", 1)]
    assert torch.equal(m2.logits(vx, ids), model.logits(vx, ids))
    assert m2.weights_sha256 != model.weights_sha256 and len(m2.files) == len(shards)
    bf = convert(folder, tmp_path / "bf16")  # default: bf16 (half the size)
    m3 = napari_medfm.load_model("radfm", weights=tmp_path / "bf16", device="cpu",
                                 precision="fp32")
    torch.testing.assert_close(m3.logits(vx, ids), model.logits(vx, ids), atol=0.2, rtol=0.05)
    assert sum(p.stat().st_size for p in bf) < 0.6 * (folder / "pytorch_model.bin").stat().st_size


def test_device_map_dispatch_gives_the_same_logits(folder, model):
    pytest.importorskip("accelerate")
    m2 = napari_medfm.load_model("radfm", weights=folder, device="cpu", device_map={"": "cpu"})
    vx, ids = _vx(6), [model.prompt_ids("Impression:", 1)]
    torch.testing.assert_close(m2.logits(vx, ids), model.logits(vx, ids))
    assert m2.describe()["options"]["device_map"] == "custom"


def test_memory_message_lists_the_options(folder, monkeypatch, caplog):
    from napari_medfm.models.radfm import model as m

    msg = m._fit_message(RadFMConfig(), 30 * 2**30, 15 * 2**30, "cuda:0")
    for s in ("30.0 GiB", "15.0 GiB", "quantize='8bit'", "quantize='4bit'", "bitsandbytes",
              "device_map='auto'", "device='cpu'"):
        assert s in msg
    monkeypatch.setattr("napari_medfm.runtime.device.available_memory", lambda dev: 1000)
    with caplog.at_level("WARNING"):
        napari_medfm.load_model("radfm", weights=folder, device="cpu")
    assert "only 0.0 GiB is free" in caplog.text  # the CPU warns (weights are memory-mapped)


def test_untied_reference_net_state_dict_keys_are_the_release():
    cfg = RadFMConfig.from_dict(tiny_config())
    with torch.device("meta"):
        net = RadFMNetwork(cfg)
    keys = set(net.state_dict())
    sd = released_state_dict(tiny_config(), legacy=False)
    assert keys == set(sd)
    assert {"embedding_layer.weight", "embedding_layer.figure_token_weight",
            "embedding_layer.fc.weight", "embedding_layer.perceiver.latents",
            "embedding_layer.vision_encoder.pos_embedding.dep_embed.weight",
            "embedding_layer.vision_encoder.to_patch_embedding.1.weight",
            "embedding_layer.vision_encoder.transformer.layers.0.0.fn.to_qkv.weight",
            "embedding_layer.perceiver.layers.0.1.3.weight",
            "lang_model.lm_head.weight"} <= keys
    assert not any("to_qkv.bias" in k or "perceiver.layers.0.0.to_q.bias" in k for k in keys)
