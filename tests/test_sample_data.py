"""Offline CT phantom (HU, anatomy, geometry) and the checksummed on-demand sample fetch."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from napari_medfm.sample_data import (
    NOISE_HU,
    PHANTOM_HU,
    PHANTOM_LABELS,
    SAMPLES,
    SampleDownloadError,
    cached_sample_path,
    fetch_sample,
    make_phantom,
)
from tests.conftest import REAL, real_path

CORPUS_PATHS = {  # where each public sample sits in the test corpus (same bytes)
    "ct": "ct/totalseg_nifti/example_ct.nii.gz",
    "cxr": "cxr/nih_chestxray14/00000001_000.png",
    "fundus": "fundus/skimage_retina.jpg",
    "pathology": "pathology/wsi/CMU-1-Small-Region.svs",
}


@pytest.fixture(scope="module")
def phantom():
    return make_phantom()


def test_phantom_grid_and_geometry(phantom):
    ct, lab = phantom
    assert ct.shape == lab.shape == (96, 160, 160)
    assert ct.data.dtype == np.int16 and lab.data.dtype == np.uint8
    assert ct.modality == "CT" and ct.metadata["units"] == "HU" and lab.is_label
    g = ct.geometry
    assert g.spacing == (1.5, 1.5, 2.5) and g.orientation == "LPS"
    assert lab.geometry == g
    centre = g.index_to_physical((np.array([160, 160, 96]) - 1) / 2.0)
    np.testing.assert_allclose(centre, 0.0, atol=1e-9)
    assert ct.contrast_limits() == (-160.0, 240.0)


def test_phantom_is_deterministic():
    a, _ = make_phantom(shape=(12, 40, 40), seed=3)
    b, _ = make_phantom(shape=(12, 40, 40), seed=3)
    c, _ = make_phantom(shape=(12, 40, 40), seed=4)
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)


def test_phantom_hu_per_organ_as_documented(phantom):
    ct, lab = phantom
    present = set(np.unique(lab.data)) - {0}
    assert present == set(PHANTOM_LABELS)
    for value, (name, _colour, tissue) in PHANTOM_LABELS.items():
        vals = ct.data[lab.data == value].astype(float)
        assert vals.size > 500, name
        if tissue == "bone":  # cortical rim + cancellous core
            assert PHANTOM_HU["cancellous_bone"] - 60 < np.median(vals) < PHANTOM_HU["cortical_bone"] + 60
            assert vals.max() > 900 and vals.min() > 300
            continue
        assert vals.mean() == pytest.approx(PHANTOM_HU[tissue], abs=1.5), name
        assert vals.std() == pytest.approx(NOISE_HU, rel=0.1), name
    # outside the body: air; corners of every slice
    assert ct.data[:, :3, :3].mean() == pytest.approx(PHANTOM_HU["air"], abs=3)
    # fat exists (subcutaneous + visceral)
    assert np.mean(np.abs(ct.data - PHANTOM_HU["fat"]) < 25) > 0.05
    # label tables describe every label
    assert set(lab.metadata["label_names"]) == set(PHANTOM_LABELS)
    assert all(len(c) == 3 for c in lab.metadata["label_colors"].values())


def test_phantom_anatomy_in_patient_space(phantom):
    """Liver on the patient's right, spleen left, spine posterior, lungs superior (LPS mm)."""
    ct, lab = phantom

    def centroid(value):
        idx_zyx = np.argwhere(lab.data == value).mean(axis=0)
        return ct.geometry.index_to_physical(idx_zyx[::-1])

    liver, spleen, vert, aorta = centroid(1), centroid(2), centroid(7), centroid(8)
    assert liver[0] < -20 and spleen[0] > 20  # x: + = patient left
    assert vert[1] > liver[1] and vert[1] > aorta[1]  # y: + = posterior
    assert centroid(3)[0] < 0 < centroid(4)[0]  # right / left kidney
    assert centroid(5)[2] > liver[2] > centroid(3)[2]  # z: + = superior


def test_phantom_custom_shape_and_spacing():
    ct, lab = make_phantom(shape=(20, 64, 48), spacing=(0.8, 0.7, 5.0), seed=1)
    assert ct.shape == (20, 64, 48) and ct.geometry.spacing == (0.8, 0.7, 5.0)
    assert set(np.unique(lab.data)) >= {1, 2, 7}
    with pytest.raises(ValueError, match="too small"):
        make_phantom(shape=(2, 10, 10))


# ------------------------------------------------------------------------- downloads

def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pinned_hashes_match_the_corpus(real_data):
    sums = {}
    for line in (REAL / "SHA256SUMS").read_text().splitlines():
        digest, _, rel = line.partition("  ")
        sums[rel.strip()] = digest
    for key, rel in CORPUS_PATHS.items():
        assert SAMPLES[key].sha256 == sums[rel], key
        assert _sha256(REAL / rel) == SAMPLES[key].sha256, key
        assert all(u.startswith("https://") for u in SAMPLES[key].urls)


def test_fetch_from_local_mirror_then_cache(tmp_path):
    src = real_path(CORPUS_PATHS["cxr"])
    path = fetch_sample("cxr", mirrors={"cxr": src.as_uri()})
    assert path == cached_sample_path("cxr") and path.is_file()
    assert _sha256(path) == SAMPLES["cxr"].sha256
    # cached: a dead mirror is not even tried
    again = fetch_sample("cxr", mirrors={"cxr": (tmp_path / "gone.png").as_uri()})
    assert again == path


def test_fetch_checksum_mismatch_leaves_nothing(tmp_path):
    wrong = real_path("cxr/tbx11k/h0001.png")
    with pytest.raises(SampleDownloadError, match="checksum") as err:
        fetch_sample("cxr", mirrors={"cxr": wrong.as_uri()})
    assert "sha256" in str(err.value)
    assert not cached_sample_path("cxr").exists()
    assert not any(p.name.startswith("tmp") for p in cached_sample_path("cxr").parent.iterdir())


def test_fetch_offline_gives_advice():
    # a closed local port stands in for "no network"; nothing leaves this machine
    with pytest.raises(SampleDownloadError) as err:
        fetch_sample("ct", mirrors={"ct": "http://127.0.0.1:9/example_ct.nii.gz"})
    msg = str(err.value)
    assert "offline" in msg and str(cached_sample_path("ct")) in msg and "phantom" in msg
    with pytest.raises(SampleDownloadError, match="unknown sample"):
        fetch_sample("mri")


def test_mirror_folder_env(tmp_path, monkeypatch):
    src = real_path(CORPUS_PATHS["fundus"])
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(src, mirror / SAMPLES["fundus"].filename)
    monkeypatch.setenv("MEDFM_SAMPLE_MIRROR", str(mirror))
    path = fetch_sample("fundus")
    assert _sha256(path) == SAMPLES["fundus"].sha256


# ------------------------------------------------------------------ npe2 sample contributions

def test_npe2_phantom_sample_function():
    from napari_medfm._napari.sample import phantom_ct

    layers = phantom_ct()
    assert [t[2] for t in layers] == ["image", "labels"]
    data, kw, _ = layers[0]
    assert kw["contrast_limits"] == (-160.0, 240.0) and kw["scale"] == (2.5, 1.5, 1.5)
    assert layers[1][1]["metadata"]["label_names"][1] == "liver"


def test_open_sample_in_real_viewer(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-medfm", "phantom")
    kinds = {type(lyr).__name__: lyr for lyr in viewer.layers}
    assert set(kinds) == {"Image", "Labels"}
    ct, lab = kinds["Image"], kinds["Labels"]
    np.testing.assert_allclose(ct.data_to_world((0, 0, 0)), lab.data_to_world((0, 0, 0)))
    np.testing.assert_allclose(ct.data_to_world((95, 159, 159)), [118.75, 119.25, 119.25])
    # label colours and names from the label tables
    liver_rgb = np.array(PHANTOM_LABELS[1][1]) / 255.0
    np.testing.assert_allclose(lab.colormap.map(np.array([1]))[0, :3], liver_rgb, atol=1e-6)
    assert lab.colormap.map(np.array([0]))[0, 3] == 0  # background transparent
    feats = lab.features.set_index("index")["name"]
    assert feats[1] == "liver" and feats[7] == "vertebra"


def test_downloaded_sample_reads_through_our_readers(monkeypatch):
    pytest.importorskip("napari_medfm.io.volume", reason="io/volume.py not written yet")
    from napari_medfm._napari.sample import sample_ct

    src = real_path(CORPUS_PATHS["ct"])
    monkeypatch.setenv("MEDFM_SAMPLE_MIRROR", str(src.parent))
    layers = sample_ct()
    assert len(layers) == 1
    data, kw, kind = layers[0]
    assert kind == "image" and data.shape == (112, 101, 122)
