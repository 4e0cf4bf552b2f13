""""Why" maps for Merlin: Grad-CAM on the layer4 feature map, resampled onto the CT's grid.

The score explained is either a zero-shot finding (mean cosine similarity with its positive
phrasings minus that with its negative phrasings, i.e. the logit of the zero-shot probability
up to the temperature) or one phenotype logit. Grad-CAM: channel weights = spatial mean of the
score's gradient w.r.t. layer4; map = ReLU(sum_c w_c A_c), normalised to [0, 1]. The heads sit
on the average-pooled layer4 map, so only they need autograd: the trunk runs once, without it.

The (D/16, H/32, W/32) map is upsampled (trilinear) to the network input grid (224x224x160 at
1.5x1.5x3 mm, RAS), then resampled with SimpleITK (linear) onto the input CT's own voxel grid,
so it overlays the CT exactly (same shape, same geometry).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ...geometry import Geometry
from ...io.types import MedicalImage

__all__ = ["grad_cam", "to_source_grid"]


def grad_cam(fmap: torch.Tensor, score_fn: Callable[[torch.Tensor], torch.Tensor],
             input_hwd: tuple[int, int, int]) -> np.ndarray:
    """Grad-CAM of ``score_fn(layer4_map)`` for a layer4 map ``fmap`` (1, C, d, h, w).

    Only the heads are differentiated (the trunk ran once without autograd), so explaining
    costs milliseconds and no extra memory. Returns a float32 ``(H, W, D)`` map in [0, 1] on
    the network input grid ``input_hwd`` (MONAI layout).
    """
    with torch.inference_mode(False), torch.enable_grad():
        a = fmap.detach().float().clone().requires_grad_(True)
        score = score_fn(a).sum()
        (grads,) = torch.autograd.grad(score, a)
        weights = grads.mean(dim=(2, 3, 4), keepdim=True)
        cam = torch.relu((weights * a).sum(dim=1, keepdim=True)).detach()  # (1, 1, d, h, w)
    h_, w_, d_ = (int(v) for v in input_hwd)
    cam = torch.nn.functional.interpolate(cam, size=(d_, h_, w_), mode="trilinear",
                                          align_corners=False)[0, 0]  # (D, H, W)
    cam = cam.permute(1, 2, 0)  # -> (H, W, D)
    peak = float(cam.max())
    if peak > 0:
        cam = cam / peak
    return cam.cpu().numpy().astype(np.float32)


def to_source_grid(map_hwd: np.ndarray, affine_ras: np.ndarray, image: MedicalImage,
                   name: str, metadata: dict | None = None) -> MedicalImage:
    """Resample a map on the network grid (MONAI ``(x, y, z)`` layout, RAS ``affine_ras``)
    onto ``image``'s voxel grid; returns a float32 :class:`MedicalImage` with its geometry."""
    import SimpleITK as sitk

    src_geom = Geometry.from_affine_ras(affine_ras)
    src = src_geom.to_sitk(np.ascontiguousarray(np.asarray(map_hwd, np.float32).transpose(2, 1, 0)))
    z, y, x = image.spatial_shape
    ref = sitk.Image([int(x), int(y), int(z)], sitk.sitkUInt8)
    image.geometry.apply_to_sitk(ref)
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(out).astype(np.float32)
    md = {"source_image": image.name, "value_range": [0.0, 1.0]}
    md.update(metadata or {})
    return MedicalImage(arr, image.geometry, modality="OT", kind="volume", name=name,
                        window=(0.5, 1.0), metadata=md)
