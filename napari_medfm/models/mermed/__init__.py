"""MerMED-FM: 2D multi-modality self-supervised ViT-B/16 encoder (CLS = image embedding)."""
