"""RAD-DINO and DINOv2 2D encoders (transformers ``Dinov2Model`` from a local hub-layout folder)."""
