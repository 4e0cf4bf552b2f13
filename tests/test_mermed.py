"""MerMED-FM: safe extraction from the released training-checkpoint layout, strict loading into
timm ViT-B/16, CLS embedding contract, safetensors conversion, preprocessing."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medfm.errors import WeightsError, WrongModalityError
from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.models import encoder2d
from napari_medfm.models.mermed import model as mm
from napari_medfm.models.mermed.spec import VIT_B16
from napari_medfm.runtime.registry import get_spec, load_model

torch.set_num_threads(2)

TINY = dict(img_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0,
            qkv_bias=True)


def random_vit_state(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the exact keys/shapes of a timm ViT (no slow weight init)."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device("meta"):
        m = VisionTransformer(**config, num_classes=0, global_pool="token")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, t in m.state_dict().items():
        if k.endswith(".weight") and ("norm" in k):
            out[k] = 1.0 + 0.1 * torch.randn(t.shape, generator=g)
        else:
            out[k] = 0.05 * torch.randn(t.shape, generator=g)
    return out


def save_released_layout(path: Path, backbone: dict[str, torch.Tensor], *, extra_teacher=None,
                         evil: object | None = None) -> Path:
    """A checkpoint laid out like the released MerMED.pth (teacher/student/optimizer/...)."""
    dim = backbone["cls_token"].shape[-1]
    teacher = {f"module.backbone.{k}": v for k, v in backbone.items()}
    teacher["module.head.mlp.0.weight"] = torch.randn(32, dim)  # projection head, dropped
    teacher["module.head.last_layer.weight"] = torch.randn(16, 32)
    teacher.update(extra_teacher or {})
    # the student differs from the teacher (stride-0 tensors keep the file small)
    student = {k: torch.zeros(1).expand(v.shape) for k, v in teacher.items()}
    ckpt = {
        "student": student,
        "teacher": teacher,
        "optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(4)}},
                      "param_groups": [{"lr": 5e-5, "weight_decay": 0.04, "params": [0]}]},
        "memory_bank": torch.randn(256, 64),
        "memory_labels": torch.randint(0, 7, (64,)),
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_base", patch_size=16, lr=5e-5,
                                   output_dir=Path("/tmp/out")),
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                        "growth_interval": 2000, "_growth_tracker": 17},
    }
    if evil is not None:
        ckpt["evil"] = evil
    torch.save(ckpt, path)
    return path


def tiny_mermed_checkpoint(path: Path, seed: int = 0) -> Path:
    return save_released_layout(path, random_vit_state(TINY, seed))


def grey_image(arr: np.ndarray, modality: str = "DX") -> MedicalImage:
    return MedicalImage(arr, Geometry.identity(2), modality=modality, kind="image2d")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def vitb16_ckpt(tmp_path_factory):
    state = random_vit_state(VIT_B16, seed=1)
    path = save_released_layout(tmp_path_factory.mktemp("mermed") / "MerMED.pth", state)
    return path, state


def test_spec_registered():
    spec = get_spec("mermed")
    assert spec.embedding_dim == 768 and spec.dims == (2,)
    assert spec.repo_id == "youngzhou12/MerMED" and spec.files[0].filename == "MerMED.pth"
    assert spec.licence == "CC BY-NC 4.0"
    assert {"CXR", "fundus", "pathology", "CT", "OCT", "ultrasound", "dermatology"} <= set(
        spec.modalities)


def test_released_layout_loads_strictly_and_matches_timm(vitb16_ckpt):
    import timm

    path, state = vitb16_ckpt
    enc = load_model("mermed", weights=path)
    assert enc.spec.id == "mermed" and enc.embedding_dim == 768
    assert enc.weights_sha256 == _sha(path)
    # timm's own ViT-B/16 definition loaded with the same (teacher) tensors
    with torch.device("meta"):
        ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    ref.load_state_dict(state, strict=True, assign=True)
    ref.eval()
    rng = np.random.default_rng(0)
    img = grey_image(rng.integers(0, 4096, (300, 260)).astype(np.uint16))
    x = enc.preprocess(img)
    with torch.inference_mode():
        want = ref.forward_features(torch.from_numpy(x)[None])[:, 0].numpy()[0]
    got = enc.embed(img)
    assert set(got) == {"image_embedding", "modality"} and got["modality"] == "CXR"
    e = got["image_embedding"]
    assert e.dtype == np.float32 and e.shape == (768,)
    np.testing.assert_allclose(e, want, rtol=1e-4, atol=1e-4)
    # the teacher, not the (all-zero) student, was loaded
    assert float(np.abs(e).sum()) > 1.0


def test_teacher_key_selection_and_inferred_config(tmp_path):
    state = random_vit_state(TINY, seed=3)
    path = save_released_layout(tmp_path / "ck.pth", state)
    sd, cfg = mm.read_backbone(path)
    assert cfg is None
    assert set(sd) == set(state)
    for k in state:
        assert torch.equal(sd[k], state[k])
    inferred = mm.infer_vit_config(sd)
    assert inferred["embed_dim"] == 128 and inferred["depth"] == 2 and inferred["num_heads"] == 2
    assert inferred["img_size"] == 224 and inferred["patch_size"] == 16
    sd_student, _ = mm.read_backbone(path, key="student")
    assert float(sd_student["cls_token"].abs().sum()) == 0.0


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = save_released_layout(tmp_path / "evil.pth", random_vit_state(TINY), evil=Evil())
    with pytest.raises(WeightsError) as err:
        load_model("mermed", weights=path)
    assert "evil.pth" in str(err.value)
    assert not marker.exists()


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path):
    state = random_vit_state(TINY)
    del state["blocks.1.mlp.fc2.bias"]
    p1 = save_released_layout(tmp_path / "missing.pth", state)
    with pytest.raises(WeightsError, match="blocks.1.mlp.fc2.bias"):
        load_model("mermed", weights=p1)
    p2 = save_released_layout(tmp_path / "extra.pth", random_vit_state(TINY),
                              extra_teacher={"module.backbone.blocks.0.ls1.gamma":
                                             torch.ones(128)})
    with pytest.raises(WeightsError, match="ls1.gamma"):
        load_model("mermed", weights=p2)
    p3 = tmp_path / "nobackbone.pth"
    torch.save({"teacher": {"foo": torch.zeros(3)}, "epoch": 1}, p3)
    with pytest.raises(WeightsError, match="no ViT backbone"):
        load_model("mermed", weights=p3)


def test_convert_to_safetensors_roundtrip(tmp_path):
    from safetensors import safe_open

    src = tiny_mermed_checkpoint(tmp_path / "MerMED.pth", seed=5)
    dst = mm.convert_to_safetensors(src, tmp_path / "model.safetensors")
    with safe_open(str(dst), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "cls_token" in keys and not any(k.startswith(("head", "module")) for k in keys)
    assert meta["source_sha256"] == _sha(src)
    a = load_model("mermed", weights=src)
    b = load_model("mermed", weights=tmp_path)  # folder with model.safetensors
    img = grey_image(np.random.default_rng(1).integers(0, 255, (240, 240)).astype(np.uint8))
    np.testing.assert_allclose(a.embed(img)["image_embedding"],
                               b.embed(img)["image_embedding"], rtol=1e-5, atol=1e-5)
    assert b.weights_sha256 == _sha(dst) != a.weights_sha256


def test_volume_refused_unless_slice_chosen(tmp_path):
    enc = load_model("mermed", weights=tiny_mermed_checkpoint(tmp_path / "MerMED.pth"))
    rng = np.random.default_rng(2)
    vol = rng.integers(-1000, 1500, (5, 64, 64)).astype(np.int16)
    ct = MedicalImage(vol, Geometry.identity(3), modality="CT", kind="volume",
                      metadata={"units": "HU"})
    with pytest.raises(WrongModalityError, match="slice"):
        enc.embed(ct)
    mid = enc.embed(ct, slice_index="middle")["image_embedding"]
    one = MedicalImage(vol[2], Geometry.identity(2), modality="CT", kind="image2d")
    np.testing.assert_allclose(mid, enc.embed(one)["image_embedding"], rtol=1e-5, atol=1e-5)
    other = enc.embed(ct, slice_index=0)["image_embedding"]
    assert not np.allclose(mid, other)
    with pytest.raises(WrongModalityError, match="out of range"):
        enc.embed(ct, slice_index=9)


def test_preprocessing_normalisation_window_and_channels():
    # constant grey CXR: replicated to 3 channels, then (v - mean) / std of CXR
    img = grey_image(np.full((50, 80), 128, np.uint8), modality="CR")
    x = encoder2d.preprocess(img, size=32)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    mean, std = encoder2d.MODALITY_NORMS["CXR"]
    np.testing.assert_allclose(x[0], (128 / 255 - mean[0]) / std[0], atol=1e-5)
    np.testing.assert_allclose(x[0], x[2])
    # fundus RGB uses the per-channel fundus statistics
    rgb = MedicalImage(np.full((40, 40, 3), [255, 0, 51], np.uint8), Geometry.identity(2),
                       modality="OP", kind="image2d", rgb=True)
    y = encoder2d.preprocess(rgb, size=16)
    m, s = encoder2d.MODALITY_NORMS["fundus"]
    np.testing.assert_allclose(y[:, 0, 0], (np.array([1.0, 0.0, 0.2]) - m) / s, atol=1e-4)
    # CT window 40/400: -160 HU -> 0, 240 HU -> 1, then CT mean/std
    ct = MedicalImage(np.array([[-1000, -160], [240, 3000]], np.int16).repeat(8, 0).repeat(8, 1),
                      Geometry.identity(2), modality="CT", kind="image2d")
    unit = encoder2d.to_unit(np.asarray(ct.data), ct=True)
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert unit[0, 8] == 0.0 and unit[8, 0] == 1.0
    # short side to size then centre crop keeps aspect (a wide image is cropped, not squashed)
    wide = np.zeros((20, 60), np.uint8)
    wide[:, 20:40] = 255  # the central third
    z = encoder2d.preprocess(grey_image(wide), size=20, mean=(0, 0, 0), std=(1, 1, 1))
    assert z.shape == (3, 20, 20) and z.mean() > 0.95
    assert encoder2d.canonical_modality("SM") == "pathology"
    assert encoder2d.canonical_modality("OT") is None


def test_whole_slide_pyramid_uses_the_smallest_sufficient_level():
    levels = [np.full((2000, 1600, 3), 10, np.uint8), np.full((500, 400, 3), 20, np.uint8),
              np.full((125, 100, 3), 30, np.uint8)]
    wsi = MedicalImage(levels, Geometry.identity(2), modality="SM", kind="wsi", rgb=True,
                       multiscale=True)
    assert encoder2d.select_plane(wsi, size=224)[0, 0, 0] == 20
    assert encoder2d.select_plane(wsi, size=64)[0, 0, 0] == 30
    assert encoder2d.select_plane(wsi, size=1000)[0, 0, 0] == 10
    x = encoder2d.preprocess(wsi, size=224, mean=(0, 0, 0), std=(1, 1, 1))
    np.testing.assert_allclose(x, 20 / 255, atol=1e-6)
