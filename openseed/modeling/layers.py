"""Small building blocks shared by the pixel decoder and the decoder."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with numerator and denominator each floored at ``eps``, as the reference computes it.

    Not ``torch.logit(x, eps)``: that clamps ``x`` itself to ``[eps, 1 - eps]``, which gives another value wherever
    ``x`` is within ``eps`` of 0 or 1 (``log((1 - eps) / eps)`` instead of ``log(x / eps)``), and boxes whose
    sigmoid saturates (a width or height of the whole image) are exactly such inputs; parity with the reference
    (../shared/reference) needs this form.
    """
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def sine_embedding(coords: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine/cosine embedding of normalised coordinates.

    Args:
        coords: [..., C] values in [0, 1] (C = 2 for points (x, y), 4 for boxes (cx, cy, w, h)).
    Returns:
        [..., C * num_feats]; for each coordinate ``num_feats`` channels (interleaved sin, cos) of ``2 pi x``.
    """
    scale = 2 * math.pi
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords[..., None].float() * scale / dim_t  # [..., C, num_feats]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    # DETR order: y before x, so that 2-d point and 4-d box embeddings start the same way
    if coords.shape[-1] >= 2:
        pos = torch.cat([pos[..., 1:2, :], pos[..., 0:1, :], pos[..., 2:, :]], dim=-2)
    return pos.flatten(-2).to(coords.dtype)


def grid_positions(height: int, width: int, device: torch.device) -> Tensor:
    """[H * W, 2] normalised (x, y) centres of the cells of an H x W map, row-major."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    return _stack_grid(xs, ys)


def embedding_positions(height: int, width: int, device: torch.device) -> Tensor:
    """[H * W, 2] the (x, y) coordinates the encoder's sine position embedding is taken of, row-major.

    DETR's normalised cumulative form, as the reference computes it on an unmasked map: cell ``i`` of ``n`` sits at
    ``(i + 1) / (n + 1e-6)`` (so the last cell is ~1, not its centre ``(i + 0.5) / n``).
    """
    ys = torch.arange(1, height + 1, device=device, dtype=torch.float32) / (height + 1e-6)
    xs = torch.arange(1, width + 1, device=device, dtype=torch.float32) / (width + 1e-6)
    return _stack_grid(xs, ys)


def _stack_grid(xs: Tensor, ys: Tensor) -> Tensor:
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], dim=-1).reshape(-1, 2)


def feed_forward(dim: int, ffn_dim: int, dropout: float, act: str = "relu") -> nn.Sequential:
    """The transformer FFN: Linear -> activation -> dropout -> Linear."""
    layers = {"relu": nn.ReLU, "gelu": nn.GELU}
    if act not in layers:
        raise ValueError(f"unknown activation {act!r}; choose from {sorted(layers)}")
    return nn.Sequential(nn.Linear(dim, ffn_dim), layers[act](), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
