"""DICOM series reading against the real corpus: geometry vs SimpleITK, HU, labels, dispatch."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medfm.errors import ReadError, UnsupportedFormatError
from napari_medfm.geometry import Geometry
from napari_medfm.io import dicom
from napari_medfm.io import read as read_any
from tests.conftest import real_path

TOTALSEG = "ct/totalseg_dicom_series"
CT3 = "ct/dcmqi_ct3slice"


def sitk_series(folder: Path) -> sitk.Image:
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    return r.Execute()


@pytest.fixture(scope="module")
def totalseg():
    folder = real_path(TOTALSEG)
    images = dicom.read(folder)
    assert len(images) == 1
    return folder, images[0]


@pytest.mark.parametrize("rel", [TOTALSEG, CT3])
def test_series_matches_simpleitk(rel):
    folder = real_path(rel)
    [img] = dicom.read(folder)
    ref = sitk_series(folder)
    assert img.kind == "volume" and img.modality == "CT"
    assert img.geometry.same_grid(Geometry.from_sitk(ref), img.data.shape,
                                  sitk.GetArrayViewFromImage(ref).shape, atol=1e-3)
    # HU values voxel for voxel (GDCM applies the same slope/intercept)
    np.testing.assert_array_equal(img.data, sitk.GetArrayFromImage(ref))
    assert img.data.dtype == np.int16  # integral rescale that fits: no float, no int32
    assert img.metadata["units"] == "HU"
    assert img.metadata["rescale"] == {"slope": 1.0, "intercept": -1024.0}
    # every voxel maps to the same physical point as in SimpleITK
    for idx in [(0, 0, 0), (img.data.shape[0] - 1, 17, 301), (1, 511, 5)]:
        ours = img.geometry.index_to_physical(np.array(idx[::-1], dtype=float))
        np.testing.assert_allclose(ours, ref.TransformIndexToPhysicalPoint([int(i) for i in idx[::-1]]),
                                   atol=1e-3)


def test_series_sorted_by_position_not_instance_number(totalseg):
    import pydicom

    folder, img = totalseg
    files = [Path(f) for f in img.metadata["source_files"]]
    assert len(files) == img.data.shape[0] == 20
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    inst = [int(pydicom.dcmread(f, stop_before_pixels=True).InstanceNumber) for f in files]
    assert np.all(np.diff(z) > 0)  # ascending along the slice normal (+z here)
    assert np.all(np.diff(inst) < 0)  # while instance numbers run the other way in this series
    assert img.metadata["slice_spacing"] == pytest.approx(2.0)
    assert img.metadata["slice_thickness"] == pytest.approx(3.0)
    # source_files[k] <-> data[k]: decoding that one file gives that slice
    one = dicom.read(files[7], series_only=False)[0]
    np.testing.assert_array_equal(one.data[0], img.data[7])


def test_totalseg_labels_line_up_voxel_for_voxel(totalseg):
    _, img = totalseg
    seg_path = real_path("ct/totalseg_dicom_series_seg.nii.gz")
    names = json.loads(real_path("ct/totalseg_nifti/labels_total.json").read_text())["labels"]
    seg = sitk.ReadImage(str(seg_path))  # LAS NIfTI; SimpleITK gives its LPS geometry
    seg_geom = Geometry.from_sitk(seg)
    # same set of voxel centres (the grids differ only by a flip of the y axis)
    ny = img.data.shape[1]
    assert np.allclose(np.abs(seg_geom.direction), np.abs(img.geometry.direction))
    corner_ours = img.geometry.index_to_physical([[0, 0, 0], [511, ny - 1, 19]])
    corner_seg = seg_geom.index_to_physical([[0, ny - 1, 0], [511, 0, 19]])
    np.testing.assert_allclose(corner_ours, corner_seg, atol=1e-3)
    on_ours = sitk.GetArrayFromImage(
        sitk.Resample(seg, img.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    )
    seg_arr = sitk.GetArrayFromImage(seg)
    # nothing lost or duplicated: label voxel counts identical after the move
    np.testing.assert_array_equal(np.bincount(on_ours.ravel(), minlength=118),
                                  np.bincount(seg_arr.ravel(), minlength=118))
    np.testing.assert_array_equal(on_ours, seg_arr[:, ::-1, :])
    # anatomy: liver is soft tissue, ribs are dense; a y-flipped overlay would fail this
    liver = on_ours == int(next(k for k, v in names.items() if v == "liver"))
    ribs = np.isin(on_ours, [int(k) for k, v in names.items() if v.startswith("rib_")])
    assert 30 < img.data[liver].mean() < 150
    assert img.data[ribs].mean() > 150
    assert img.data[:, ::-1][liver].mean() < 0 or img.data[:, ::-1][ribs].mean() < 150


def test_single_file_reads_its_series_or_only_itself(totalseg):
    folder, img = totalseg
    one_file = sorted(p for p in folder.iterdir() if p.is_file())[3]
    [whole] = dicom.read(one_file)
    assert whole.data.shape == img.data.shape
    np.testing.assert_array_equal(whole.data, img.data)
    [single] = dicom.read(one_file, series_only=False)
    assert single.data.shape == (1, 512, 512)
    assert single.metadata["source_files"] == [str(one_file)]


def test_dispatch_and_can_read(totalseg):
    folder, _ = totalseg
    assert dicom.can_read(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    assert dicom.can_read(files[0])  # no extension: sniffed by the DICM magic
    [img] = read_any(folder)
    # this real series has an empty SeriesInstanceUID: grouped by folder instead
    assert img.metadata["series_instance_uid"] == ""
    assert img.shape == (20, 512, 512) and img.name == "CT Body 3.0"
    assert not dicom.can_read(real_path("ct/totalseg_nifti/example_ct_sm.nii.gz"))
    assert not dicom.can_read(real_path("cxr/nih_chestxray14/00000001_000.png"))


def test_wsi_dicom_left_to_slide_reader():
    wsi = real_path("pathology/wsi/TCGA-XK-AAJU_small_dicom_wsi.dcm")
    assert dicom.is_wsi_dicom(wsi)
    assert not dicom.can_read(wsi)
    assert not dicom.is_wsi_dicom(real_path("dicom_edge/ct_small_128px.dcm"))
    with pytest.raises(UnsupportedFormatError, match="whole-slide"):
        dicom.read(wsi)


def test_multi_series_folder(tmp_path):
    ct3, ts = real_path(CT3), real_path(TOTALSEG)
    shutil.copytree(ct3, tmp_path / "a")
    shutil.copytree(ts, tmp_path / "b" / "nested")
    shutil.copy(real_path("dicom_edge/cr_monochrome1_fake_siim.dcm"), tmp_path / "cr.dcm")
    (tmp_path / "notes.txt").write_text("not dicom")
    images = dicom.read(tmp_path)
    kinds = sorted((im.modality, im.kind, im.shape) for im in images)
    assert kinds == [("CR", "image2d", (1024, 1024)), ("CT", "volume", (3, 512, 512)),
                     ("CT", "volume", (20, 512, 512))]
    names = [im.name for im in images]
    assert len(set(names)) == 3
    # pick one series
    ct3_uid = dicom.read(ct3)[0].metadata["series_instance_uid"]
    [only] = dicom.read(tmp_path, series_uid=ct3_uid)
    assert only.shape == (3, 512, 512)
    with pytest.raises(ReadError, match="no series"):
        dicom.read(tmp_path, series_uid="1.2.3.4")


def test_corrupt_file_in_folder_is_skipped_with_warning(tmp_path):
    src = real_path(CT3)
    shutil.copytree(src, tmp_path / "s")
    files = sorted((tmp_path / "s").iterdir())
    # a header-only garbage file and a slice whose pixel data is cut short
    (tmp_path / "s" / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI" + b"\xff" * 64)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 5000])
    [img] = dicom.read(tmp_path / "s")
    text = " ".join(img.metadata["warnings"])
    assert files[1].name in text and "truncated pixel data" in text
    assert "garbage.dcm" in text  # listed as unreadable
    full = dicom.read(src)[0]
    assert img.shape == (2, 512, 512)  # the good slices are kept ...
    np.testing.assert_array_equal(img.data[0], full.data[0])
    np.testing.assert_array_equal(img.data[1], full.data[2])
    assert img.geometry.spacing[2] == pytest.approx(2 * full.geometry.spacing[2])  # ... where they are
    assert img.geometry.origin == pytest.approx(full.geometry.origin)
    # the truncated file alone: a clear error naming it
    with pytest.raises(ReadError, match=rf"{files[1].name}: truncated pixel data"):
        dicom.read(files[1], series_only=False)


def test_empty_and_non_dicom(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not dicom.can_read(empty)
    with pytest.raises(UnsupportedFormatError, match="no DICOM"):
        dicom.read(empty)
    txt = tmp_path / "report.dcm"
    txt.write_text("Findings: none.\n" * 20)
    assert not dicom.can_read(txt)
    with pytest.raises(ReadError, match="report.dcm"):
        dicom.read(txt)
    with pytest.raises(UnsupportedFormatError):
        read_any(empty)


def test_no_patient_identifiers_in_names_metadata_or_logs(tmp_path, caplog):
    import pydicom

    caplog.set_level(logging.DEBUG)
    paths = [real_path(CT3), real_path("dicom_edge/cr_monochrome1_fake_siim.dcm"),
             real_path("dicom_edge/ct_j2k_lossless_coronal_pixrep_mismatch_TOSHIBA.dcm"),
             real_path("cxr/dicom/nema_RG1_J2KI_chest_CR.dcm"),
             real_path("dicom_edge/multiframe/emri_small.dcm")]
    secrets = set()
    texts = []
    for p in paths:
        f = p if p.is_file() else sorted(p.iterdir())[0]
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 4:
                secrets.add(v)
        for im in dicom.read(p, series_only=False):
            texts.append(im.name)
            texts.append(repr(im.full_metadata()))
    assert {"JANCT000", "Anonimo", "CompressedSamples^RG1"} <= secrets
    assert caplog.text  # warnings were logged (pixrep trap, MONOCHROME1 spacing, ...)
    blob = caplog.text + "\n".join(texts)
    for s in secrets:
        assert s not in blob, f"patient identifier leaked: {s[:3]}..."


def test_iter_read_yields_progress_and_can_be_cancelled():
    from napari_medfm.progress import Progress

    gen = dicom.iter_read(real_path(TOTALSEG))
    events = []
    for ev in gen:
        assert isinstance(ev, Progress)
        events.append(ev)
        if ev.message.startswith("decoding") and ev.step == 3:
            gen.close()  # cancel: stops at this yield, nothing returned
            break
    assert events[-1].step == 3 and events[-1].total == 20


def test_folder_with_ct_and_dicom_seg(tmp_path):
    shutil.copytree(real_path(CT3), tmp_path / "ct")
    shutil.copy(real_path("ct/dcmqi_ct3slice_seg/liver_seg.dcm"), tmp_path / "liver_seg.dcm")
    images = dicom.read(tmp_path)
    assert [im.is_label for im in images] == [False, True]
    ct, seg = images
    # the SEG is delegated to io/dicom_seg with the CT as reference: same voxel grid
    assert seg.geometry.same_grid(ct.geometry, seg.shape, ct.shape)
    assert seg.data.max() >= 1 and seg.data.dtype.kind in "iu"
    liver = seg.data > 0
    assert 0 < ct.data[liver].mean() < 200  # liver is soft tissue in HU
    _, _, kind = seg.layer_data()
    assert kind == "labels"
