"""Chunked label sums equal one-shot np.bincount (counts, weighted sums, sums of squares)."""

import numpy as np
import pytest

from napari_medfm.arrays import label_sums, present_values


@pytest.mark.parametrize("chunk", [7, 1000, 1 << 21])
def test_label_sums_equal_bincount(chunk):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 9, (5, 31, 17)).astype(np.uint8)
    w = rng.normal(40.0, 300.0, lab.shape).astype(np.int16)
    flat = lab.ravel().astype(np.intp)
    np.testing.assert_array_equal(label_sums(lab, chunk=chunk), np.bincount(flat))
    np.testing.assert_array_equal(label_sums(lab, 12, chunk=chunk), np.bincount(flat, minlength=12))
    wf = w.ravel().astype(np.float64)
    np.testing.assert_allclose(label_sums(lab, 9, w, chunk=chunk), np.bincount(flat, wf))
    np.testing.assert_allclose(label_sums(lab, 9, w, squares=True, chunk=chunk),
                               np.bincount(flat, wf * wf))
    mask = w > 0  # boolean weights count the voxels inside a mask per label
    np.testing.assert_array_equal(label_sums(lab, 9, mask, chunk=chunk),
                                  np.bincount(flat[mask.ravel()], minlength=9))


def test_label_sums_rejects_mismatched_weights_and_present_values():
    with pytest.raises(ValueError, match="differ in size"):
        label_sums(np.zeros(4, np.uint8), weights=np.zeros(5))
    assert present_values(np.array([[0, 3], [3, 7]], np.uint16)) == [3, 7]
    assert present_values(np.zeros((0,), np.uint8)) == []
