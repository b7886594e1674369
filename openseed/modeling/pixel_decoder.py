"""Pixel decoder: a multi-scale deformable-attention encoder over backbone levels, then an FPN step to mask features.

SPEC.md section 2: project each used backbone level to ``hidden_dim`` (1x1 conv + GroupNorm 32), add extra levels
(3x3 stride-2 conv) down to stride 64, run ``num_layers`` post-norm layers of multi-scale deformable self-attention
(sine position embedding + learned level embedding), then fuse the upsampled finest encoder level with the finer
backbone maps (FPN) down to stride 4, where a 1x1 conv gives ``mask_features``.

Coordinates: reference points and boxes are normalised by the *padded* map (see ``openseed.core.outputs``).
With ``mask_padding`` (our default) padding tokens are excluded as attention values; without it (the reference, and
so the presets that load its weights) padded cells are image like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openseed.modeling.layers import embedding_positions, feed_forward, grid_positions, sine_embedding
from openseed.ops import MSDeformAttn


@dataclass
class EncoderMemory:
    """What the pixel decoder hands to the decoder.

    Attributes:
        memory: [B, S, D] encoder tokens of all levels, flattened level by level (finest first), row-major.
        padding_mask: [B, S] bool, True on tokens that lie in the padding; None when padding is treated as image
            (``mask_padding=False``: nothing downstream excludes it).
        spatial_shapes: long [L, 2] (h, w) per level; level_start_index: long [L].
        mask_features: [B, mask_dim, H / 4, W / 4].
    """

    memory: Tensor
    padding_mask: Tensor | None
    spatial_shapes: Tensor
    level_start_index: Tensor
    mask_features: Tensor


def _conv_gn(in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
             bias: bool = True) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    if bias:
        nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(min(32, out_channels), out_channels))


class DeformableEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention -> add & norm -> FFN -> add & norm."""

    def __init__(self, dim: int, num_levels: int, num_heads: int, num_points: int, ffn_dim: int, dropout: float,
                 act: str = "relu"):
        super().__init__()
        self.attention = MSDeformAttn(dim, num_levels, num_heads, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = feed_forward(dim, ffn_dim, dropout, act)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None) -> Tensor:
        attended = self.attention(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout(attended))
        return self.norm2(src + self.dropout(self.ffn(src)))


class PixelDecoder(nn.Module):
    """Backbone maps -> ``EncoderMemory``.

    Args:
        in_channels, in_strides: of the backbone outputs (keys "res2".."res5").
        encoder_features: backbone levels the encoder uses, finest first (Swin-T: res3-res5; Swin-L: res2-res5).
        num_levels: total encoder levels; levels beyond ``encoder_features`` are extra stride-2 convs (to stride 64).
        hidden_dim, num_layers, num_heads, num_points, ffn_dim, dropout: of the deformable encoder.
        mask_dim: channels of ``mask_features``; common_stride: their stride (4).
        mask_padding: keep padded cells out of the attention (True), or treat them as image (False, the reference).

    Position embedding: DETR's sine embedding of ``openseed.modeling.layers.embedding_positions`` (the reference's
    normalised cumulative coordinates) plus a learned level embedding. FPN: ``max(log2(finest encoder stride /
    common_stride), 1)`` steps on the finest backbone maps, as the reference builds it (so an encoder that starts at
    stride 4, Swin-L's, still fuses res2 once); each step adds the lateral map to the upsampled previous output (the
    reference upsamples the finest encoder level at every step: the same for the one step every preset has).
    """

    def __init__(self, in_channels: dict[str, int], in_strides: dict[str, int],
                 encoder_features: tuple[str, ...] = ("res3", "res4", "res5"), num_levels: int = 4,
                 hidden_dim: int = 256, num_layers: int = 6, num_heads: int = 8, num_points: int = 4,
                 ffn_dim: int = 2048, dropout: float = 0.0, mask_dim: int = 256, common_stride: int = 4,
                 mask_padding: bool = True):
        super().__init__()
        if num_levels < len(encoder_features):
            raise ValueError(f"num_levels={num_levels} < {len(encoder_features)} encoder features")
        self.encoder_features = tuple(encoder_features)
        self.num_levels, self.hidden_dim, self.mask_padding = num_levels, hidden_dim, mask_padding
        self.input_proj = nn.ModuleList(_conv_gn(in_channels[k], hidden_dim) for k in self.encoder_features)
        coarsest = in_channels[self.encoder_features[-1]]
        extra = []
        for i in range(num_levels - len(self.encoder_features)):
            extra.append(_conv_gn(coarsest if i == 0 else hidden_dim, hidden_dim, kernel_size=3, stride=2))
        self.extra_proj = nn.ModuleList(extra)
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim).normal_())
        self.layers = nn.ModuleList(DeformableEncoderLayer(hidden_dim, num_levels, num_heads, num_points, ffn_dim,
                                                           dropout) for _ in range(num_layers))
        # FPN from the finest encoder level down to the common stride, through the finest backbone maps
        finest_stride = in_strides[self.encoder_features[0]]
        num_fpn = max(int(math.log2(finest_stride) - math.log2(common_stride)), 1)
        self.fpn_features = sorted(in_strides, key=in_strides.get)[:num_fpn][::-1]  # coarse to fine
        # the FPN convs have no bias (as detectron2 builds them in front of a norm)
        self.lateral = nn.ModuleList(_conv_gn(in_channels[k], hidden_dim, bias=False) for k in self.fpn_features)
        self.fpn_out = nn.ModuleList(nn.Sequential(_conv_gn(hidden_dim, hidden_dim, 3, bias=False), nn.ReLU())
                                     for _ in self.fpn_features)
        self.mask_features = nn.Conv2d(hidden_dim, mask_dim, 1)
        nn.init.xavier_uniform_(self.mask_features.weight, gain=1)
        nn.init.zeros_(self.mask_features.bias)
        if not self.fpn_features or in_strides[self.fpn_features[-1]] != common_stride:
            raise ValueError(f"cannot reach stride {common_stride} from {finest_stride} with {self.fpn_features}")

    def forward(self, features: dict[str, Tensor], padding_mask: Tensor) -> EncoderMemory:
        """features: backbone maps; padding_mask: [B, H, W] bool at the input image size (True = padding)."""
        maps = [proj(features[k]) for proj, k in zip(self.input_proj, self.encoder_features)]
        last = features[self.encoder_features[-1]]
        for proj in self.extra_proj:
            last = proj(last)
            maps.append(last)
        sources, masks, positions, shapes = [], [], [], []
        for level, feature in enumerate(maps):
            batch, _, height, width = feature.shape
            if self.mask_padding:
                mask = F.interpolate(padding_mask[:, None].float(), size=(height, width), mode="nearest")[:, 0].bool()
                masks.append(mask.flatten(1))
            coords = embedding_positions(height, width, feature.device)
            pos = sine_embedding(coords, self.hidden_dim // 2).to(feature.dtype) + self.level_embed[level]
            sources.append(feature.flatten(2).transpose(1, 2))
            positions.append(pos[None].expand(batch, -1, -1))
            shapes.append((height, width))
        src, pos = torch.cat(sources, 1), torch.cat(positions, 1)
        mask = torch.cat(masks, 1) if self.mask_padding else None
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src.device)
        level_start_index = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
        reference = torch.cat([grid_positions(h, w, src.device) for h, w in shapes], 0)
        reference = reference[None, :, None, :].expand(src.shape[0], -1, self.num_levels, -1).to(src.dtype)
        for layer in self.layers:
            src = layer(src, pos, reference, spatial_shapes, level_start_index, mask)
        finest_h, finest_w = shapes[0]
        out = src[:, : finest_h * finest_w].transpose(1, 2).reshape(src.shape[0], -1, finest_h, finest_w)
        for key, lateral, fpn_out in zip(self.fpn_features, self.lateral, self.fpn_out):
            fine = lateral(features[key])
            out = fpn_out(fine + F.interpolate(out, size=fine.shape[-2:], mode="bilinear", align_corners=False))
        return EncoderMemory(memory=src, padding_mask=mask, spatial_shapes=spatial_shapes,
                             level_start_index=level_start_index, mask_features=self.mask_features(out))
