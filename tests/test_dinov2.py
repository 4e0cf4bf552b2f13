"""RAD-DINO / DINOv2 through transformers from a hub-layout folder (tiny random config)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from napari_medfm.errors import WeightsError, WrongModalityError
from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.models import encoder2d
from napari_medfm.runtime.registry import get_spec, load_model

torch.set_num_threads(2)


def make_hub_folder(folder, seed=0):
    """config.json + model.safetensors + preprocessor_config.json, like microsoft/rad-dino."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=56, patch_size=14)
    Dinov2Model(cfg).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                      image_mean=[0.53, 0.53, 0.53], image_std=[0.25, 0.25, 0.25],
                      do_convert_rgb=True).save_pretrained(folder)
    return folder


@pytest.fixture
def hub(tmp_path):
    return make_hub_folder(tmp_path / "rad-dino")


def _cxr(seed=0, shape=(90, 120)):
    arr = np.random.default_rng(seed).integers(0, 4096, shape).astype(np.uint16)
    return MedicalImage(arr, Geometry((0.2, 0.2), (0, 0), np.eye(2)), modality="DX",
                        kind="image2d")


def test_specs():
    rd, db = get_spec("rad-dino"), get_spec("dinov2-base")
    assert rd.repo_id == "microsoft/rad-dino" and rd.licence == "MIT" and rd.embedding_dim == 768
    assert db.repo_id == "facebook/dinov2-base" and db.licence == "Apache-2.0"
    assert {f.filename for f in rd.files} == {"config.json", "model.safetensors",
                                               "preprocessor_config.json"}


def test_embedding_is_cls_after_layernorm(hub):
    from transformers import AutoImageProcessor, Dinov2Model

    enc = load_model("rad-dino", weights=hub)
    img = _cxr()
    e = enc.embed(img)["image_embedding"]
    assert e.shape == (32,) and e.dtype == np.float32
    assert enc.weights_sha256 == hashlib.sha256(
        (hub / "model.safetensors").read_bytes()).hexdigest()
    # independent path: the processor on the 8-bit RGB view, the model's hidden states, the
    # final layernorm applied by hand to the CLS token
    rgb = encoder2d.unit_rgb_uint8(img, size=64)
    assert rgb.shape == (90, 120, 3) and rgb.dtype == np.uint8
    proc = AutoImageProcessor.from_pretrained(hub, backend="pil")
    px = proc(images=[rgb], return_tensors="pt")["pixel_values"]
    assert tuple(px.shape) == (1, 3, 56, 56)
    ref = Dinov2Model.from_pretrained(hub).eval()
    with torch.no_grad():
        out = ref(pixel_values=px, output_hidden_states=True)
        want = ref.layernorm(out.hidden_states[-1])[:, 0].numpy()[0]
    np.testing.assert_allclose(e, want, rtol=1e-4, atol=1e-5)
    batch = enc.embed_batch([img, _cxr(1)])
    np.testing.assert_allclose(batch[0], e, rtol=1e-4, atol=1e-5)
    assert not np.allclose(batch[0], batch[1])


def test_dinov2_base_loads_from_model_file_path(hub):
    enc = load_model("dinov2-base", weights=hub / "model.safetensors")
    assert enc.spec.id == "dinov2-base"
    rgb = MedicalImage(np.random.default_rng(3).integers(0, 255, (70, 70, 3), dtype=np.uint8),
                       Geometry.identity(2), modality="OT", kind="image2d", rgb=True)
    assert enc.embed(rgb)["image_embedding"].shape == (32,)
    vol = MedicalImage(np.zeros((3, 20, 20), np.int16), Geometry.identity(3), modality="CT")
    with pytest.raises(WrongModalityError):
        enc.embed(vol)
    assert enc.embed(vol, slice_index="middle")["image_embedding"].shape == (32,)


def test_strict_and_incomplete_folders_refused(hub, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(hub / "model.safetensors"))
    key = next(k for k in sd if "encoder.layer.1" in k)
    del sd[key]
    save_file(sd, str(hub / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="do not match"):
        load_model("rad-dino", weights=hub)
    other = make_hub_folder(tmp_path / "b")
    (other / "preprocessor_config.json").unlink()
    with pytest.raises(WeightsError, match="preprocessor_config.json"):
        load_model("rad-dino", weights=other)


def test_index_and_query_with_rad_dino(hub, real_data, tmp_path):
    from napari_medfm import io as mio
    from napari_medfm.progress import drain
    from napari_medfm.tasks.retrieval.build import build_index, collect_inputs
    from napari_medfm.tasks.retrieval.query import query_task

    folder = real_data / "cxr" / "tbx11k"
    if not folder.exists():
        pytest.skip(f"missing {folder}")
    enc = load_model("rad-dino", weights=hub)
    res = drain(build_index(tmp_path / "ix", enc, collect_inputs([folder])))
    assert res.added == 2 and res.manifest["model_id"] == "rad-dino"
    img = mio.read(folder / "tb0005.png")[0]
    hits = drain(query_task(tmp_path / "ix", img, k=2))  # model reloaded from the index record
    assert hits[0].case_id == "tb0005.png" and hits[0].score == pytest.approx(1.0, abs=1e-4)
