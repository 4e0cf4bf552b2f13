"""Whole-slide reader against the real corpus: lazy pyramids, exact pixels, pixel size."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from napari_medfm.errors import ReadError
from napari_medfm.io import wsi
from tests.conftest import real_path

SLIDES = [
    "pathology/wsi/CMU-1-Small-Region.svs",
    "pathology/wsi/TCGA-CR-7395-01A-01-TS1_small.svs",
    "pathology/wsi/OS-1-detail.ome.tif",
    "pathology/wsi/OS-2-ndpi_Ki67.ome.tif",
    "pathology/wsi/TCGA-XK-AAJU_small_dicom_wsi.dcm",
]
SVS = SLIDES[:2]
DICOM_WSI = SLIDES[4]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom")


@pytest.mark.parametrize("rel", SLIDES)
def test_every_slide_opens_lazily_as_a_pyramid(rel):
    path = real_path(rel)
    assert wsi.can_read(path)
    (img,) = wsi.read(path)
    assert img.kind == "wsi" and img.multiscale and img.rgb and img.modality == "SM"
    assert len(img.data) >= 2
    for level in img.data:
        assert isinstance(level, da.Array), type(level)
        assert not isinstance(level, np.ndarray)
        assert level.dtype == np.uint8 and level.ndim == 3 and level.shape[-1] == 3
    heights = [lv.shape[0] for lv in img.data]
    widths = [lv.shape[1] for lv in img.data]
    assert heights == sorted(heights, reverse=True) and len(set(heights)) == len(heights)
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)
    assert max(img.data[-1].shape[:2]) <= wsi.DEFAULT_MIN_LEVEL_SIZE
    md = img.metadata
    assert md["level_shapes"] == [list(lv.shape) for lv in img.data]
    assert md["file_levels"] >= 1
    assert img.geometry.ndim == 2
    assert img.name == Path(rel).name.split(".")[0]


@pytest.mark.parametrize("rel", SVS)
def test_svs_tiles_equal_openslide(rel):
    openslide = pytest.importorskip("openslide")
    path = real_path(rel)
    (img,) = wsi.read(path)
    slide = openslide.OpenSlide(str(path))
    try:
        assert img.metadata["file_levels"] == slide.level_count
        for lev in range(slide.level_count):
            w, h = slide.level_dimensions[lev]
            assert img.data[lev].shape[:2] == (h, w)
            # a region crossing tile borders, and the bottom-right corner (partial tiles);
            # above level 0 openslide maps level-0 locations with non-integer downsamples,
            # so only regions anchored at the origin are pixel-aligned there
            regions = ((200, 230, 300, 250), (w - 130, h - 90, 130, 90)) if lev == 0 else (
                (0, 0, 600, 520),)
            for x, y, rw, rh in regions:
                down = slide.level_downsamples[lev]
                ref = np.asarray(
                    slide.read_region((int(x * down), int(y * down)), lev, (rw, rh))
                )[..., :3]
                got = np.asarray(img.data[lev][y : y + rh, x : x + rw])
                np.testing.assert_array_equal(got, ref)
        props = slide.properties
        if "openslide.mpp-x" in props:
            assert img.metadata["mpp"] == pytest.approx(
                [float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])]
            )
            assert img.geometry.spacing == pytest.approx(
                (float(props["openslide.mpp-x"]) / 1000.0, float(props["openslide.mpp-y"]) / 1000.0)
            )
        else:
            assert img.metadata["mpp"] is None
            assert any("MPP" in w for w in img.metadata["warnings"])
            assert img.geometry.spacing == (1.0, 1.0)
        power = props.get("openslide.objective-power")
        assert img.metadata["objective_power"] == (None if power is None else float(power))
        assert set(img.metadata["associated_images"]) == set(slide.associated_images)
    finally:
        slide.close()


def test_svs_associated_images_are_listed_not_loaded_and_load_on_request():
    openslide = pytest.importorskip("openslide")
    path = real_path("pathology/wsi/CMU-1-Small-Region.svs")
    (img,) = wsi.read(path)
    assoc = img.metadata["associated_images"]
    assert set(assoc) == {"label", "macro", "thumbnail"}
    assert all(isinstance(v, list) for v in assoc.values())  # shapes only, no pixels
    slide = openslide.OpenSlide(str(path))
    try:
        label = wsi.read_associated(path, "label")
        assert list(label.shape) == assoc["label"]
        assert label.shape[:2][::-1] == slide.associated_images["label"].size
    finally:
        slide.close()
    with pytest.raises(ReadError, match="no associated image"):
        wsi.read_associated(path, "barcode")


def test_svs_metadata_has_no_identifiers():
    path = real_path("pathology/wsi/CMU-1-Small-Region.svs")
    (img,) = wsi.read(path)
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        desc = tf.pages.first.description
    user = re.search(r"User = ([^|]+)", desc).group(1).strip()
    text = repr(img.full_metadata())
    assert user not in text
    assert "ScanScope" not in text and "Date" not in text


@pytest.mark.parametrize("rel", SLIDES[2:4])
def test_ome_tiff_pixels_and_physical_size(rel):
    import tifffile

    path = real_path(rel)
    (img,) = wsi.read(path)
    full = tifffile.imread(str(path))
    np.testing.assert_array_equal(np.asarray(img.data[0][100:612, 300:900]), full[100:612, 300:900])
    with tifffile.TiffFile(str(path)) as tf:
        ome = tf.ome_metadata
    sx = float(re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', ome).group(1))
    sy = float(re.search(r'PhysicalSizeY="([0-9.eE+-]+)"', ome).group(1))
    assert img.metadata["mpp"] == pytest.approx([sx, sy])
    assert img.geometry.spacing == pytest.approx((sx / 1000.0, sy / 1000.0))
    # a derived overview level is the 2x2 mean of the level above
    lv0 = full[:16, :16].astype(np.float64)
    expect = np.floor(lv0.reshape(8, 2, 8, 2, 3).mean(axis=(1, 3)) + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(img.data[1][:8, :8]), expect)


def test_dicom_wsi_is_claimed_and_tiles_equal_pydicom_frames():
    from pydicom import dcmread

    path = real_path(DICOM_WSI)
    assert wsi.can_read(path)
    (img,) = wsi.read(path)
    ds = dcmread(str(path))
    frames = ds.pixel_array  # (n_frames, rows, cols, 3): pydicom's own decode
    th, tw = int(ds.Rows), int(ds.Columns)
    total_rows, total_cols = int(ds.TotalPixelMatrixRows), int(ds.TotalPixelMatrixColumns)
    n_cols = -(-total_cols // tw)
    assert img.data[0].shape == (total_rows, total_cols, 3)
    assert img.data[0].chunksize[:2] == (th, tw)
    mosaic = np.zeros((-(-total_rows // th) * th, n_cols * tw, 3), np.uint8)
    for k, frame in enumerate(frames):
        r, c = divmod(k, n_cols)
        mosaic[r * th : (r + 1) * th, c * tw : (c + 1) * tw] = frame
    for y, x, h, w in ((450, 480, 120, 90), (total_rows - 70, total_cols - 60, 70, 60)):
        np.testing.assert_array_equal(np.asarray(img.data[0][y : y + h, x : x + w]),
                                      mosaic[y : y + h, x : x + w])
    md = img.metadata
    assert md["sop_class_uid"] == wsi.WSI_DICOM_SOP_CLASS
    assert md["series_instance_uid"] == ds.SeriesInstanceUID
    expect_x = float(ds.ImagedVolumeWidth) * 1000.0 / total_cols
    expect_y = float(ds.ImagedVolumeHeight) * 1000.0 / total_rows
    assert md["mpp"] == pytest.approx([expect_x, expect_y])
    assert "ImagedVolume" in md["mpp_source"]
    text = repr(img.full_metadata())
    assert str(ds.PatientName) not in text and str(ds.PatientID) not in text


@pytest.mark.parametrize(
    "rel",
    [
        "pathology/patches/CRC-VAL-HE-7K_NORM-TCGA-YLVCMEHK.tif",  # small plain TIFF: image2d
        "pathology/patches/skimage_ihc.png",
        "dicom_edge/ct_small_128px.dcm",  # DICOM, but not a slide
        "ct/totalseg_nifti/example_ct_sm.nii.gz",
    ],
)
def test_can_read_rejects_what_is_not_a_slide(rel):
    assert wsi.can_read(real_path(rel)) is False


def test_can_read_never_raises(tmp_path):
    assert wsi.can_read(tmp_path) is False
    assert wsi.can_read(tmp_path / "missing.svs") is False
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"II*\x00" + b"\x00" * 10)
    assert wsi.can_read(junk) is False
    fake_dcm = tmp_path / "x.dcm"
    fake_dcm.write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02")
    assert wsi.can_read(fake_dcm) is False


@pytest.mark.parametrize("rel", ["pathology/wsi/CMU-1-Small-Region.svs",
                                 "pathology/wsi/OS-2-ndpi_Ki67.ome.tif", DICOM_WSI])
def test_truncated_slide_raises_read_error_naming_the_file(rel, tmp_path):
    src = real_path(rel)
    data = src.read_bytes()
    bad = tmp_path / f"truncated_{src.name}"
    bad.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ReadError) as exc:
        wsi.read(bad)
    assert bad.name in str(exc.value)
    assert exc.value.path == bad


class _Executed:
    """dask callback recording which arrays (by graph-key name) had tasks executed."""

    def __init__(self):
        from dask.callbacks import Callback

        self.names: Counter[str] = Counter()
        outer = self

        class _CB(Callback):
            def _pretask(self, key, dsk, state):
                outer.names[key[0] if isinstance(key, tuple) else str(key)] += 1

        self.cb = _CB()


@pytest.mark.gui
@pytest.mark.parametrize("rel", SVS)
def test_napari_multiscale_layer_never_reads_full_resolution(rel, make_napari_viewer):
    path = real_path(rel)
    (img,) = wsi.read(path)
    viewer = make_napari_viewer()
    data, kwargs, layer_type = img.layer_data()
    assert layer_type == "image" and kwargs["multiscale"] is True and kwargs["rgb"] is True
    rec = _Executed()
    with rec.cb:
        layer = viewer.add_image(data, **kwargs)
        viewer.reset_view()
    assert layer.multiscale and layer.rgb
    assert layer.data_level > 0
    full_res = img.data[0].name
    shown = img.data[layer.data_level].name
    assert rec.names[full_res] == 0, rec.names  # no full-resolution tile decoded
    assert rec.names[shown] > 0  # the overview really was read
    # world coordinates are micrometre-true millimetres
    spacing = img.geometry.spacing
    assert tuple(layer.scale) == pytest.approx((spacing[1], spacing[0]))
    corner = layer.data_to_world((img.data[0].shape[0] - 1, img.data[0].shape[1] - 1))
    assert corner[0] == pytest.approx((img.data[0].shape[0] - 1) * spacing[1])


def test_dicom_wsi_sparse_tiling_uses_frame_positions(tmp_path):
    """TILED_SPARSE: frames stored in another order, some tiles absent (shown as white glass)."""
    from pydicom import dcmread
    from pydicom.dataset import Dataset
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.sequence import Sequence

    src = real_path(DICOM_WSI)
    (ref,) = wsi.read(src)
    ds = dcmread(str(src))
    n = int(ds.NumberOfFrames)
    th, tw = int(ds.Rows), int(ds.Columns)
    n_cols = -(-int(ds.TotalPixelMatrixColumns) // tw)
    frames = list(generate_frames(ds.PixelData, number_of_frames=n))
    order = list(range(n - 1, 2, -1))  # reversed, tiles 0..2 (top-left row) left out
    ds.PixelData = encapsulate([frames[k] for k in order])
    ds["PixelData"].is_undefined_length = True
    ds.NumberOfFrames = len(order)
    ds.DimensionOrganizationType = "TILED_SPARSE"
    per_frame = Sequence()
    for k in order:
        r, c = divmod(k, n_cols)
        pos = Dataset()
        pos.RowPositionInTotalImagePixelMatrix = r * th + 1
        pos.ColumnPositionInTotalImagePixelMatrix = c * tw + 1
        item = Dataset()
        item.PlanePositionSlideSequence = Sequence([pos])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    out = tmp_path / "sparse.dcm"
    ds.save_as(out)

    assert wsi.can_read(out)
    (img,) = wsi.read(out)
    assert img.data[0].shape == ref.data[0].shape
    np.testing.assert_array_equal(np.asarray(img.data[0][th:, :]), np.asarray(ref.data[0][th:, :]))
    assert np.all(np.asarray(img.data[0][:th, : 3 * tw]) == 255)  # absent tiles
    np.testing.assert_array_equal(np.asarray(img.data[0][:th, 3 * tw :]),
                                  np.asarray(ref.data[0][:th, 3 * tw :]))


def test_missing_decoder_is_reported_at_open(tmp_path):
    """In an interpreter without imagecodecs, the JPEG 2000 SVS fails at open, not in napari."""
    import subprocess
    import sys

    path = real_path("pathology/wsi/TCGA-CR-7395-01A-01-TS1_small.svs")
    code = (
        "import sys; sys.modules['imagecodecs'] = None\n"  # as if the package were not installed
        "from pathlib import Path\n"
        "from napari_medfm.errors import MissingDecoderError\n"
        "from napari_medfm.io import wsi\n"
        "try:\n"
        f"    wsi.read(Path({str(path)!r}))\n"
        "except MissingDecoderError as exc:\n"
        "    print('MISSING', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "MISSING" in out.stdout, out.stdout + out.stderr
    assert path.name in out.stdout and "imagecodecs" in out.stdout


def _dicom_instance_from(ds, pixels: np.ndarray, tile: int, flavor: str):
    """A new uncompressed instance of the same slide series holding ``pixels`` as tiles."""
    import copy

    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    out = copy.deepcopy(ds)
    h, w = pixels.shape[:2]
    n_rows, n_cols = -(-h // tile), -(-w // tile)
    padded = np.full((n_rows * tile, n_cols * tile, 3), 255, np.uint8)
    padded[:h, :w] = pixels
    frames = padded.reshape(n_rows, tile, n_cols, tile, 3).swapaxes(1, 2).reshape(-1, tile, tile, 3)
    out.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.ImageType = ["DERIVED", "PRIMARY", flavor, "RESAMPLED" if flavor == "VOLUME" else "NONE"]
    out.Rows = out.Columns = tile
    out.TotalPixelMatrixRows, out.TotalPixelMatrixColumns = h, w
    out.NumberOfFrames = len(frames)
    out.PhotometricInterpretation = "RGB"
    out.PlanarConfiguration = 0
    out.PixelData = np.ascontiguousarray(frames).tobytes()
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = False
    return out


def test_dicom_wsi_levels_in_sibling_files_form_one_pyramid(tmp_path):
    """Each DICOM pyramid level is its own instance of the series; opening any one finds all."""
    from pydicom import dcmread

    src = real_path(DICOM_WSI)
    (single,) = wsi.read(src)
    full = np.asarray(single.data[0])
    h, w = (full.shape[0] // 2) * 2, (full.shape[1] // 2) * 2
    half = np.round(full[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, 3)
                    .mean(axis=(1, 3)) + 1e-9).astype(np.uint8)
    ds = dcmread(str(src))
    folder = tmp_path / "slide"
    folder.mkdir()
    level0 = folder / "level0.dcm"
    level0.write_bytes(src.read_bytes())
    _dicom_instance_from(ds, half, 256, "VOLUME").save_as(folder / "level1.dcm")
    label = np.asarray(single.data[-1])[:120, :200]
    _dicom_instance_from(ds, label, 256, "LABEL").save_as(folder / "label.dcm")
    (folder / "notes.txt").write_text("not dicom")

    for opened in (level0, folder / "level1.dcm"):
        (img,) = wsi.read(opened)
        assert img.metadata["file_levels"] == 2
        assert img.data[0].shape == full.shape and img.data[1].shape == half.shape
        assert img.metadata["source_files"] == [str(level0), str(folder / "level1.dcm")]
        np.testing.assert_array_equal(np.asarray(img.data[1]), half)
        np.testing.assert_array_equal(np.asarray(img.data[0][1000:1300, 2000:2400]),
                                      full[1000:1300, 2000:2400])
        assert img.metadata["associated_images"] == {"label": [120, 200, 3]}  # listed only
        assert img.metadata["mpp"] == pytest.approx(single.metadata["mpp"])
