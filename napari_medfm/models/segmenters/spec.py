"""Segmentation model specs (torch-free; read by the registry).

* ``hu-basic``: weights-free HU thresholds + morphology (body, lungs, bone, fat, air, vessels).
* ``totalsegmentator``: optional extra (``pip install napari-medfm[totalsegmentator]``), 117
  structures; available only when the ``totalsegmentator`` package is importable and its
  weights are present (see :mod:`napari_medfm.models.segmenters.totalseg`).
* MONAI bundles are not registered here: they are addressed as ``bundle:PATH`` (a local
  model-zoo folder) and resolved by :func:`napari_medfm.tasks.segment.load_segmenter`.
"""

from __future__ import annotations

from napari_medfm.runtime.registry import ModelSpec

SPECS = [
    ModelSpec(
        id="hu-basic",
        family="segmenters",
        tasks=("segment",),
        modalities=("CT",),
        dims=(3,),
        builder="napari_medfm.models.segmenters.hu_basic:build",
        description="Weights-free CT segmentation from Hounsfield thresholds and morphology "
        "(SimpleITK): body, lungs, bone, fat, air (gas inside the body that is not lung), "
        "vessels (contrast-enhanced blood pool).",
        input_spec="3D CT in HU, any spacing/orientation; kernels in mm",
        licence="BSD-3-Clause",
        needs_weights=False,
        extras={"labels": {1: "body", 2: "lungs", 3: "bone", 4: "fat", 5: "air", 6: "vessels"}},
    ),
    ModelSpec(
        id="totalsegmentator",
        family="segmenters",
        tasks=("segment",),
        modalities=("CT",),
        dims=(3,),
        builder="napari_medfm.models.segmenters.totalseg:build",
        description="TotalSegmentator 'total' task (nnU-Net): 117 anatomical structures. Optional "
        "extra: needs `pip install napari-medfm[totalsegmentator]` and its weights "
        "(`totalseg_download_weights -t total`).",
        input_spec="3D CT in HU; resampled internally to 1.5 mm (3 mm with fast=True)",
        licence="Apache-2.0 (code); weights: see TotalSegmentator",
        citation="Wasserthal et al., TotalSegmentator: Robust Segmentation of 104 Anatomic "
        "Structures in CT Images, Radiology: AI 2023",
        needs_weights=False,  # its weights live in TotalSegmentator's own folder, not $MEDFM_HOME
        extras={"optional_extra": "totalsegmentator", "n_structures": 117},
    ),
]
