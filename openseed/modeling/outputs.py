"""What crosses the model -> losses / postprocess seam.

Box convention inside the model: ``cxcywh`` normalised to [0, 1] by the *padded* batch size (the ``H, W`` of
``Batch.images``), so that a reference box maps directly onto the feature maps. ``targets_to_model_boxes`` converts
the data's pixel ``xyxy`` boxes to this convention. Masks are logits at 1/4 of the padded size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.ops import box_convert


@dataclass
class Prediction:
    """One set of predictions for a group of queries.

    Attributes:
        logits: [B, Q, K] class logits against the K vocabulary entries (sigmoid per class; no "no object").
        boxes: [B, Q, 4] cxcywh in [0, 1] of the padded size.
        masks: [B, Q, h, w] mask logits at 1/4 of the padded size (h = H / 4, w = W / 4), or None.
    """

    logits: Tensor
    boxes: Tensor
    masks: Tensor | None


@dataclass
class ConditionedOutputs:
    """Predictions of the conditioned queries (built from ground-truth box + class; no matching).

    Attributes:
        predictions: one ``Prediction`` before the first decoder layer and one after each layer, each over the
            ``G * M`` conditioned queries (``G`` noisy groups of ``M`` slots; ``M`` = most targets in an image).
        target_index: long [B, G * M]: the index, into that image's ``Targets``, of the ground truth each
            conditioned query was built from; -1 for padding slots (images with fewer than ``M`` targets).
        num_groups: ``G`` (the clean group included).
        clean_group: the first group was built from the boxes without noise (for online mask assistance; not
            supervised).
    """

    predictions: list[Prediction]
    target_index: Tensor
    num_groups: int
    clean_group: bool = False

    @property
    def slots_per_group(self) -> int:
        """``M``: the conditioned queries of one group (the most targets of an image in the batch)."""
        return self.target_index.shape[1] // max(self.num_groups, 1)


@dataclass
class Outputs:
    """Everything the decoder predicts for a batch.

    The matching queries are ordered ``[foreground (num_fg) | background (num_bg)]`` along Q.

    Attributes:
        final: matching queries after the last decoder layer.
        aux: matching queries before the first layer and after every layer but the last (deep supervision), in order.
        proposals: the encoder proposals that became the foreground queries ([B, num_fg, ...]): supervised too. In
            training with ``bg_training="reference"`` the background queries' initial predictions follow them
            ([B, num_fg + num_bg, ...], as the reference's "interm" outputs), which is how those queries learn.
        conditioned: conditioned-query predictions, or None when the model ran without conditions.
        num_fg, num_bg: sizes of the two matching query groups.
        mask_features: [B, D, h, w] per-pixel embeddings the masks are dot products with (for box-prompted
            decoding and post-processing that needs them); not used by the losses.
    """

    final: Prediction
    aux: list[Prediction]
    proposals: Prediction
    conditioned: ConditionedOutputs | None
    num_fg: int
    num_bg: int
    mask_features: Tensor | None = field(default=None, repr=False)

    @property
    def pred_logits(self) -> Tensor:
        return self.final.logits

    @property
    def pred_boxes(self) -> Tensor:
        return self.final.boxes

    @property
    def pred_masks(self) -> Tensor | None:
        return self.final.masks

    @property
    def fg_slice(self) -> slice:
        return slice(0, self.num_fg)

    @property
    def bg_slice(self) -> slice:
        return slice(self.num_fg, self.num_fg + self.num_bg)


def targets_to_model_boxes(boxes_xyxy: Tensor, padded_size: tuple[int, int]) -> Tensor:
    """Pixel xyxy boxes (exclusive max) -> cxcywh normalised by the padded size (H, W)."""
    height, width = padded_size
    scale = torch.tensor([width, height, width, height], dtype=boxes_xyxy.dtype, device=boxes_xyxy.device)
    return box_convert(boxes_xyxy / scale, "xyxy", "cxcywh")


def model_boxes_to_pixels(boxes_cxcywh: Tensor, padded_size: tuple[int, int]) -> Tensor:
    """Inverse of ``targets_to_model_boxes``."""
    height, width = padded_size
    scale = torch.tensor([width, height, width, height], dtype=boxes_cxcywh.dtype, device=boxes_cxcywh.device)
    return box_convert(boxes_cxcywh, "cxcywh", "xyxy") * scale
