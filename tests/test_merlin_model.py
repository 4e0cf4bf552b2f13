"""Merlin loaded-model object on a real CT with tiny random-weight checkpoints:
embed contract, phenotypes, zero-shot, 5-year head, why-maps, text tower, errors."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_medfm.errors import MedfmError, WeightsError, WrongModalityError
from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.models.merlin.phenotypes import load_prompts, phenotype_table
from napari_medfm.models.merlin.testing import (
    save_random_checkpoint,
    save_random_five_year,
    train_tokenizer,
)
from napari_medfm.models.merlin.text import find_tokenizer_dir, sanitize_report
from napari_medfm.runtime.registry import load_model
from tests.conftest import real_path

CT_SMALL = "ct/totalseg_nifti/example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("merlin_weights")
    ck = save_random_checkpoint(d / "merlin_tiny.pt", config="tiny", seed=0)
    train_tokenizer(d / "Clinical-Longformer")
    return ck


@pytest.fixture(scope="module")
def model(weights):
    return load_model("merlin", weights=weights, device="cpu", config="tiny")


@pytest.fixture(scope="module")
def ct():
    return MedicalImage.from_sitk(sitk.ReadImage(str(real_path(CT_SMALL))), modality="CT",
                                  name="example_ct_sm")


@pytest.fixture(scope="module")
def run(model, ct):
    pre = model.prepare(ct)
    return pre, model.forward_image(pre, keep_tokens=True)


def test_embed_contract(model, ct, run):
    _, out = run
    emb = model.embed(ct)
    dim = model.image_config.feature_dim
    assert {k: v.shape for k, v in emb.items()} == {
        "image_embedding": (dim,), "contrastive_embedding": (512,), "phenotype_logits": (1692,)}
    assert all(v.dtype == np.float32 for v in emb.values())
    for k in emb:
        np.testing.assert_allclose(emb[k], out[k], rtol=1e-5, atol=1e-6)
    # the fused path equals the plain eager network on the real input
    with torch.inference_mode():
        ref = model.net(run[0].tensor[None])
    np.testing.assert_allclose(emb["phenotype_logits"], ref["phenotype_logits"][0].numpy(),
                               atol=1e-4)
    assert out["visual_tokens"].shape == (dim, 10, 7, 7)


def test_same_outputs_for_flipped_and_permuted_storage(model, ct, run, tmp_path):
    _, base = run
    path = tmp_path / "pir.mha"
    sitk.WriteImage(sitk.DICOMOrient(ct.to_sitk(), "PIR"), str(path))
    other = MedicalImage.from_sitk(sitk.ReadImage(str(path)), modality="CT")
    assert other.geometry.orientation == "PIR"
    got = model.forward_image(model.prepare(other), keep_tokens=True)
    for k in base:
        np.testing.assert_allclose(got[k], base[k], atol=1e-5)
    # negative control: a left-right flip the geometry does not know about moves the
    # layer4 tokens (the pooled vectors of a random tiny network barely notice)
    wrong = MedicalImage(np.ascontiguousarray(ct.data[:, :, ::-1]), ct.geometry, modality="CT")
    bad = model.forward_image(model.prepare(wrong), keep_tokens=True)
    assert np.abs(bad["visual_tokens"] - base["visual_tokens"]).max() > 1e-3  # 100x the tolerance


def test_phenotypes_are_sigmoid_of_logits_with_names(model, ct, run):
    _, out = run
    top = model.phenotypes(ct, top_k=5)
    assert len(top) == 5
    probs = [t["probability"] for t in top]
    assert probs == sorted(probs, reverse=True)
    table = phenotype_table()
    for t in top:
        lg = out["phenotype_logits"][t["index"]]
        assert t["probability"] == pytest.approx(1 / (1 + np.exp(-lg)), rel=1e-5)
        assert (t["phecode"], t["name"]) == table[t["index"]]
    assert max(out["phenotype_logits"]) == pytest.approx(top[0]["logit"], rel=1e-5)
    assert table[0] == ("8", "Intestinal infection") and len(table) == 1692


def test_zero_shot_matches_a_manual_computation(model, run):
    _, out = run
    prompts = load_prompts()
    assert len(prompts.names) == 31
    res = model.zero_shot_from(out["contrastive_embedding"], prompts)
    assert [r["finding"] for r in res] == prompts.names
    img = out["contrastive_embedding"] / np.linalg.norm(out["contrastive_embedding"])
    for r in res[:3]:
        pos, neg = prompts.findings[r["finding"]]
        sp = np.mean(model.text_features(pos) @ img)
        sn = np.mean(model.text_features(neg) @ img)
        p = np.exp(sp / 0.01) / (np.exp(sp / 0.01) + np.exp(sn / 0.01))
        assert r["probability"] == pytest.approx(p, rel=1e-4)
        assert 0.0 < r["probability"] < 1.0


def test_text_features_are_normalised_and_padding_invariant(model):
    short = "no ascites."
    alone = model.text_features([short])[0]
    model._text_cache.clear()
    batch = model.text_features([short, "moderate ascites . the spleen is enlarged . " * 20])
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batch[0], alone, atol=1e-5)
    assert np.abs(batch[0] - batch[1]).max() > 1e-4  # different text, different feature
    # truncation at 1024 tokens
    from napari_medfm.models.merlin.text import tokenize

    enc = tokenize(model.tokenizer, ["liver normal . " * 2000])
    assert enc["input_ids"].shape[1] == 1024


def test_sanitize_report():
    assert sanitize_report("Liver: NORMAL.  No ascites,") == "liver : normal . no ascites ,"
    assert sanitize_report("4.5 cm AAA") == "4 . 5 cm aaa"


def test_custom_prompt_file_and_bad_files(model, run, tmp_path):
    _, out = run
    p = tmp_path / "mine.yaml"
    p.write_text("temperature: 0.05\nfindings:\n  ascites:\n    positive: [ascites.]\n"
                 "    negative: [no ascites.]\n")
    ps = load_prompts(p)
    (r,) = model.zero_shot_from(out["contrastive_embedding"], ps)
    assert r["finding"] == "ascites" and ps.temperature == 0.05
    bad = tmp_path / "bad.yaml"
    bad.write_text("findings:\n  ascites:\n    positive: [ascites]\n")
    with pytest.raises(MedfmError, match="bad.yaml.*ascites.*negative"):
        load_prompts(bad)
    with pytest.raises(MedfmError, match="cannot read prompt file"):
        load_prompts(tmp_path / "missing.yaml")


def test_why_map_is_on_the_ct_grid(model, ct, run):
    pre, out = run
    why = model.explain(ct, "ascites", pre=pre, tokens=out["visual_tokens"])
    assert why.shape == ct.shape and why.geometry == ct.geometry
    assert why.data.dtype == np.float32
    assert float(why.data.min()) >= 0.0 and float(why.data.max()) <= 1.0 + 1e-6
    assert float(why.data.std()) > 0  # not a constant map
    # phenotype maps by phecode; recomputing the trunk gives the same map
    a = model.explain(ct, "574.1", pre=pre, tokens=out["visual_tokens"])
    b = model.explain(ct, "phecode:574.1", pre=pre)
    np.testing.assert_allclose(a.data, b.data, atol=1e-4)
    assert "Cholelithiasis" in a.name
    with pytest.raises(MedfmError, match="cannot explain"):
        model.explain(ct, "no such finding", pre=pre, tokens=out["visual_tokens"])


def test_why_map_follows_the_anatomy(model, ct, run):
    """A map computed on the network grid lands where that grid says, on the CT grid."""
    from napari_medfm.models.merlin.explain import to_source_grid

    pre, _ = run
    cam = np.zeros((224, 224, 160), np.float32)
    cam[100:124, 100:124, 70:90] = 1.0  # a block in network (RAS x, y, z) voxel indices
    mapped = to_source_grid(cam, pre.affine_ras, ct, name="block")
    centre_ras = pre.affine_ras @ np.array([111.5, 111.5, 79.5, 1.0])
    centre_lps = centre_ras[:3] * np.array([-1, -1, 1])
    zyx = np.argwhere(mapped.data > 0.5).mean(axis=0)
    got = ct.geometry.index_to_physical(zyx[::-1])
    np.testing.assert_allclose(got, centre_lps, atol=3.0)


def test_five_year_head(weights, ct, tmp_path):
    fy = save_random_five_year(tmp_path / "five_year.pt", config="tiny")
    m = load_model("merlin", weights=weights, device="cpu", config="tiny", text=False,
                   five_year=fy)
    risks = m.five_year_risk(ct)
    assert [r["output"] for r in risks] == [1, 2, 3, 4, 5, 6]
    for r in risks:
        assert r["probability"] == pytest.approx(1 / (1 + np.exp(-r["logit"])))
    # the 5-year file given as the main weights: a clear hint
    with pytest.raises(WeightsError, match="5-year checkpoint"):
        load_model("merlin", weights=fy, device="cpu", config="tiny")
    m2 = load_model("merlin", weights=weights, device="cpu", config="tiny", text=False)
    with pytest.raises(WeightsError, match="five_year"):
        m2.five_year_risk(ct)


def test_refuses_2d_and_mr(model):
    cxr = MedicalImage(np.zeros((256, 256), np.uint16), Geometry.identity(2), modality="DX",
                       kind="image2d", name="cxr")
    with pytest.raises(WrongModalityError, match="3D CT"):
        model.embed(cxr)
    mr = MedicalImage(np.full((10, 32, 32), 200, np.int16), Geometry.identity(3), modality="MR",
                      name="mr")
    with pytest.raises(WrongModalityError, match="MR"):
        model.zero_shot(mr)


def test_missing_weights_and_tokenizer_messages(tmp_path, weights):
    with pytest.raises(WeightsError) as ei:
        load_model("merlin", device="cpu")
    assert "medfm weights fetch merlin" in str(ei.value)
    assert "i3_resnet_clinical_longformer_best_clip" in str(ei.value)
    lone = tmp_path / "lone" / "merlin.pt"
    lone.parent.mkdir()
    lone.write_bytes(weights.read_bytes())
    m = load_model("merlin", weights=lone, device="cpu", config="tiny")
    with pytest.raises(WeightsError, match="--tokenizer"):
        m.load_text()
    with pytest.raises(WeightsError, match="vocab.json"):
        find_tokenizer_dir(tmp_path)
    image_only = load_model("merlin", weights=lone, device="cpu", config="tiny", text=False)
    with pytest.raises(MedfmError, match="image-only"):
        image_only.text_features(["ascites"])


def test_out_of_memory_becomes_advice(model):
    def boom():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(MedfmError) as ei:
        model._run(boom, "Merlin's image tower")
    msg = str(ei.value)
    assert "Out of memory" in msg and "Merlin's image tower" in msg
    with pytest.raises(ValueError):  # other errors pass through unchanged
        model._run(lambda: (_ for _ in ()).throw(ValueError("x")), "Merlin")


def test_findings_task_progress_and_cancel(model, ct):
    from napari_medfm.progress import drain
    from napari_medfm.tasks.zeroshot import zero_shot as findings_task

    events = []
    res = drain(findings_task(model, ct, top_k=3), events.append)
    assert len(res.findings) == 31 and len(res.phenotypes) == 3
    assert events[0].message.startswith("preprocessing") and events[-1].message == "phenotypes"
    assert [e.step for e in events] == sorted(e.step for e in events)
    assert all(e.total == events[0].total for e in events)
    assert res.provenance["weights_sha256"] and res.provenance["temperature"] == 0.01
    assert res.to_csv().count("\nfinding,") == 31
    # cancel = close the generator after the first step: nothing else runs
    gen = findings_task(model, ct)
    first = next(gen)
    gen.close()
    assert first.step == 0
