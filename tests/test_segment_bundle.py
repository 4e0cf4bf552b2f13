"""MONAI bundles through the plugin == MONAI's own ``monai.bundle run`` on the same NIfTI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import real_path

from napari_medfm.progress import drain

torch = pytest.importorskip("torch")

CT = "ct/totalseg_nifti/example_ct_sm.nii.gz"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def bundle(tmp_path):
    from napari_medfm.models.segmenters.bundle import write_demo_bundle

    return write_demo_bundle(tmp_path / "demo_bundle", roi_size=(32, 32, 32),
                             pixdim=(4.0, 4.0, 4.0), sw_batch_size=2)


def test_bundle_matches_monai_bundle_run(bundle, tmp_path):
    pytest.importorskip("ignite", reason="MONAI's bundle evaluator needs pytorch-ignite")
    import monai.bundle
    import SimpleITK as sitk

    from napari_medfm.geometry import Geometry
    from napari_medfm.io import volume
    from napari_medfm.runtime.weights import sha256_file
    from napari_medfm.tasks.segment import segment

    src = real_path(CT)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(src, data / src.name)
    out_dir = tmp_path / "monai_out"
    # (b) MONAI's own bundle inference: LoadImaged from the file, SupervisedEvaluator, SaveImaged
    monai.bundle.run(run_id="run", config_file=str(bundle / "configs" / "inference.json"),
                     meta_file=str(bundle / "configs" / "metadata.json"),
                     bundle_root=str(bundle), dataset_dir=str(data), output_dir=str(out_dir),
                     device="$torch.device('cpu')")
    ref_files = list(out_dir.glob("*.nii.gz"))
    assert len(ref_files) == 1
    ref = sitk.ReadImage(str(ref_files[0]))

    # (a) the plugin on the in-memory image
    img = volume.read(src)[0]
    events = []
    res = drain(segment(img, f"bundle:{bundle}"), events.append)
    assert Geometry.from_sitk(ref) == res.geometry == img.geometry
    ref_arr = sitk.GetArrayFromImage(ref)
    assert ref_arr.shape == res.labels.shape
    assert len(np.unique(ref_arr)) >= 2  # a non-trivial label map
    np.testing.assert_array_equal(res.labels, ref_arr)

    assert res.model_id == "bundle:medfm_demo_unet"
    assert res.label_names == {1: "soft tissue", 2: "dense"}
    assert res.weights_sha256 == sha256_file(bundle / "models" / "model.pt")
    assert res.settings["roi_size"] == [32, 32, 32] and res.settings["sw_batch_size"] == 2
    # progress: pre-processing, one event per window batch, post-processing, done
    steps = [e.step for e in events]
    assert steps == sorted(steps) and events[-1].step == events[-1].total
    assert len(events) >= 4


def test_bundle_weights_load_strictly(bundle):
    from monai.networks.nets import UNet

    from napari_medfm.errors import WeightsError
    from napari_medfm.io import volume
    from napari_medfm.tasks.segment import load_segmenter, segment

    wrong = UNet(3, 1, 2, (4, 8), (2,))  # a different network: keys/shapes do not match
    torch.save(wrong.state_dict(), bundle / "models" / "model.pt")
    seg = load_segmenter(f"bundle:{bundle}")
    with pytest.raises(WeightsError, match="does not match"):
        drain(segment(volume.read(real_path(CT))[0], seg))


def test_bundle_folder_errors(tmp_path, bundle):
    from napari_medfm.errors import MedfmError, WeightsError
    from napari_medfm.models.segmenters.bundle import label_names_from_metadata
    from napari_medfm.tasks.segment import load_segmenter

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MedfmError, match="inference.json"):
        load_segmenter(f"bundle:{empty}")
    (bundle / "models" / "model.pt").unlink()
    with pytest.raises(WeightsError, match="model.pt"):
        load_segmenter(f"bundle:{bundle}")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert label_names_from_metadata(meta) == {1: "soft tissue", 2: "dense"}
    assert label_names_from_metadata({}) == {}


def test_bundle_without_invertd_is_resampled_onto_source_grid(tmp_path):
    """No Invertd in the bundle: our nearest-neighbour resampling == MONAI's Invertd(nearest).

    3.5 mm network grid vs the 3 mm CT: no source voxel centre falls exactly half-way between
    two network voxels, so both nearest-neighbour implementations must agree voxel for voxel.
    """
    from napari_medfm.io import volume
    from napari_medfm.models.segmenters.bundle import write_demo_bundle
    from napari_medfm.runtime.trust import trust_bundle
    from napari_medfm.tasks.segment import segment

    bundle = write_demo_bundle(tmp_path / "b35", roi_size=(32, 32, 32), pixdim=(3.5, 3.5, 3.5))
    img = volume.read(real_path(CT))[0]
    cfg_path = bundle / "configs" / "inference.json"
    cfg = json.loads(cfg_path.read_text())
    act, inv, disc, save = cfg["postprocessing"]["transforms"]
    assert inv["_target_"] == "Invertd" and disc["_target_"] == "AsDiscreted"
    # reference: argmax in the network's space, then MONAI inverts the labels nearest-neighbour
    cfg["postprocessing"]["transforms"] = [act, disc, dict(inv, nearest_interp=True), save]
    cfg_path.write_text(json.dumps(cfg))
    trust_bundle(bundle)  # an edited config is untrusted until the user says otherwise
    ref = drain(segment(img, f"bundle:{bundle}"))
    cfg["postprocessing"]["transforms"] = [act, disc, save]  # no Invertd at all
    cfg_path.write_text(json.dumps(cfg))
    trust_bundle(bundle)
    without = drain(segment(img, f"bundle:{bundle}"))
    assert without.geometry == img.geometry and without.labels.shape == img.shape
    assert len(np.unique(ref.labels)) >= 2
    assert getattr(without, "model_id", "").startswith("bundle:")
    assert (without.labels == ref.labels).mean() > 0.999
