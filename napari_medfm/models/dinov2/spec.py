"""RAD-DINO / DINOv2 model specs (torch-free; read by the registry)."""

from __future__ import annotations

from napari_medfm.runtime.registry import ModelSpec, WeightFile

_HUB_FILES = (
    WeightFile("config.json", description="transformers Dinov2Config"),
    WeightFile("model.safetensors", description="weights"),
    WeightFile("preprocessor_config.json", description="image processor (size, crop, mean/std)"),
)

SPECS = [
    ModelSpec(
        id="rad-dino",
        family="dinov2",
        tasks=("embed", "retrieval"),
        modalities=("CXR",),
        dims=(2,),
        builder="napari_medfm.models.dinov2.model:build",
        description="Microsoft RAD-DINO: DINOv2 ViT-B/14 trained on chest X-rays; the CLS token "
        "of the last hidden state (after the final layernorm) is the 768-d embedding.",
        input_spec="2D chest X-ray, processor: short side 518, centre crop 518, mean/std from "
        "preprocessor_config.json",
        repo_id="microsoft/rad-dino",
        files=_HUB_FILES,
        licence="MIT",
        citation="Perez-Garcia et al., Exploring scalable medical image encoders beyond text "
        "supervision (RAD-DINO), Nature Machine Intelligence 2025",
        embedding_dim=768,
        extras={"input_size": 518},
    ),
    ModelSpec(
        id="dinov2-base",
        family="dinov2",
        tasks=("embed", "retrieval"),
        modalities=("CXR", "fundus", "pathology", "CT", "OCT", "ultrasound", "dermatology"),
        dims=(2,),
        builder="napari_medfm.models.dinov2.model:build",
        description="Meta DINOv2 ViT-B/14 (natural images): general-purpose 768-d CLS embedding.",
        input_spec="2D image, processor: short side 256, centre crop 224, ImageNet mean/std",
        repo_id="facebook/dinov2-base",
        files=_HUB_FILES,
        licence="Apache-2.0",
        citation="Oquab et al., DINOv2: Learning Robust Visual Features without Supervision, 2023",
        embedding_dim=768,
        extras={"input_size": 224},
    ),
]
