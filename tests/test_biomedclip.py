"""BiomedCLIP: hub-layout loading (strict, offline), embeddings equal to open_clip's own
forward, zero-shot against a plain re-computation, why maps, CLI twins, text search against
brute force on an index over corpus images, image-only indexes refusing text."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from napari_medfm import io as mio
from napari_medfm.cli import main
from napari_medfm.errors import MedfmError, WeightsError
from napari_medfm.models.biomedclip.testing import CLIP_MEAN, CLIP_STD, save_random_hub_folder
from napari_medfm.runtime.cache import get_model
from tests.conftest import real_path

torch.set_num_threads(2)

CXR = "cxr/tbx11k/h0001.png"
FUNDUS = "fundus/skimage_retina.jpg"


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """One random-weight hub folder for every BiomedCLIP test module of the session."""
    return save_random_hub_folder(tmp_path_factory.mktemp("biomedclip") / "biomedclip", seed=3)


@pytest.fixture(scope="session")
def model(hub):
    return get_model("biomedclip", weights=hub, device="cpu")


@pytest.fixture(scope="module")
def reference(hub):
    """The same files loaded by open_clip's own code (its checkpoint loader, transform and
    tokenizer), independently of the adapter."""
    import open_clip
    from open_clip.factory import load_checkpoint
    from open_clip.tokenizer import HFTokenizer

    from napari_medfm.models.biomedclip.model import read_config

    cfg = read_config(hub)
    net = open_clip.CustomTextCLIP(**cfg["model_cfg"]).eval()
    load_checkpoint(net, str(hub / "open_clip_pytorch_model.bin"), strict=True)
    transform = open_clip.image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    tok = HFTokenizer(str(hub / "text"), context_length=256)
    return net, transform, tok


def _ref_image(reference, path):
    from PIL import Image

    net, transform, _ = reference
    x = transform(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        return net.encode_image(x, normalize=True)[0].numpy()


def _ref_text(reference, texts):
    net, _, tok = reference
    with torch.no_grad():
        return net.encode_text(tok(list(texts)), normalize=True).numpy()


# ------------------------------------------------------------------ loading
def test_hub_layout_loads_strictly_offline(hub, model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model.model_id == "biomedclip" and model.embedding_dim == 64
    assert model.logit_scale == pytest.approx(100.0, rel=1e-5)
    assert len(model.weights_sha256) == 64
    # the config names a hub id with old-style keys: resolved to text/, keys mapped
    raw = json.loads((hub / "open_clip_config.json").read_text())
    assert raw["model_cfg"]["text_cfg"]["hf_model_name"].startswith("microsoft/")
    assert "proj" in raw["model_cfg"]["text_cfg"]
    # strict: a missing tensor is refused with the key named
    from napari_medfm.runtime.registry import load_model

    bad = tmp_path / "bad"
    shutil.copytree(hub, bad)
    sd = torch.load(bad / "open_clip_pytorch_model.bin", weights_only=True)
    sd.pop("text.proj.2.weight")
    torch.save(sd, bad / "open_clip_pytorch_model.bin")
    with pytest.raises(WeightsError, match="text.proj.2.weight"):
        load_model("biomedclip", weights=bad, device="cpu")
    # the text tower's config is required locally (never fetched)
    (bad / "text" / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        load_model("biomedclip", weights=bad, device="cpu")


def test_text_folder_assembled_from_the_two_repositories(tmp_path):
    from napari_medfm.runtime.weights import assemble_text_folder, file_sources

    root = save_random_hub_folder(tmp_path / "bc", text_folder=False)
    assert not (root / "text").exists() and (root / "vocab.txt").is_file()
    with pytest.raises(WeightsError, match="config.json"):
        assemble_text_folder(root)
    text = assemble_text_folder(root, config=tmp_path / "biomedbert")
    assert {p.name for p in text.iterdir()} >= {"config.json", "vocab.txt",
                                               "tokenizer_config.json"}
    srcs = file_sources("biomedclip")
    assert srcs["text/config.json"][0] == "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    assert srcs["text/vocab.txt"][0].startswith("microsoft/BiomedCLIP")


# ------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("rel", [CXR, FUNDUS])
def test_image_embedding_equals_open_clip_forward(model, reference, rel):
    path = real_path(rel)
    emb = model.embed(mio.read(path)[0])["image_embedding"]
    ref = _ref_image(reference, path)
    assert emb.dtype == np.float32 and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(emb, ref, atol=2e-5)


def test_text_embedding_equals_open_clip_forward(model, reference):
    texts = ["right pleural effusion", "tumour-infiltrating lymphocytes", "normal retina"]
    np.testing.assert_allclose(model.embed_text(texts), _ref_text(reference, texts), atol=2e-5)


# ------------------------------------------------------------------ zero-shot
def _plain_zero_shot(reference, path, ps, scale):
    img = _ref_image(reference, path).astype(np.float64)
    phrases = ps.phrases()
    cos = dict(zip(phrases, _ref_text(reference, phrases).astype(np.float64) @ img, strict=True))
    out = {}
    for name, (pos, neg) in ps.findings.items():
        sp = np.mean([cos[t] for t in pos])
        sn = np.mean([cos[t] for t in neg])
        out[name] = 1.0 / (1.0 + np.exp(-scale * (sp - sn)))
    return out


def test_zero_shot_matches_a_plain_recomputation(model, reference, tmp_path):
    from napari_medfm.models.biomedclip.model import load_prompt_set

    path = real_path(CXR)
    image = mio.read(path)[0]
    rows = model.findings(image, modality="CXR")
    ps = load_prompt_set(None, "CXR")
    assert len(rows) == 14 and rows[0]["finding"] == "No Finding"
    want = _plain_zero_shot(reference, path, ps, float(np.exp(np.log(100.0))))
    for r in rows:
        assert r["probability"] == pytest.approx(want[r["finding"]], abs=1e-5)
    # a prompt file with its own temperature: scale 1/T instead of the logit scale
    f = tmp_path / "p.yaml"
    f.write_text("temperature: 0.05\nfindings:\n  effusion:\n    positive: [pleural effusion]\n"
                 "    negative: [no pleural effusion]\n")
    rows = model.findings(image, prompts=f)
    want = _plain_zero_shot(reference, path, load_prompt_set(f), 20.0)
    assert rows[0]["probability"] == pytest.approx(want["effusion"], abs=1e-5)
    assert rows[0]["scale"] == pytest.approx(20.0)
    # no modality on a PNG and no prompt file: a clear error listing the shipped sets
    with pytest.raises(MedfmError, match="CXR, pathology, fundus"):
        model.findings(image)


def test_why_map_on_the_image_grid(model):
    image = mio.read(real_path("pathology/patches/histolab/high-nuclei-score-level0.png"))[0]
    why = model.explain(image, "lymphocytes", modality="pathology")
    assert why.shape == image.spatial_shape and why.geometry == image.geometry
    assert float(why.data.min()) >= 0.0 and float(why.data.max()) <= 1.0 + 1e-6
    # 779 x 956: the centre crop leaves the sides out
    assert float(why.data[:, :50].max()) == 0.0 and float(why.data[:, -50:].max()) == 0.0
    assert why.metadata["method"] == "patch-token similarity"


# ------------------------------------------------------------------ CLI twins
def test_cli_zero_shot_records_model_prompts_and_modality(hub, capsys):
    rc = main(["zero-shot", "--model", "biomedclip", "--weights", str(hub), "--device", "cpu",
               "--modality", "CXR", "--no-progress", "--json", str(real_path(CXR))])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["findings"]) == 14
    p = res["provenance"]
    assert p["model"] == "biomedclip" and p["modality"] == "CXR"
    assert p["prompts"] == "biomedclip/cxr.yaml" and len(p["weights_sha256"]) == 64
    rc = main(["zero-shot", "--model", "biomedclip", "--weights", str(hub), "--device", "cpu",
               str(real_path(CXR))])
    err = capsys.readouterr().err
    assert rc == 2 and "--modality" in err and "Traceback" not in err


def test_cli_embed_image_and_text(hub, model, reference, tmp_path, capsys):
    out = tmp_path / "e.npz"
    assert main(["embed", "--model", "biomedclip", "--weights", str(hub), "--device", "cpu",
                 "--modality", "CXR", "-o", str(out), str(real_path(CXR))]) == 0
    with np.load(out) as z:
        np.testing.assert_allclose(z["image_embedding"], _ref_image(reference, real_path(CXR)),
                                   atol=2e-5)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["provenance"]["modality"] == "CXR" and side["provenance"]["model"] == "biomedclip"
    t = tmp_path / "t.npz"
    assert main(["embed", "--model", "biomedclip", "--weights", str(hub), "--device", "cpu",
                 "--text", "right pleural effusion", "-o", str(t)]) == 0
    with np.load(t) as z:
        assert z["text_embedding"].shape == (64,)
        np.testing.assert_allclose(z["text_embedding"],
                                   _ref_text(reference, ["right pleural effusion"])[0], atol=2e-5)


# ------------------------------------------------------------------ text search
@pytest.fixture(scope="module")
def bc_index(hub, model, tmp_path_factory):
    from napari_medfm.progress import drain
    from napari_medfm.tasks.retrieval.build import build_index, collect_inputs

    inputs = [real_path("cxr/tbx11k"), real_path("cxr/nih_chestxray14"),
              real_path("pathology/patches/histolab"), real_path(FUNDUS)]
    items = collect_inputs(inputs)
    ix = tmp_path_factory.mktemp("bcix") / "ix"
    drain(build_index(ix, model, items, chunk_size=4, batch_size=4))
    return ix, items


def test_text_search_equals_brute_force(bc_index, model, capsys):
    ix, items = bc_index
    text = "a chest x-ray showing a pleural effusion"
    assert main(["index", "query", "--index", str(ix), "--text", text, "-k", "3",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["text"] == text and len(res["hits"]) == 3
    # brute force: every corpus image embedded, cosine with the text embedding
    embs = np.stack([model.embed(mio.read(it.path)[0])["image_embedding"] for it in items])
    scores = embs @ model.embed_text([text])[0]
    order = np.argsort(-scores)
    assert [h["case_id"] for h in res["hits"]] == [items[i].case_id for i in order[:3]]
    assert res["hits"][0]["score"] == pytest.approx(float(scores[order[0]]), abs=1e-4)


def test_text_search_on_an_image_only_index_says_so(tmp_path, capsys):
    from test_mermed import tiny_mermed_checkpoint

    ck = tiny_mermed_checkpoint(tmp_path / "MerMED.pth")
    assert main(["index", "build", "--model", "mermed", "--weights", str(ck), "--index",
                 str(tmp_path / "ix"), str(real_path("cxr/tbx11k")), "--modality", "CXR",
                 "--no-progress"]) == 0
    capsys.readouterr()
    rc = main(["index", "query", "--index", str(tmp_path / "ix"), "--text", "effusion"])
    err = capsys.readouterr().err
    assert rc == 2 and "image-only" in err and "biomedclip" in err
