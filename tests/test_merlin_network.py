"""Merlin image tower: released key layout, sizes, fused inference path, strict loading."""

from __future__ import annotations

import pytest
import torch

from napari_medfm.errors import WeightsError
from napari_medfm.models.merlin.model import MerlinCLIP
from napari_medfm.models.merlin.network import (
    FULL_CONFIG,
    TINY_CONFIG,
    I3DResNet,
    fuse_for_inference,
)
from napari_medfm.models.merlin.testing import randomize_batchnorm, save_random_checkpoint
from napari_medfm.models.merlin.text import FULL_TEXT_CONFIG, MerlinTextEncoder
from napari_medfm.runtime.registry import get_spec, load_model


def test_full_size_image_tower_matches_the_release():
    with torch.device("meta"):  # shapes only: no memory, no random init
        net = I3DResNet(FULL_CONFIG)
    sd = net.state_dict()
    # sizes quoted for the release count every state-dict element (incl. BN statistics)
    total = sum(v.numel() for v in sd.values())
    trunk = sum(v.numel() for k, v in sd.items()
                if not k.startswith(("classifier.", "contrastive_head.")))
    assert round(total / 1e6, 1) == 122.0
    assert round(trunk / 1e6, 1) == 117.5
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 3, 7, 7)
    assert net.conv1.stride == (1, 2, 2) and net.conv1.padding == (1, 3, 3)
    assert net.conv1.bias is None
    assert net.maxpool.kernel_size == 3 and net.maxpool.stride == 2
    blocks = {i: len(getattr(net, f"layer{i}")) for i in range(1, 5)}
    assert blocks == {1: 3, 2: 8, 3: 36, 4: 3}
    for i, width in zip(range(1, 5), (64, 128, 256, 512), strict=True):
        assert tuple(sd[f"layer{i}.0.conv1.weight"].shape)[0] == width
        assert tuple(sd[f"layer{i}.0.conv3.weight"].shape)[0] == width * 4
        assert f"layer{i}.0.downsample.0.weight" in sd
        assert f"layer{i}.0.downsample.1.running_var" in sd
        assert f"layer{i}.1.downsample.0.weight" not in sd
        stride = getattr(net, f"layer{i}")[0].conv2.stride
        assert stride == ((1, 1, 1) if i == 1 else (2, 2, 2))
    assert "layer3.35.bn3.num_batches_tracked" in sd
    assert tuple(sd["classifier.weight"].shape) == (1692, 2048, 1, 1, 1)
    assert tuple(sd["contrastive_head.weight"].shape) == (512, 2048, 1, 1, 1)
    assert "contrastive_head.bias" in sd and "classifier.bias" in sd


def test_full_clip_layout_has_every_released_prefix():
    with torch.device("meta"):
        clip = MerlinCLIP(I3DResNet(FULL_CONFIG), MerlinTextEncoder(FULL_TEXT_CONFIG))
    sd = clip.state_dict()
    heads = {k.split(".")[0] for k in sd}
    assert heads == {"logit_scale", "encode_image", "encode_text"}
    assert tuple(sd["encode_text.text_encoder.embeddings.word_embeddings.weight"].shape) == (
        50265, 768)
    assert tuple(sd["encode_text.text_encoder.embeddings.position_embeddings.weight"].shape) == (
        4098, 768)
    assert tuple(sd["encode_text.linear_layer.weight"].shape) == (512, 768)
    assert "encode_text.text_encoder.encoder.layer.11.attention.self.query_global.weight" in sd
    assert "encode_image.i3_resnet.layer4.2.bn3.running_mean" in sd


def test_layer4_grid_and_input_layout():
    torch.manual_seed(0)
    net = I3DResNet(TINY_CONFIG).eval()
    x = torch.rand(1, 1, 224, 224, 160)
    with torch.inference_mode():
        out = net(x)
    assert tuple(out["visual_tokens"].shape) == (1, TINY_CONFIG.feature_dim, 10, 7, 7)
    assert tuple(out["phenotype_logits"].shape) == (1, 1692)
    assert tuple(out["contrastive_embedding"].shape) == (1, 512)
    assert tuple(out["image_embedding"].shape) == (1, TINY_CONFIG.feature_dim)
    # (B, 1, H, W, D) -> (B, 1, D, H, W)
    y = I3DResNet.to_network_layout(torch.arange(24.0).reshape(1, 1, 2, 3, 4))
    assert tuple(y.shape) == (1, 1, 4, 2, 3)
    assert float(y[0, 0, 3, 1, 2]) == float(torch.arange(24.0).reshape(2, 3, 4)[1, 2, 3])
    with pytest.raises(ValueError):
        I3DResNet.to_network_layout(torch.zeros(1, 3, 4, 4, 4))


@pytest.mark.parametrize("cpu", [True, False])
def test_fused_path_equals_eager(cpu):
    torch.manual_seed(1)
    net = randomize_batchnorm(I3DResNet(TINY_CONFIG), seed=3).eval()
    x = torch.rand(2, 1, 50, 45, 33)  # odd sizes: the slab-wise stem's edge cases
    fused = fuse_for_inference(net, cpu=cpu)
    assert fused.conv1.in_channels == 1  # channel repeat folded into conv1
    with torch.inference_mode():
        a, b = net(x), fused(x)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k
    with torch.inference_mode():  # the slab-wise stem equals conv1 + BN + ReLU + max-pool
        ref = net.stem(x)
        for slab in (1, 3, 64):
            got = fused.stem(I3DResNet.to_network_layout(x).contiguous(), slab=slab)
            assert torch.allclose(ref, got, atol=1e-5), slab
    # a real difference is detected: breaking one folded weight changes the output
    with torch.no_grad():
        fused.conv1.weight.mul_(-1.0)
        c = fused(x)
    assert not torch.allclose(a["image_embedding"], c["image_embedding"], atol=1e-4)


def test_released_layout_loads_strictly_and_bad_keys_are_listed(tmp_path):
    ck = save_random_checkpoint(tmp_path / "merlin.pt", config="tiny")
    m = load_model("merlin", weights=ck, device="cpu", config="tiny", text=False)
    ref = torch.load(ck, weights_only=True)
    got = m.net.state_dict()
    for k, v in got.items():
        assert torch.equal(v, ref[f"encode_image.i3_resnet.{k}"]), k
    assert m.text_net is None  # image-only: no text tower built

    sd = dict(ref)
    del sd["encode_image.i3_resnet.layer2.0.bn2.running_var"]
    sd["encode_image.i3_resnet.extra_head.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    with pytest.raises(WeightsError) as ei:
        load_model("merlin", weights=bad, device="cpu", config="tiny", text=False)
    msg = str(ei.value)
    assert "layer2.0.bn2.running_var" in msg and "extra_head.weight" in msg
    assert "missing" in msg and "unexpected" in msg

    # a full-size model refuses the tiny checkpoint (shape mismatches are listed)
    with pytest.raises(WeightsError, match="shape mismatches"):
        load_model("merlin", weights=ck, device="cpu", config="full", text=False)
    # the default ("auto") reads the tower shapes from the checkpoint itself
    auto = load_model("merlin", weights=ck, device="cpu", text=False)
    assert auto.image_config == m.image_config


def test_whole_clip_checkpoint_loads_strictly_with_text(tmp_path):
    ck = save_random_checkpoint(tmp_path / "merlin.pt", config="tiny")
    from napari_medfm.models.merlin.testing import train_tokenizer

    train_tokenizer(tmp_path)
    m = load_model("merlin", weights=ck, device="cpu", config="tiny", text=True)
    ref = torch.load(ck, weights_only=True)
    for k, v in m.text_net.state_dict().items():
        assert torch.equal(v, ref[f"encode_text.{k}"]), k

    sd = dict(ref)
    sd.pop("logit_scale")
    bad = tmp_path / "nologit" / "merlin.pt"
    bad.parent.mkdir()
    torch.save(sd, bad)
    train_tokenizer(bad.parent)
    m2 = load_model("merlin", weights=bad, device="cpu", config="tiny")
    with pytest.raises(WeightsError, match="logit_scale"):
        m2.load_text()


def test_spec_entry():
    spec = get_spec("merlin")
    assert spec.family == "merlin" and spec.embedding_dim == 2048
    assert spec.tasks == ("embed", "zero-shot", "phenotype", "explain")
    assert spec.modalities == ("CT",) and spec.dims == (3,)
    assert spec.repo_id == "stanfordmimi/Merlin" and spec.licence == "MIT"
    assert [f.required for f in spec.files] == [True, False]
    assert spec.files[0].filename.startswith("i3_resnet_clinical_longformer_best_clip")
    assert "Blankemeier" in spec.citation
