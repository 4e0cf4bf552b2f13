"""MerMED-FM model spec (torch-free; read by the registry)."""

from __future__ import annotations

from napari_medfm.runtime.registry import ModelSpec, WeightFile

#: timm ``VisionTransformer`` arguments of the released backbone (ViT-B/16).
VIT_B16 = {
    "img_size": 224,
    "patch_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
}

SPECS = [
    ModelSpec(
        id="mermed",
        family="mermed",
        tasks=("embed", "retrieval"),
        modalities=("CXR", "fundus", "pathology", "CT", "OCT", "ultrasound", "dermatology"),
        dims=(2,),
        builder="napari_medfm.models.mermed.model:build",
        description=(
            "MerMED-FM: multi-specialty self-supervised ViT-B/16 (teacher backbone); the 768-d "
            "CLS token is the image embedding. 2D images; CT volumes one slice at a time."
        ),
        input_spec=(
            "2D image resized to 224x224 (whole image squashed, bilinear, antialiased, as the "
            "release's Resize((224, 224))), per-modality mean/std (modality required: CXR, "
            "fundus, pathology, CT, OCT, ultrasound, dermatology), grey replicated to 3 "
            "channels; CT slices windowed (40/400 HU) first"
        ),
        repo_id="youngzhou12/MerMED",
        files=(
            WeightFile(
                "MerMED.pth",
                description="training checkpoint (student, teacher, optimizer, memory bank, "
                "epoch, args, fp16 scaler); tensors are extracted safely, never unpickled",
            ),
        ),
        licence="CC BY-NC 4.0",
        citation="Zhou et al., Multimodal, Multi-Disease Medical Imaging Foundation Model "
        "(MerMED-FM), arXiv:2507.00185",
        embedding_dim=768,
        extras={"vit": VIT_B16, "input_size": 224, "checkpoint_key": "teacher"},
    ),
]
