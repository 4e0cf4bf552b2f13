"""Unit tests of ``napari_medfm.geometry`` against SimpleITK, nibabel and real napari layers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medfm.geometry import (
    LPS_TO_RAS,
    Geometry,
    ObliqueGeometryWarning,
    geometry_of_layer,
    orientation_code,
    spacing_is_uniform,
)


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from Euler angles in degrees (x, then y, then z)."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


CASES_3D = {
    "axial_lps": (np.eye(3), (0.8, 0.8, 2.5), (-200.0, -180.0, -350.0)),
    "ras_flipped": (np.diag([-1.0, -1.0, 1.0]), (3.0, 3.0, 3.0), (180.0, 150.0, -90.0)),
    "las_flipped": (np.diag([-1.0, 1.0, 1.0]), (0.98, 0.98, 2.0), (249.5, -437.5, -804.5)),
    "coronal": (np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]), (0.66, 0.66, 3.0),
                (-170.0, 20.0, 100.0)),
    "oblique": (_rotation(12.0, -7.0, 25.0), (1.2, 0.9, 2.2), (-100.5, 33.25, 71.0)),
    "oblique_flipped": (_rotation(0.0, 20.0, 0.0) @ np.diag([1.0, -1.0, 1.0]), (0.5, 0.7, 1.5),
                        (10.0, -20.0, 30.0)),
}


def _sitk_image(direction: np.ndarray, spacing, origin, shape_zyx=(7, 9, 11)) -> sitk.Image:
    arr = np.arange(np.prod(shape_zyx), dtype=np.int16).reshape(shape_zyx)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(spacing))
    img.SetOrigin(tuple(origin))
    img.SetDirection(tuple(np.asarray(direction, dtype=float).reshape(-1)))
    return img


def _indices(shape_zyx, n=12, seed=0):
    rng = np.random.default_rng(seed)
    corners = [(0,) * len(shape_zyx), tuple(s - 1 for s in shape_zyx)]
    rand = [tuple(int(rng.integers(0, s)) for s in shape_zyx) for _ in range(n)]
    return corners + rand


@pytest.mark.parametrize("case", sorted(CASES_3D))
def test_index_to_physical_matches_sitk(case):
    d, sp, og = CASES_3D[case]
    img = _sitk_image(d, sp, og)
    g = Geometry.from_sitk(img)
    assert g.spacing == pytest.approx(sp)
    rng = np.random.default_rng(1)
    for _ in range(10):
        idx = rng.uniform(-2, 12, size=3)  # continuous, also outside the grid
        expected = img.TransformContinuousIndexToPhysicalPoint(tuple(idx))
        np.testing.assert_allclose(g.index_to_physical(idx), expected, atol=1e-9)
        np.testing.assert_allclose(g.physical_to_index(expected), idx, atol=1e-9)


@pytest.mark.parametrize("case", sorted(CASES_3D))
def test_napari_affine_contract(case):
    """``A @ [idx_zyx, 1]`` reversed is SimpleITK's physical point of ``idx_xyz``."""
    d, sp, og = CASES_3D[case]
    img = _sitk_image(d, sp, og)
    g = Geometry.from_sitk(img)
    a = g.napari_affine()
    for idx in _indices((7, 9, 11)):
        world = (a @ np.r_[np.asarray(idx, float), 1.0])[:3]
        expected = img.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx[::-1]))
        np.testing.assert_allclose(world[::-1], expected, atol=1e-9)
    back = Geometry.from_napari_affine(a)
    assert back == g


@pytest.mark.parametrize("case", sorted(CASES_3D))
def test_sitk_round_trip(case):
    d, sp, og = CASES_3D[case]
    g = Geometry(sp, og, d)
    arr = np.zeros((4, 5, 6), np.uint8)
    img = g.to_sitk(arr)
    assert img.GetSize() == (6, 5, 4)
    assert Geometry.from_sitk(img) == g
    img2 = sitk.Image(6, 5, 4, sitk.sitkUInt8)
    g.apply_to_sitk(img2)
    np.testing.assert_allclose(np.asarray(img2.GetDirection()).reshape(3, 3), d, atol=1e-12)
    with pytest.raises(ValueError, match="2D"):
        g.apply_to_sitk(sitk.Image(4, 4, sitk.sitkUInt8))


@pytest.mark.parametrize("case", sorted(CASES_3D))
def test_affine_ras_matches_nifti_on_disk(case, tmp_path):
    """SimpleITK writes NIfTI (RAS) and nibabel reads it: the affine must be ``affine_ras``."""
    nib = pytest.importorskip("nibabel")
    d, sp, og = CASES_3D[case]
    img = _sitk_image(d, sp, og)
    g = Geometry.from_sitk(img)
    path = tmp_path / f"{case}.nii.gz"
    sitk.WriteImage(img, str(path))
    nimg = nib.load(str(path))
    np.testing.assert_allclose(nimg.affine, g.affine_ras(), atol=1e-4)
    back = Geometry.from_affine_ras(nimg.affine)
    assert back.same_grid(g, atol=1e-4)
    # and the RAS affine maps indices to RAS points of the same voxels
    idx = np.array([3, 4, 5, 1.0])
    ras = (g.affine_ras() @ idx)[:3]
    np.testing.assert_allclose(LPS_TO_RAS @ ras, img.TransformIndexToPhysicalPoint((3, 4, 5)),
                               atol=1e-9)


def test_orientation_codes():
    assert orientation_code(np.eye(3)) == "LPS"
    assert Geometry((1, 1, 1), (0, 0, 0), np.diag([-1.0, -1.0, 1.0])).orientation == "RAS"
    assert Geometry((1, 1, 1), (0, 0, 0), np.diag([-1.0, 1.0, 1.0])).orientation == "RPS"
    coronal = Geometry((1, 1, 1), (0, 0, 0), CASES_3D["coronal"][0])
    assert coronal.orientation == "LIP"
    # same letters as nibabel's aff2axcodes for NIfTI (RAS) affines, oblique included
    nib = pytest.importorskip("nibabel")
    for case, (d, sp, og) in CASES_3D.items():
        g = Geometry(sp, og, d)
        assert g.orientation == "".join(nib.aff2axcodes(g.affine_ras())), case
    with pytest.raises(ValueError):
        orientation_code(np.eye(2))


def test_oblique_properties_and_warning():
    obl = Geometry((1, 1, 1), (0, 0, 0), CASES_3D["oblique"][0])
    assert not obl.is_axis_aligned
    assert obl.obliquity_degrees > 5
    with pytest.warns(ObliqueGeometryWarning, match="oblique"):
        kw = obl.napari_kwargs()
    assert set(kw) == {"affine"}
    flipped = Geometry((1, 1, 1), (0, 0, 0), np.diag([-1.0, -1.0, 1.0]))
    assert flipped.is_axis_aligned and flipped.obliquity_degrees == pytest.approx(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kw = flipped.napari_kwargs()
    assert set(kw) == {"affine"}
    ident = Geometry((0.5, 0.6, 2.0), (1, 2, 3), np.eye(3))
    assert ident.napari_kwargs() == {"scale": (2.0, 0.6, 0.5), "translate": (3.0, 2.0, 1.0)}


def test_validation_errors():
    with pytest.raises(ValueError, match="orthonormal"):
        Geometry((1, 1, 1), (0, 0, 0), np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1]]))
    with pytest.raises(ValueError, match="positive"):
        Geometry((1, 0, 1), (0, 0, 0), np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        Geometry((1, 1, 1), (0, np.nan, 0), np.eye(3))
    with pytest.raises(ValueError, match="2D or 3D"):
        Geometry((1,), (0,), np.eye(1))
    with pytest.raises(ValueError, match="3 values"):
        Geometry((1, 1, 1), (0, 0), np.eye(3))


def test_dict_round_trip_same_grid_and_hash():
    d, sp, og = CASES_3D["oblique_flipped"]
    g = Geometry(sp, og, d)
    back = Geometry.from_dict(g.to_dict())
    assert back == g and hash(back) == hash(g)
    assert g.to_dict()["space"] == "LPS"
    moved = Geometry(sp, (og[0] + 0.5, og[1], og[2]), d)
    assert moved != g
    assert not g.same_grid(moved)
    assert g.same_grid(g, (4, 5, 6), (4, 5, 6))
    assert not g.same_grid(g, (4, 5, 6), (4, 5, 7))
    assert not g.same_grid(Geometry.identity(2))


def test_2d_geometry():
    d2 = np.array([[0.0, -1.0], [1.0, 0.0]])  # rotated 90 degrees in-plane
    img = sitk.GetImageFromArray(np.zeros((5, 8), np.float32))
    img.SetSpacing((0.168, 0.2))
    img.SetOrigin((10.0, -5.0))
    img.SetDirection(tuple(d2.reshape(-1)))
    g = Geometry.from_sitk(img)
    assert g.ndim == 2
    assert g.orientation == "PR"  # x axis toward posterior, y axis toward patient right
    a = g.napari_affine()
    assert a.shape == (3, 3)
    for idx in [(0, 0), (4, 7), (2, 3)]:
        world = (a @ np.r_[idx, 1.0])[:2]
        np.testing.assert_allclose(world[::-1], img.TransformIndexToPhysicalPoint(idx[::-1]))
    with pytest.raises(ValueError, match="3D"):
        g.affine_ras()
    ident = Geometry.identity(2, spacing=(0.2, 0.3))
    assert ident.napari_kwargs() == {"scale": (0.3, 0.2), "translate": (0.0, 0.0)}


def test_spacing_is_uniform():
    assert spacing_is_uniform(np.arange(10) * 2.0)[0]
    ok, mn, mx = spacing_is_uniform([0.0, 2.0, 4.0, 7.0])
    assert not ok and mn == 2.0 and mx == 3.0
    assert spacing_is_uniform([5.0])[0]


# --------------------------------------------------------------- real napari layers

def _napari_layer(kind: str, data: np.ndarray, g: Geometry):
    from napari.layers import Image, Labels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ObliqueGeometryWarning)
        kw = g.napari_kwargs()
    return (Labels if kind == "labels" else Image)(data, **kw)


@pytest.mark.parametrize("case", sorted(CASES_3D))
@pytest.mark.parametrize("kind", ["image", "labels"])
def test_real_napari_layer_data_to_world(case, kind):
    d, sp, og = CASES_3D[case]
    img = _sitk_image(d, sp, og)
    g = Geometry.from_sitk(img)
    data = sitk.GetArrayFromImage(img).astype(np.int32 if kind == "labels" else np.float32)
    layer = _napari_layer(kind, data, g)
    for idx in _indices(data.shape):
        world = np.asarray(layer.data_to_world(idx), float)
        expected = img.TransformIndexToPhysicalPoint(tuple(int(i) for i in idx[::-1]))
        np.testing.assert_allclose(world[::-1], expected, atol=1e-6)
    assert geometry_of_layer(layer).same_grid(g, atol=1e-6)


def test_real_napari_layer_2d_and_scale_translate_composition():
    from napari.layers import Image

    g = Geometry((0.25, 0.5), (-3.0, 7.0), np.eye(2))
    layer = Image(np.zeros((6, 9), np.float32), **g.napari_kwargs())
    np.testing.assert_allclose(np.asarray(layer.data_to_world((5, 8)))[::-1],
                               g.index_to_physical([8, 5]))
    assert geometry_of_layer(layer) == g
    # a layer with both an affine and scale/translate composes them (napari's order)
    rot = Geometry((1.0, 1.0), (0.0, 0.0), np.array([[0.0, -1.0], [1.0, 0.0]]))
    both = Image(np.zeros((6, 9), np.float32), affine=rot.napari_affine(),
                 scale=(2.0, 3.0), translate=(1.0, -1.0))
    got = geometry_of_layer(both)
    for idx in [(0, 0), (5, 8), (2, 7)]:
        np.testing.assert_allclose(got.index_to_physical(np.asarray(idx[::-1], float)),
                                   np.asarray(both.data_to_world(idx))[::-1], atol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_layer_world_matrix_uses_public_transforms_only(ndim):
    """rotate and shear compose in napari's order; no private napari attribute is read
    (napari warns about ``_data_to_world`` from plugin code and will remove it)."""
    from napari.layers import Image, Labels

    from napari_medfm.geometry import layer_world_matrix

    rng = np.random.default_rng(ndim)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = rng.normal(size=(ndim, ndim))
    affine[:ndim, ndim] = rng.normal(size=ndim)
    rotate = 30.0 if ndim == 2 else (10.0, 20.0, 30.0)
    for cls in (Image, Labels):
        layer = cls(np.zeros((5,) * ndim, np.int32), scale=rng.uniform(0.5, 2.0, ndim),
                    translate=rng.normal(size=ndim), rotate=rotate,
                    shear=rng.normal(size=ndim * (ndim - 1) // 2), affine=affine)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            m = layer_world_matrix(layer)
        for idx in [(0,) * ndim, (4,) * ndim, tuple(rng.integers(0, 5, ndim))]:
            world = np.asarray(layer.data_to_world(idx), float)
            np.testing.assert_allclose(m[:ndim, :ndim] @ np.asarray(idx, float) + m[:ndim, ndim],
                                       world, atol=1e-9)
