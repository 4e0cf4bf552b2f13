"""``medfm embed`` and ``medfm zero-shot`` on the real CT with tiny random Merlin checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from napari_medfm.cli import main
from napari_medfm.models.merlin.testing import save_random_checkpoint, train_tokenizer
from tests.conftest import real_path

CT = "ct/totalseg_nifti/example_ct.nii.gz"
CT_SMALL = "ct/totalseg_nifti/example_ct_sm.nii.gz"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("merlin_cli")
    ck = save_random_checkpoint(d / "merlin_tiny.pt", config="tiny", seed=2)
    train_tokenizer(d)
    return ck


def test_embed_one_real_ct(ckpt, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    rc = main(["embed", "--model", "merlin", "--weights", str(ckpt), "--config", "tiny",
               "--output", str(out), str(real_path(CT))])
    assert rc == 0
    with np.load(out) as z:
        arrays = {k: z[k] for k in z.files}
    assert sorted(arrays) == ["contrastive_embedding", "image_embedding", "phenotype_logits"]
    assert arrays["contrastive_embedding"].shape == (512,)
    assert arrays["phenotype_logits"].shape == (1692,)
    assert all(a.dtype == np.float32 for a in arrays.values())
    # the same numbers as the Python API on the same file
    from napari_medfm.io import read
    from napari_medfm.runtime.registry import load_model

    model = load_model("merlin", weights=ckpt, device="cpu", config="tiny", text=False)
    ref = model.embed(read(real_path(CT))[0])
    for k, v in ref.items():
        np.testing.assert_allclose(arrays[k], v, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left


def test_embed_several_inputs_into_a_folder(ckpt, tmp_path, capsys):
    dicom = real_path("ct/totalseg_dicom_series")
    small = real_path(CT_SMALL)
    copy = tmp_path / "in" / "example_ct_sm.nii.gz"
    copy.parent.mkdir()
    shutil.copy(small, copy)
    outdir = tmp_path / "out"
    rc = main(["embed", "--weights", str(ckpt), "--config", "tiny", "--no-progress", "--json",
               "-o", str(outdir), str(small), str(dicom), str(copy)])
    assert rc == 0
    written = json.loads(capsys.readouterr().out)["outputs"]
    names = sorted(p.split("/")[-1] for p in written)
    assert names == ["example_ct_sm.npz", "example_ct_sm_2.npz", "totalseg_dicom_series.npz"]
    a, b = np.load(outdir / "example_ct_sm.npz"), np.load(outdir / "example_ct_sm_2.npz")
    np.testing.assert_array_equal(a["image_embedding"], b["image_embedding"])
    c = np.load(outdir / "totalseg_dicom_series.npz")
    assert not np.allclose(a["phenotype_logits"], c["phenotype_logits"])


def test_embed_refuses_a_2d_image_cleanly(ckpt, tmp_path, capsys):
    cxr = next(iter(sorted(real_path("cxr").rglob("*.png"))), None)
    if cxr is None:
        pytest.skip("no CXR PNG in the corpus")
    out = tmp_path / "x.npz"
    rc = main(["embed", "--weights", str(ckpt), "--config", "tiny", "-o", str(out), str(cxr)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "3D CT" in err and "Traceback" not in err
    assert not out.exists()


def test_embed_missing_weights_message(tmp_path, capsys):
    rc = main(["embed", "--model", "merlin", "-o", str(tmp_path / "x.npz"),
               str(real_path(CT_SMALL))])
    err = capsys.readouterr().err
    assert rc == 2
    assert "medfm weights fetch merlin" in err
    assert not (tmp_path / "x.npz").exists()


def test_zero_shot_json_with_phenotypes(ckpt, capsys):
    rc = main(["zero-shot", "--weights", str(ckpt), "--config", "tiny", "--no-progress",
               "--json", "--phenotypes", "5", "--finding", "ascites",
               "--finding", "splenomegaly", str(real_path(CT_SMALL))])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert [f["finding"] for f in res["findings"]] == ["ascites", "splenomegaly"]
    assert all(0 < f["probability"] < 1 for f in res["findings"])
    assert len(res["phenotypes"]) == 5 and res["phenotypes"][0]["name"]
    prov = res["provenance"]
    assert prov["model"] == "merlin" and len(prov["weights_sha256"]) == 64
    assert prov["preprocessing"]["pixdim"] == [1.5, 1.5, 3.0]
    assert "PatientName" not in json.dumps(res)


def test_zero_shot_bad_prompt_file(ckpt, tmp_path, capsys):
    bad = tmp_path / "p.yaml"
    bad.write_text("findings: []\n")
    rc = main(["zero-shot", "--weights", str(ckpt), "--config", "tiny", "--prompts", str(bad),
               str(real_path(CT_SMALL))])
    assert rc == 2
    assert "p.yaml" in capsys.readouterr().err
