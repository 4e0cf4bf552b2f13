"""DICOM-SEG read/write with highdicom on the real corpus: placement on the referenced CT,
edge encodings, round trips (two labels, TotalSegmentator labels), enhanced multi-frame
sources, references, overlaps, bad input."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from conftest import real_path

from napari_medfm.errors import GeometryError, ReadError
from napari_medfm.geometry import Geometry
from napari_medfm.io.dicom_seg import read_dicom_seg, segment_codes, write_dicom_seg
from napari_medfm.io.types import MedicalImage
from napari_medfm.io.writers import WriteError

EDGE_SEGS = ["liver_expb.dcm", "liver_nonbyte_aligned.dcm", "liver_rle.dcm", "liver_deflate.dcm"]


def _series(folder: Path) -> MedicalImage:
    """Reference CT as our DICOM reader would give it (SimpleITK ImageSeriesReader order)."""
    reader = sitk.ImageSeriesReader()
    names = list(reader.GetGDCMSeriesFileNames(str(folder)))
    reader.SetFileNames(names)
    img = reader.Execute()
    first = pydicom.dcmread(names[0], stop_before_pixels=True)
    return MedicalImage.from_sitk(img, modality="CT", name="ct", metadata={
        "source_files": names,
        "series_instance_uid": str(first.get("SeriesInstanceUID", "") or ""),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "") or ""),
    })


@pytest.fixture(scope="module")
def ct3() -> MedicalImage:
    return _series(real_path("ct/dcmqi_ct3slice"))


@pytest.fixture(scope="module")
def liver_spine() -> tuple[np.ndarray, Geometry]:
    img = sitk.ReadImage(str(real_path("ct/dcmqi_ct3slice_seg/liver_spine_seg.nrrd")))
    return sitk.GetArrayFromImage(img), Geometry.from_sitk(img)


@pytest.fixture(scope="module")
def totalseg() -> tuple[MedicalImage, np.ndarray, np.ndarray]:
    ref = _series(real_path("ct/totalseg_dicom_series"))
    nii = sitk.ReadImage(str(real_path("ct/totalseg_dicom_series_seg.nii.gz")))
    on_grid = sitk.Resample(nii, ref.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                            nii.GetPixelID())
    return ref, sitk.GetArrayFromImage(on_grid), sitk.GetArrayFromImage(nii)


# ------------------------------------------------------------------ corpus SEGs
def test_dcmqi_liver_seg_lands_on_its_ct(ct3, liver_spine):
    seg = read_dicom_seg(real_path("ct/dcmqi_ct3slice_seg/liver_seg.dcm"), reference=ct3)
    labels, nrrd_geom = liver_spine
    assert seg.is_label and seg.geometry == ct3.geometry == nrrd_geom
    assert seg.data.shape == ct3.shape
    assert seg.metadata["label_names"] == {1: "Liver"}
    # the NRRD liver (value 1) from the same dcmqi repo is the very same voxel set
    liver = labels == 1
    assert liver.sum() > 100_000
    np.testing.assert_array_equal(seg.data == 1, liver)
    assert set(np.unique(seg.data)) == {0, 1}
    # colour = the SEG's recommended CIELab, converted by highdicom
    raw = pydicom.dcmread(real_path("ct/dcmqi_ct3slice_seg/liver_seg.dcm"), stop_before_pixels=True)
    lab = tuple(int(v) for v in raw.SegmentSequence[0].RecommendedDisplayCIELabValue)
    assert tuple(seg.metadata["label_colors"][1]) == hd.color.CIELabColor.from_dicom_value(lab).to_rgb()
    ref_series = raw.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert seg.metadata["referenced_series_instance_uids"] == [ref_series]
    assert ref_series == ct3.metadata["series_instance_uid"]


def test_dcmqi_liver_seg_without_reference_has_the_ct_geometry(ct3, liver_spine):
    seg = read_dicom_seg(real_path("ct/dcmqi_ct3slice_seg/liver_seg.dcm"))
    assert seg.geometry == ct3.geometry
    np.testing.assert_array_equal(seg.data == 1, liver_spine[0] == 1)
    layer_data, kwargs, kind = seg.layer_data()
    assert kind == "labels" and kwargs["metadata"]["label_names"] == {1: "Liver"}


@pytest.mark.parametrize("name", EDGE_SEGS)
def test_edge_encoded_segs_read_to_the_same_voxels(ct3, name):
    base = read_dicom_seg(real_path("ct/dcmqi_ct3slice_seg/liver_seg.dcm"), reference=ct3)
    path = real_path(f"dicom_edge/seg/{name}")
    seg = read_dicom_seg(path, reference=ct3)
    assert seg.geometry == ct3.geometry
    np.testing.assert_array_equal(seg.data, base.data)
    alone = read_dicom_seg(path)
    assert alone.geometry.same_grid(ct3.geometry)  # origin, spacing, direction
    rows, cols = alone.data.shape[1:]
    np.testing.assert_array_equal(alone.data, base.data[:, :rows, :cols])
    if name == "liver_nonbyte_aligned.dcm":  # a 510x510 crop placed into the 512x512 CT
        assert (rows, cols) == (510, 510)
        assert not base.data[:, 510:, :].any() and not base.data[:, :, 510:].any()


def test_reader_dispatch_reads_seg_onto_series(liver_spine):
    dicom = pytest.importorskip("napari_medfm.io.dicom")
    (ct,) = dicom.read(real_path("ct/dcmqi_ct3slice"))
    seg = read_dicom_seg(real_path("ct/dcmqi_ct3slice_seg/liver_seg.dcm"), reference=ct)
    assert seg.geometry == ct.geometry
    np.testing.assert_array_equal(seg.data == 1, liver_spine[0] == 1)


@pytest.mark.gui
def test_seg_layer_overlays_ct_layer_in_napari(make_napari_viewer, ct3):
    seg = read_dicom_seg(real_path("dicom_edge/seg/liver_rle.dcm"))  # no reference: own geometry
    viewer = make_napari_viewer()
    data, kwargs, _ = ct3.layer_data()
    ct_layer = viewer.add_image(data, **kwargs)
    sdata, skw, _ = seg.layer_data()
    seg_layer = viewer.add_labels(sdata, **skw)
    zz, yy, xx = np.nonzero(seg.data == 1)
    idx = np.array([zz[len(zz) // 2], yy[len(yy) // 2], xx[len(xx) // 2]], dtype=float)
    world = np.asarray(seg_layer.data_to_world(idx))
    np.testing.assert_allclose(ct_layer.world_to_data(world), idx, atol=1e-4)
    np.testing.assert_allclose(world[::-1], ct3.to_sitk().TransformIndexToPhysicalPoint(
        tuple(int(v) for v in idx[::-1])), atol=1e-4)


# ------------------------------------------------------------------ write -> read
def _write_two_labels(tmp_path, ct3, labels, **kw) -> Path:
    return write_dicom_seg(tmp_path / "liver_spine.dcm", labels, ct3.geometry,
                           ct3.metadata["source_files"],
                           label_names={1: "liver", 2: "spine"},
                           label_colors={1: (200, 60, 50), 2: (240, 230, 200)}, **kw)


def test_write_two_labels_reads_back_exactly(tmp_path, ct3, liver_spine):
    labels = liver_spine[0]
    out = _write_two_labels(tmp_path, ct3, labels, algorithm="hu-basic@0.3")
    seg = read_dicom_seg(out, reference=ct3)
    np.testing.assert_array_equal(seg.data, labels)
    assert seg.metadata["label_names"] == {1: "liver", 2: "spine"}
    for value, rgb in {1: (200, 60, 50), 2: (240, 230, 200)}.items():
        assert np.abs(np.subtract(seg.metadata["label_colors"][value], rgb)).max() <= 1
    alone = read_dicom_seg(out)
    np.testing.assert_array_equal(alone.data, labels)
    assert alone.geometry == ct3.geometry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liver_spine.dcm"]


def test_written_seg_references_source_series_and_passes_highdicom(tmp_path, ct3, liver_spine):
    labels = liver_spine[0]
    out = _write_two_labels(tmp_path, ct3, labels, algorithm="hu-basic@0.3")
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct3.metadata["source_files"]]
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    assert ds.SeriesDescription == "napari-medfm segmentation"
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert ds.PatientID == sources[0].PatientID  # copied for PACS (never printed)
    (ref_series,) = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == {
        s.SOPInstanceUID for s in sources}
    # per-frame source image <-> plane position <-> slice k of the labels
    uid_to_k = {s.SOPInstanceUID: k for k, s in enumerate(sources)}
    present = {(k, v) for k in range(labels.shape[0]) for v in (1, 2) if (labels[k] == v).any()}
    seen = set()
    for item in ds.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = uid_to_k[src]
        np.testing.assert_allclose(item.PlanePositionSequence[0].ImagePositionPatient,
                                   sources[k].ImagePositionPatient, atol=1e-4)
        seen.add((k, int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)))
    assert seen == present  # one frame per non-empty (slice, segment): empties omitted
    # segment descriptions: names, SCT codes, algorithm
    s1, s2 = ds.SegmentSequence
    assert (s1.SegmentLabel, s2.SegmentLabel) == ("liver", "spine")
    assert s1.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
    assert s1.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert s2.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Spine"
    assert s1.SegmentAlgorithmType == "AUTOMATIC" and s1.SegmentAlgorithmName == "hu-basic"
    assert s1.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == "0.3"
    # highdicom's own reader agrees, by source instance
    hseg = hd.seg.segread(out)
    pix = hseg.get_pixels_by_source_instance(
        [s.SOPInstanceUID for s in sources], combine_segments=True,
        assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pix, labels)


def test_compressed_seg_round_trip(tmp_path, ct3, liver_spine):
    labels = liver_spine[0]
    plain = _write_two_labels(tmp_path, ct3, labels)
    small = write_dicom_seg(tmp_path / "j2k.dcm", labels, ct3.geometry,
                            ct3.metadata["source_files"], compress=True)
    assert pydicom.dcmread(small, stop_before_pixels=True).file_meta.TransferSyntaxUID == (
        pydicom.uid.JPEG2000Lossless)
    assert small.stat().st_size < plain.stat().st_size / 5
    np.testing.assert_array_equal(read_dicom_seg(small, reference=ct3).data, labels)


def test_manual_segment_without_algorithm_and_generic_codes(tmp_path, ct3, liver_spine):
    labels = (liver_spine[0] == 2).astype(np.uint8) * 4
    out = write_dicom_seg(tmp_path / "x.dcm", labels, ct3.geometry, ct3.metadata["source_files"],
                          label_names={4: "my blob"})
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    (s,) = ds.SegmentSequence
    assert s.SegmentAlgorithmType == "MANUAL" and s.SegmentLabel == "my blob"
    assert s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    seg = read_dicom_seg(out, reference=ct3)
    np.testing.assert_array_equal(seg.data, labels)  # label value 4 survives (not segment 1)
    assert seg.metadata["segment_numbers"] == {4: 1}


def test_non_ascii_segment_names_survive(tmp_path, ct3, liver_spine):
    names = {1: "Leber ü", 2: "脊椎"}
    out = write_dicom_seg(tmp_path / "u.dcm", liver_spine[0], ct3.geometry,
                          ct3.metadata["source_files"], label_names=names)
    assert pydicom.dcmread(out, stop_before_pixels=True).SpecificCharacterSet == "ISO_IR 192"
    assert read_dicom_seg(out).metadata["label_names"] == names


def test_segment_codes_known_and_unknown_names():
    cat, typ = segment_codes("kidney_left")
    assert (typ.value, cat.value) == ("64033007", "91723000")
    assert segment_codes("tumour")[1].meaning == "Tumor"
    assert segment_codes("liver tumour")[1].meaning == "Tissue"  # phrase not in the dictionary
    assert segment_codes("portal vein")[1].meaning == "Portal vein"
    assert segment_codes("tumor")[0].meaning == "Morphologically Altered Structure"
    assert segment_codes("zorglub")[1].meaning == "Tissue"
    assert segment_codes(None)[1].meaning == "Tissue"


def test_totalsegmentator_labels_on_j2k_series_round_trip(tmp_path, totalseg):
    ref, labels, nii_arr = totalseg
    # the LAS NIfTI is the same grid as the LPS series up to a flip of the y axis
    np.testing.assert_array_equal(labels, nii_arr[:, ::-1, :])
    values = [int(v) for v in np.unique(labels) if v]
    assert len(values) > 20 and max(values) > len(values)  # non-consecutive label values
    out = write_dicom_seg(tmp_path / "total.dcm", labels, ref.geometry, ref.metadata["source_files"],
                          label_names={5: "liver", 1: "spleen"}, algorithm="TotalSegmentator@2")
    seg = read_dicom_seg(out, reference=ref)
    np.testing.assert_array_equal(seg.data, labels)
    assert seg.metadata["label_names"][5] == "liver"
    assert sorted(seg.metadata["label_names"]) == values
    alone = read_dicom_seg(out)
    assert alone.geometry == ref.geometry
    np.testing.assert_array_equal(alone.data, labels)
    # the series blanks SOPClassUID (only MediaStorageSOPClassUID is set): it is filled from meta
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    src_meta = [pydicom.dcmread(f, stop_before_pixels=True).file_meta
                for f in ref.metadata["source_files"]]
    items = ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert {i.ReferencedSOPClassUID for i in items} == {"1.2.840.10008.5.1.4.1.1.2"}
    assert {i.ReferencedSOPInstanceUID for i in items} == {
        m.MediaStorageSOPInstanceUID for m in src_meta}
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID  # derived: the series blanks it


def test_enhanced_multiframe_source(tmp_path, ct3, liver_spine):
    dss = [pydicom.dcmread(f) for f in ct3.metadata["source_files"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom comments on the anonymised patient name
        mf = hd.legacy.LegacyConvertedEnhancedCTImage(
            dss, series_instance_uid=hd.UID(), series_number=7, sop_instance_uid=hd.UID(),
            instance_number=1)
    mf.save_as(tmp_path / "enhanced_ct.dcm")
    # frames of the enhanced CT are stored top-down; the volume (as our reader sorts it) is
    # bottom-up: frames are matched to slices by plane position
    frame_z = [float(g.PlanePositionSequence[0].ImagePositionPatient[2])
               for g in mf.PerFrameFunctionalGroupsSequence]
    assert frame_z[0] > frame_z[-1]
    ref = MedicalImage(np.asarray(ct3.data), ct3.geometry, metadata={
        "source_files": [str(tmp_path / "enhanced_ct.dcm")],
        "frame_of_reference_uid": mf.FrameOfReferenceUID})
    labels = liver_spine[0]
    out = write_dicom_seg(tmp_path / "seg.dcm", labels, ref.geometry, ref.metadata["source_files"],
                          label_names={1: "liver", 2: "spine"})
    np.testing.assert_array_equal(read_dicom_seg(out, reference=ref).data, labels)
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    for item in ds.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == mf.SOPInstanceUID
        z = float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        assert frame_z[int(src.ReferencedFrameNumber) - 1] == pytest.approx(z, abs=1e-4)


def test_overlapping_segments_later_wins_with_warning(tmp_path, ct3, liver_spine):
    liver = liver_spine[0] == 1
    blob = np.zeros_like(liver)
    blob[1, 200:300, 250:350] = True  # overlaps the liver
    overlap = int((liver & blob).sum())
    assert overlap > 0
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct3.metadata["source_files"]]
    for s in sources:
        del s.SpecificCharacterSet  # blank in these files; highdicom rejects ''
    descs = [hd.seg.SegmentDescription(i + 1, name, *segment_codes(name), algorithm_type="MANUAL")
             for i, name in enumerate(["liver", "lesion"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            sources, np.stack([liver, blob], axis=-1).astype(np.uint8), "BINARY", descs,
            hd.UID(), 5, hd.UID(), 1, "test", "test", "1", "1")
    seg.save_as(tmp_path / "overlap.dcm")
    with pytest.warns(UserWarning, match=f"{overlap} voxels belong to more than one segment"):
        got = read_dicom_seg(tmp_path / "overlap.dcm", reference=ct3)
    expected = liver.astype(np.uint8)
    expected[blob] = 2
    np.testing.assert_array_equal(got.data, expected)
    assert any("later segment" in w for w in got.metadata["warnings"])


# ------------------------------------------------------------------ bad input
def test_wrong_shape_and_off_grid_geometry_raise(tmp_path, ct3, liver_spine):
    labels, _ = liver_spine
    files = ct3.metadata["source_files"]
    with pytest.raises(GeometryError, match="512x512"):
        write_dicom_seg(tmp_path / "a.dcm", labels[:, :-1], ct3.geometry, files)
    with pytest.raises(GeometryError, match="2 slices but"):
        write_dicom_seg(tmp_path / "a.dcm", labels[:2], ct3.geometry, files)
    shifted = Geometry(ct3.geometry.spacing, np.add(ct3.geometry.origin, (0, 0, 5.0)),
                       ct3.geometry.direction)
    with pytest.raises(GeometryError, match="not on the source grid"):
        write_dicom_seg(tmp_path / "a.dcm", labels, shifted, files)
    with pytest.raises(GeometryError, match="not on the source grid"):
        write_dicom_seg(tmp_path / "a.dcm", labels, ct3.geometry, files[::-1])  # wrong order
    las = Geometry(ct3.geometry.spacing, ct3.geometry.origin, np.diag([1.0, -1.0, 1.0]))
    with pytest.raises(GeometryError, match="orientation"):
        write_dicom_seg(tmp_path / "a.dcm", labels, las, files)
    with pytest.raises(WriteError, match="all zero"):
        write_dicom_seg(tmp_path / "a.dcm", np.zeros_like(labels), ct3.geometry, files)
    assert list(tmp_path.iterdir()) == []


def test_non_dicom_source_raises_naming_the_file(tmp_path, ct3, liver_spine):
    labels, _ = liver_spine
    nrrd = real_path("ct/dcmqi_ct3slice_seg/liver_spine_seg.nrrd")
    files = [*ct3.metadata["source_files"][:2], nrrd]
    with pytest.raises(WriteError, match="liver_spine_seg.nrrd: source is not a DICOM file"):
        write_dicom_seg(tmp_path / "a.dcm", labels, ct3.geometry, files)
    with pytest.raises(WriteError, match="no source DICOM files"):
        write_dicom_seg(tmp_path / "a.dcm", labels, ct3.geometry, [])
    assert list(tmp_path.iterdir()) == []


def test_read_errors_name_file_and_cause(tmp_path, ct3, totalseg):
    with pytest.raises(ReadError, match="notes.dcm: not a DICOM file"):
        (tmp_path / "notes.dcm").write_text("hello")
        read_dicom_seg(tmp_path / "notes.dcm")
    ct_file = Path(ct3.metadata["source_files"][0])
    with pytest.raises(ReadError, match=rf"{ct_file.name}: not a DICOM Segmentation"):
        read_dicom_seg(ct_file)
    src = real_path("ct/dcmqi_ct3slice_seg/liver_seg.dcm")
    data = src.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 40_000])
    with pytest.raises(ReadError, match="cut.dcm"):
        read_dicom_seg(tmp_path / "cut.dcm")
    # a SEG of another frame of reference cannot be placed on this series
    with pytest.raises(GeometryError, match="Frame of Reference"):
        read_dicom_seg(src, reference=totalseg[0])
    shutil.rmtree(tmp_path)


def test_single_slice_source_accepts_2d_and_3d_labels(tmp_path):
    src = real_path("dicom_edge/ct_small_128px.dcm")
    img = sitk.ReadImage(str(src))
    ref = MedicalImage.from_sitk(img, metadata={"source_files": [str(src)]})
    labels = np.zeros(ref.shape, np.uint8)
    labels[0, 30:60, 40:90] = 2
    out = write_dicom_seg(tmp_path / "s3.dcm", labels, ref.geometry, [src],
                          label_names={2: "lesion"})
    np.testing.assert_array_equal(read_dicom_seg(out, reference=ref).data, labels)
    flat = Geometry(ref.geometry.spacing[:2], ref.geometry.origin[:2], np.eye(2))
    out2 = write_dicom_seg(tmp_path / "s2.dcm", labels[0], flat, [src])
    np.testing.assert_array_equal(read_dicom_seg(out2, reference=ref).data, labels)
    wrong = Geometry((1.0, 1.0), (0.0, 0.0), np.eye(2))
    with pytest.raises(GeometryError, match="pixel spacing"):
        write_dicom_seg(tmp_path / "bad.dcm", labels[0], wrong, [src])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s2.dcm", "s3.dcm"]
