"""Sliding-window generator vs MONAI, progress granularity, cancel, OOM; network path geometry."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.progress import drain

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _net(out_channels=3, seed=0):
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(3, 1, out_channels, (4, 8), (2,), num_res_units=1).eval()


class _Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("bs", [1, 4])
@pytest.mark.parametrize("shape", [(37, 30, 21), (12, 40, 9)])  # second: smaller than the window
def test_equals_monai_sliding_window_inference(mode, bs, shape):
    from monai.inferers import sliding_window_inference

    from napari_medfm.tasks.sliding_window import sliding_window_gen

    net = _net()
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = sliding_window_inference(x, (16, 16, 16), bs, net, overlap=0.3, mode=mode)
    out = drain(sliding_window_gen(x, net, (16, 16, 16), bs, overlap=0.3, mode=mode))
    assert out.shape == ref.shape == (1, 3, *shape)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_yields_once_per_window_batch():
    from monai.data.utils import dense_patch_slices

    from napari_medfm.tasks.sliding_window import scan_interval, sliding_window_gen, window_count

    net = _Counting(_net())
    x = torch.rand(1, 1, 40, 33, 20)
    roi, ov, bs = (16, 16, 16), 0.25, 3
    n_win = len(dense_patch_slices(x.shape[2:], roi, scan_interval(x.shape[2:], roi, (ov,) * 3)))
    assert window_count(x.shape[2:], roi, ov) == n_win
    n_batches = -(-n_win // bs)
    events = []
    drain(sliding_window_gen(x, net, roi, bs, ov), events.append)
    assert len(events) == n_batches + 1  # a "started" event, then one per batch
    assert [e.step for e in events] == list(range(n_batches + 1))
    assert all(e.total == n_batches for e in events)
    assert net.calls == n_batches


def test_cancel_stops_within_one_batch():
    from napari_medfm.tasks.sliding_window import sliding_window_gen

    net = _Counting(_net())
    gen = sliding_window_gen(torch.rand(1, 1, 48, 48, 48), net, (8, 8, 8), 2, 0.5)
    assert next(gen).step == 0
    assert next(gen).step == 1
    gen.close()  # what worker.quit() amounts to: the generator is not resumed
    assert net.calls == 1
    with pytest.raises(StopIteration):
        next(gen)


def test_out_of_memory_gives_advice():
    from napari_medfm.tasks.sliding_window import OutOfMemoryError, sliding_window_gen

    def oom(_x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 8.00 GiB")

    with pytest.raises(OutOfMemoryError) as err:
        drain(sliding_window_gen(torch.rand(1, 1, 20, 20, 20), oom, (16, 16, 16)))
    msg = str(err.value)
    assert "roi-size" in msg and "device cpu" in msg and "(16, 16, 16)" in msg

    def other(_x):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        drain(sliding_window_gen(torch.rand(1, 1, 20, 20, 20), other, (16, 16, 16)))


def test_bf16_autocast_close_to_fp32():
    from napari_medfm.tasks.sliding_window import sliding_window_gen

    net = _net()
    x = torch.rand(1, 1, 24, 24, 24)
    a = drain(sliding_window_gen(x, net, (16, 16, 16), 2, 0.25, precision="fp32"))
    b = drain(sliding_window_gen(x, net, (16, 16, 16), 2, 0.25, precision="bf16"))
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.1
    from napari_medfm.errors import MedfmError

    with pytest.raises(MedfmError, match="precision"):
        drain(sliding_window_gen(x, net, (16, 16, 16), precision="fp8"))


class _Threshold(torch.nn.Module):
    """Two-class 'network' with fixed weights: class 1 where the scaled intensity > 0.7."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1) * 10
            self.conv.bias[:] = torch.tensor([7.0, -7.0])

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("kind", ["flipped", "oblique"])
def test_network_segmenter_result_sits_on_source_grid(kind):
    """Pre-processing reorients (RAS) and resamples (2 mm); labels must come back on the CT."""
    from napari_medfm.tasks.segment import NetworkSegmenter, SegmentSettings, segment

    if kind == "flipped":
        direction = np.diag([-1.0, -1.0, 1.0])  # LPS -> RAS-flipped axes
        spacing = (1.1, 0.9, 2.5)
    else:
        a = np.deg2rad(25)
        direction = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        direction = direction @ np.diag([1.0, -1.0, 1.0])
        spacing = (1.3, 1.0, 2.0)
    geo = Geometry(spacing, (-20.0, 15.0, 100.0), direction)
    shape = (30, 48, 44)
    zz, yy, xx = np.indices(shape)
    pts = geo.index_to_physical(np.stack([xx, yy, zz], -1).reshape(-1, 3)).reshape(*shape, 3)
    centre = geo.index_to_physical(np.array([30.0, 20.0, 12.0]))  # off-centre, asymmetric
    ball = np.linalg.norm(pts - centre, axis=-1) <= 14.0
    hu = np.where(ball, 800.0, -200.0).astype(np.float32)
    img = MedicalImage(hu, geo, modality="CT", name="phantom", metadata={"units": "HU"})
    seg = NetworkSegmenter(_Threshold(), {1: "dense"}, model_id="threshold", roi_size=(16, 16, 16),
                           spacing=(2.0, 2.0, 2.0))
    events = []
    res = drain(segment(img, seg, SegmentSettings(sw_batch_size=2)), events.append)
    assert res.geometry == geo and res.labels.shape == shape
    got = res.labels == 1
    dice = 2 * (got & ball).sum() / (got.sum() + ball.sum())
    assert dice > 0.9, dice
    # the centre of mass (in mm) is where the ball is: no flip, shift or transposition
    com = geo.index_to_physical(np.argwhere(got).mean(0)[::-1])
    assert np.linalg.norm(com - centre) < 1.5
    assert events[-1].step == events[-1].total
    assert res.settings["roi_size"] == [16, 16, 16] and res.settings["sw_batch_size"] == 2
