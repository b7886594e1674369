"""Point sampling for mask costs and mask losses.

Point coordinates are ``(x, y)`` in ``[0, 1]^2`` of the *padded* image, so the same point addresses the same place in
a 1/4-resolution mask logit map and in a full-resolution ground-truth mask. Sampling is bilinear with the
``align_corners=False`` convention of ``F.grid_sample`` (pixel ``i`` of a map of width ``W`` covers ``[i, i + 1) / W``)
and zeros outside the map.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinear sampling of feature maps at normalised points (differentiable; ``grid_sample`` underneath).

    Args:
        inputs: [N, C, H, W] float maps.
        coords: [N, P, 2] points (x, y) in [0, 1].

    Returns:
        [N, C, P].
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(inputs.dtype)  # [N, P, 1, 2]
    return F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)


def point_sample_shared(inputs: Tensor, coords: Tensor) -> Tensor:
    """Sample N single-channel maps [N, H, W] at the same points [P, 2] -> [N, P] (maps treated as channels)."""
    if inputs.shape[0] == 0:
        return inputs.new_zeros(0, coords.shape[0])
    grid = (2.0 * coords - 1.0).view(1, -1, 1, 2).to(inputs.dtype)
    out = F.grid_sample(inputs.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0, :, :, 0]


def sample_masks(masks: Tensor, coords: Tensor, index: Tensor | None = None) -> Tensor:
    """Bilinear sampling of (typically bool, full-resolution) masks by gathering, without a float copy of the masks.

    Same values as ``grid_sample(masks.float(), ..., align_corners=False)``, but only the sampled pixels are read,
    so sampling many (repeated) targets at 1024^2 costs memory proportional to the number of points only.

    Args:
        masks: [N, H, W] masks of any dtype (bool, uint8, float).
        coords: [P, 2] points shared by all masks, or [M, P, 2] points per row of ``index``.
        index: long [M]: which mask each row of ``coords`` samples (required with [M, P, 2] coords).

    Returns:
        float32 [N, P] (shared points) or [M, P].
    """
    n, height, width = masks.shape
    flat = masks.reshape(n, height * width)
    coords = coords.float()
    x = coords[..., 0] * width - 0.5
    y = coords[..., 1] * height - 0.5
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0
    x0 = x0.long()
    y0 = y0.long()
    if coords.dim() == 2:
        rows = None
        out = torch.zeros(n, coords.shape[0], device=masks.device, dtype=torch.float32)
    else:
        if index is None:
            raise ValueError("per-row coords [M, P, 2] need an index [M]")
        rows = index.view(-1, 1)
        out = torch.zeros(coords.shape[0], coords.shape[1], device=masks.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    for dx in (0, 1):
        for dy in (0, 1):
            xi = x0 + dx
            yi = y0 + dy
            weight = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy)
            inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
            lin = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
            values = flat[:, lin] if rows is None else flat[rows, lin]
            out = out + values.float() * weight * inside
    return out


def uniform_points(num_points: int, device: torch.device | str | None = None, batch: tuple[int, ...] = ()) -> Tensor:
    """Points uniformly at random in [0, 1]^2: [*batch, num_points, 2]."""
    return torch.rand(*batch, num_points, 2, device=device)


def logit_uncertainty(logits: Tensor) -> Tensor:
    """PointRend uncertainty of mask logits: ``-|logit|`` (largest where the prediction is least sure)."""
    return -logits.abs()


@torch.no_grad()
def uncertain_points_with_randomness(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    uncertainty_fn: Callable[[Tensor], Tensor] = logit_uncertainty,
) -> Tensor:
    """PointRend training-point selection.

    Draws ``int(num_points * oversample_ratio)`` uniform candidate points per mask, keeps the
    ``int(num_points * importance_sample_ratio)`` most uncertain ones and fills up with fresh uniform points.

    Args:
        logits: [N, 1, h, w] (or [N, h, w]) mask logits; not differentiated through.
        num_points: points per mask.

    Returns:
        [N, num_points, 2] in [0, 1]^2: the importance points first, then the uniform ones.
    """
    if logits.dim() == 3:
        logits = logits.unsqueeze(1)
    n = logits.shape[0]
    num_sampled = max(int(num_points * oversample_ratio), 1)
    num_uncertain = min(int(importance_sample_ratio * num_points), num_sampled)
    num_random = num_points - num_uncertain
    device = logits.device
    candidates = uniform_points(num_sampled, device, (n,))
    if n == 0:
        return candidates.new_zeros(0, num_points, 2)
    uncertainty = uncertainty_fn(point_sample(logits.float(), candidates))[:, 0]  # [N, S]
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
    picked = torch.gather(candidates, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_random > 0:
        picked = torch.cat([picked, uniform_points(num_random, device, (n,))], dim=1)
    return picked
