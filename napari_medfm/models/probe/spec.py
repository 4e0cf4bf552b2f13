"""Probe-head model spec (torch-free; read by the registry)."""

from __future__ import annotations

from napari_medfm.runtime.registry import ModelSpec, WeightFile

SPECS = [
    ModelSpec(
        id="probe",
        family="probe",
        tasks=("probe", "findings"),
        modalities=("CXR", "fundus", "pathology", "CT", "OCT", "ultrasound", "dermatology"),
        dims=(2,),
        builder="napari_medfm.models.probe.model:build",
        description=(
            "A probe head trained with `medfm train probe` on a frozen 2D encoder (mermed, "
            "rad-dino, dinov2-base): finding probabilities for 2D images. weights = the probe "
            "folder (probe.safetensors + probe.json); the encoder is loaded through the shared "
            "model cache and must have the weights hash the probe was trained on."
        ),
        input_spec="2D image (as the probe's encoder takes it); whole slides: the thumbnail level",
        files=(
            WeightFile("probe.json", description="labels, encoder id + weights sha256, "
                       "normalisation, held-out metrics"),
            WeightFile("probe.safetensors", description="head weights + feature statistics"),
        ),
        licence="as trained by the user (and the encoder's licence)",
        extras={"user_trained": True},
    ),
]
