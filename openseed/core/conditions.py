"""What the model is given besides the images: the boxes (and classes) its conditioned queries decode.

In training they are the ground truth (with box noise: denoising groups); at inference, box prompts
(``OpenSeeD.segment_boxes``). Boxes follow the model's convention (``openseed.core.boxes``: cxcywh normalised by the
padded batch size).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Conditions:
    """Boxes (and classes) the conditioned queries are built from, per image.

    Attributes:
        labels: per image, long [N_i] indices into the vocabulary the text embeddings were computed for.
        boxes: per image, [N_i, 4] cxcywh normalised by the padded size.
        add_noise: jitter the boxes (training); False for box-prompted inference.
        num_groups: groups of conditioned queries; None = as many as fit in the decoder's budget.
        clean_group: put one more group first whose boxes are never jittered (training with online mask
            assistance: its masks, decoded from the clean ground-truth boxes, assist the detection matching; it is
            not supervised, so the denoising groups are trained exactly as without it).
    """

    labels: list[Tensor]
    boxes: list[Tensor]
    add_noise: bool = True
    num_groups: int | None = None
    clean_group: bool = False
