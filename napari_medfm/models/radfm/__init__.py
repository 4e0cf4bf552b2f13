"""RadFM: generalist 2D/3D radiology report and VQA model (3D ViT + Perceiver + LLaMA-13B)."""
