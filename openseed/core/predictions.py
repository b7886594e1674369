"""What post-processing gives back: one image's results at its original size (post-processing -> evaluators, the
predictor, the tools).

- ``Instances``: scored detections with boxes and (optionally) masks (``task="instance"``);
- ``PanopticSegmentation``: a segment id map and its segments (``task="panoptic"``);
- ``SemanticSegmentation``: one class per pixel (``task="semantic"``);
- ``BoxPromptMasks``: one mask per given box and class name (box prompts, ``task="boxes"``).

Boxes are pixel xyxy of the original image (``openseed.core.boxes``), masks bool ``[N, H0, W0]`` at that size, class
labels contiguous indices into the vocabulary the model was asked with (``Vocabulary.ids`` maps them to the data
set's ids). ``image_id`` is the data set's id of the image, None where post-processing was given bare sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

from torch import Tensor


@dataclass
class _Result:
    task: ClassVar[str]

    def cpu(self):
        """A copy whose tensors are on the CPU (for serialising, plotting, numpy)."""
        return replace(self, **{f.name: getattr(self, f.name).cpu() for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


@dataclass
class Instances(_Result):
    """Scored detections of one image.

    Attributes:
        scores: [N] in top-k order (descending before the mask rescoring, not re-sorted after it).
        labels: long [N] contiguous class indices.
        queries: long [N] the query each detection came from.
        boxes: float [N, 4] xyxy pixels of the original image.
        masks: bool [N, H0, W0] or None (a model without masks).
        image_id: the data set's image id, or None.
    """

    task: ClassVar[str] = "instance"
    scores: Tensor
    labels: Tensor
    queries: Tensor
    boxes: Tensor
    masks: Tensor | None = None
    image_id: int | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __getitem__(self, keep: Tensor | slice) -> Instances:
        """The detections selected by a bool mask, an index tensor or a slice."""
        if isinstance(keep, str):
            raise TypeError(f"Instances select detections (a bool mask, indices or a slice); fields are attributes "
                            f"(instances.boxes), not keys ({keep!r})")
        return replace(self, scores=self.scores[keep], labels=self.labels[keep], queries=self.queries[keep],
                       boxes=self.boxes[keep], masks=None if self.masks is None else self.masks[keep])


@dataclass
class PanopticSegmentation(_Result):
    """One image's panoptic segmentation.

    Attributes:
        panoptic_seg: int32 [H0, W0] segment ids, 0 where no segment won (void).
        segments_info: one dict per segment: ``id`` (in ``panoptic_seg``), ``category_id`` (the data set's id),
            ``isthing``, ``score`` (the best of the queries merged into it), ``area`` (pixels) and ``bbox`` (its
            tight COCO ``[x, y, w, h]`` box).
        image_id: the data set's image id, or None.
    """

    task: ClassVar[str] = "panoptic"
    panoptic_seg: Tensor
    segments_info: list[dict]
    image_id: int | None = None


@dataclass
class SemanticSegmentation(_Result):
    """One image's semantic segmentation.

    Attributes:
        sem_seg: long [H0, W0] contiguous class indices (argmax of the class scores).
        scores: float [K, H0, W0] the per-class scores, when asked for (``return_semantic_scores``), else None.
        image_id: the data set's image id, or None.
    """

    task: ClassVar[str] = "semantic"
    sem_seg: Tensor
    scores: Tensor | None = None
    image_id: int | None = None


@dataclass
class BoxPromptMasks(_Result):
    """Masks decoded from given boxes and class names (one per box).

    Attributes:
        masks: bool [N, H0, W0].
        boxes: float [N, 4] the prompt boxes, xyxy pixels of the original image (clipped to it).
        names: N class names, one per box (a name may repeat).
    """

    task: ClassVar[str] = "boxes"
    masks: Tensor
    boxes: Tensor
    names: list[str]
