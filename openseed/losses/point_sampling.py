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
    if coords.dim() == 2:
        rows = torch.arange(n, device=masks.device).view(-1, 1)  # every mask at the same points
    elif index is None:
        raise ValueError("per-row coords [M, P, 2] need an index [M]")
    else:
        rows = index.view(-1, 1)
    if rows.numel() == 0 or coords.shape[-2] == 0:
        return torch.zeros(rows.shape[0], coords.shape[-2], device=masks.device, dtype=torch.float32)
    coords = coords.float() if coords.dim() == 3 else coords.float()[None]  # [M or 1, P, 2]
    x = coords[..., 0] * width - 0.5
    y = coords[..., 1] * height - 0.5
    x0 = torch.floor(x)
    y0 = torch.floor(y)
    fx = x - x0
    fy = y - y0
    # the four neighbours, in the order (x0, y0), (x0, y0 + 1), (x0 + 1, y0), (x0 + 1, y0 + 1)
    xi = x0.long() + torch.tensor([0, 0, 1, 1], device=masks.device).view(4, 1, 1)
    yi = y0.long() + torch.tensor([0, 1, 0, 1], device=masks.device).view(4, 1, 1)
    wx = torch.stack([1.0 - fx, 1.0 - fx, fx, fx])
    wy = torch.stack([1.0 - fy, fy, 1.0 - fy, fy])
    inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
    lin = yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)
    # one gather of the 4 x [rows, P] pixels from the masks seen as one flat array (torch.take)
    values = torch.take(masks, rows * (height * width) + lin)
    out = torch.zeros((), device=masks.device, dtype=torch.float32)
    for corner in range(4):  # summed in this order: the same float result as four separate samples
        out = out + values[corner].float() * (wx[corner] * wy[corner]) * inside[corner]
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


class StackedMasks:
    """The masks of a batch's images ([N_b, H, W] each, None for an image without masks) sampled as one tensor:
    rows are addressed by (image, mask index), so a batch's samples take one ``sample_masks`` call instead of one
    per image. When the images' masks share their size and dtype (always within a padded ``Batch``) they are
    concatenated once (a transient copy of the batch's masks); otherwise each image is sampled on its own."""

    def __init__(self, masks: list[Tensor | None]) -> None:
        self._masks = masks
        present = [m for m in masks if m is not None]
        self._flat: Tensor | None = None
        self._offsets: Tensor | None = None
        if present and len({(tuple(m.shape[1:]), m.dtype, m.device) for m in present}) == 1:
            counts = [0 if m is None else m.shape[0] for m in masks]
            self._flat = torch.cat(present) if len(present) > 1 else present[0]
            starts = torch.tensor([0] + counts[:-1]).cumsum(0)
            self._offsets = starts.to(present[0].device)

    def sample(self, coords: Tensor, images: Tensor, index: Tensor) -> Tensor:
        """float32 [M, P]: mask ``index[m]`` of image ``images[m]`` at its points ``coords[m]`` ([M, P, 2])."""
        if self._flat is not None:
            return sample_masks(self._flat, coords, self._offsets[images] + index)
        out = torch.zeros(coords.shape[:2], dtype=torch.float32, device=coords.device)
        for b in images.unique().tolist():
            rows = torch.nonzero(images == b).flatten()
            out[rows] = sample_masks(self._masks[b], coords[rows], index[rows])
        return out
