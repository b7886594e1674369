"""What crosses the model -> losses / postprocess seam.

Boxes are the model's (``openseed.core.boxes``: cxcywh normalised by the padded batch size); masks are logits at 1/4
of the padded size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


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
