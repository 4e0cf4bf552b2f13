"""Merlin preprocessing: identical to MONAI's file-based chain; orientation-proof; CT checks."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from napari_medfm.errors import WrongModalityError
from napari_medfm.geometry import Geometry
from napari_medfm.io.types import MedicalImage
from napari_medfm.models.merlin.preprocess import check_ct, preprocess
from tests.conftest import real_path

CT = "ct/totalseg_nifti/example_ct.nii.gz"
CT_SMALL = "ct/totalseg_nifti/example_ct_sm.nii.gz"


def monai_reference(path, reader=None):
    """Merlin's chain with MONAI dictionary transforms, loading the file itself."""
    from monai.transforms import (
        CenterSpatialCropd,
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
    )

    k = ["image"]
    chain = Compose([
        LoadImaged(keys=k, reader=reader) if reader is not None else LoadImaged(keys=k),
        EnsureChannelFirstd(keys=k),
        Orientationd(keys=k, axcodes="RAS"),
        Spacingd(keys=k, pixdim=(1.5, 1.5, 3.0), mode="bilinear"),
        ScaleIntensityRanged(keys=k, a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
        SpatialPadd(keys=k, spatial_size=(224, 224, 160)),
        CenterSpatialCropd(keys=k, roi_size=(224, 224, 160)),
    ])
    return chain({"image": str(path)})["image"]


def test_equal_to_monai_dictionary_chain_on_real_nifti():
    path = real_path(CT)
    from napari_medfm.io import read

    (image,) = read(path)
    assert image.modality == "CT"
    ours = preprocess(image)
    ref = monai_reference(path)
    assert tuple(ours.tensor.shape) == (1, 224, 224, 160) and ours.tensor.dtype == torch.float32
    assert torch.equal(ours.tensor, ref.as_tensor().float())
    np.testing.assert_allclose(ours.affine_ras, np.asarray(ref.affine), atol=1e-4)
    assert float(ours.tensor.min()) >= 0.0 and float(ours.tensor.max()) <= 1.0
    assert float(ours.tensor.std()) > 0.05  # real anatomy, not padding


def test_equal_to_monai_chain_on_real_dicom_series():
    from monai.data import PydicomReader

    from napari_medfm.io import read

    folder = real_path("ct/totalseg_dicom_series")
    (image,) = read(folder)
    ours = preprocess(image)
    ref = monai_reference(folder, reader=PydicomReader())
    np.testing.assert_allclose(ours.affine_ras, np.asarray(ref.affine), atol=1e-3)
    assert float((ours.tensor - ref.as_tensor()).abs().max()) < 1e-5


def _reoriented(img: sitk.Image, code: str) -> sitk.Image:
    out = sitk.DICOMOrient(img, code)
    assert Geometry.from_sitk(out).orientation == code
    return out


@pytest.mark.parametrize("code", ["RAS", "LPI", "PIR"])
def test_same_tensor_whatever_the_storage_orientation(tmp_path, code):
    src = sitk.ReadImage(str(real_path(CT_SMALL)))
    base = preprocess(MedicalImage.from_sitk(src, modality="CT"))
    # the same CT stored flipped/permuted, written and read back with SimpleITK
    path = tmp_path / f"ct_{code}.nii.gz"
    sitk.WriteImage(_reoriented(src, code), str(path))
    other = MedicalImage.from_sitk(sitk.ReadImage(str(path)), modality="CT")
    assert other.shape != base.tensor.shape
    pre = preprocess(other)
    np.testing.assert_allclose(pre.affine_ras, base.affine_ras, atol=1e-4)
    assert float((pre.tensor - base.tensor).abs().max()) < 1e-5


def test_resampled_copy_gives_nearly_the_same_tensor(tmp_path):
    """A CT resampled by SimpleITK onto a 2 mm LPS grid maps to the same anatomy."""
    src = sitk.ReadImage(str(real_path(CT_SMALL)), sitk.sitkFloat32)
    lps = sitk.DICOMOrient(src, "LPS")
    spacing = (2.0, 2.0, 3.0)
    size = [int(round(sz * sp / ns)) for sz, sp, ns in zip(lps.GetSize(), lps.GetSpacing(),
                                                            spacing, strict=True)]
    res = sitk.Resample(lps, size, sitk.Transform(), sitk.sitkLinear, lps.GetOrigin(), spacing,
                        lps.GetDirection(), -1024.0, sitk.sitkFloat32)
    pa = preprocess(MedicalImage.from_sitk(src, modality="CT"))
    pb = preprocess(MedicalImage.from_sitk(res, modality="CT"))
    # the two 224x224x160 grids cover the same anatomy (their field of view differs by the
    # rounding of the resampled size, i.e. by about one voxel)
    assert np.abs(pa.affine_ras[:3, 3] - pb.affine_ras[:3, 3]).max() < 3.0
    a, b = pa.tensor, pb.tensor
    inside = (a > 0.05) & (b > 0.05)
    assert inside.float().mean() > 0.01
    corr = np.corrcoef(a[inside].numpy(), b[inside].numpy())[0, 1]
    assert corr > 0.85
    # negative control: the same pixels with a left-right flip that the geometry ignores
    flipped = MedicalImage(np.ascontiguousarray(sitk.GetArrayFromImage(res)[:, :, ::-1]),
                           Geometry.from_sitk(res), modality="CT")
    c = preprocess(flipped).tensor
    both = (a > 0.05) & (c > 0.05)
    assert np.corrcoef(a[both].numpy(), c[both].numpy())[0, 1] < corr - 0.2


def test_refuses_2d_and_non_ct():
    flat = MedicalImage(np.zeros((64, 64), np.int16), Geometry.identity(2), modality="CT",
                        kind="image2d", name="cxr")
    with pytest.raises(WrongModalityError, match="3D CT volume"):
        check_ct(flat)
    rgb = MedicalImage(np.zeros((64, 64, 3), np.uint8), Geometry.identity(2), kind="image2d",
                       rgb=True, name="photo")
    with pytest.raises(WrongModalityError):
        check_ct(rgb)
    mr = MedicalImage(np.random.default_rng(0).integers(0, 800, (8, 32, 32)).astype(np.int16),
                      Geometry.identity(3), modality="MR", name="t1")
    with pytest.raises(WrongModalityError, match="modality is MR"):
        check_ct(mr)
    # unknown modality: accepted only when values look like Hounsfield units
    ot_positive = MedicalImage(np.full((8, 32, 32), 300, np.int16), Geometry.identity(3),
                               modality="OT", name="unknown")
    with pytest.raises(WrongModalityError, match="Hounsfield"):
        check_ct(ot_positive)
    hu = np.full((8, 32, 32), -1000, np.int16)
    hu[:, 8:24, 8:24] = 40
    check_ct(MedicalImage(hu, Geometry.identity(3), modality="OT", name="hu"))
