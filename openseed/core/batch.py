"""What crosses the data -> model seam: a padded ``Batch`` of images with one ``Targets`` per image.

Pure torch: the model imports this, never Lightning or webdataset. Boxes are pixel boxes (``openseed.core.boxes``:
xyxy in pixels of the transformed, unpadded image); ``Batch.model_boxes`` converts them to the model's convention once
per batch, for the model (conditioned queries) and the losses alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

import torch
from torch import Tensor

from openseed.core.boxes import targets_to_model_boxes
from openseed.core.vocabulary import Vocabulary

Task = Literal["seg", "det"]


@dataclass
class Targets:
    """Ground truth of one image.

    Attributes:
        labels: long [N], contiguous indices into the batch's ``Vocabulary``.
        boxes: float32 [N, 4], pixel xyxy (``openseed.core.boxes``).
        masks: bool [N, H, W] at the padded batch size, or None when the data has no masks (boxes-only detection).
        is_thing: bool [N].
        mask_is_pseudo: bool [N]; True where the mask was decoded by a model (offline mask assistance), not annotated.
        has_mask: bool [N]; False for objects without a mask (their rows in ``masks`` are all False).
        ignore_mask: bool [H, W] at the padded batch size, or None: crowd regions, never targets; evaluation and
            losses may ignore predictions there.
        image_id: the data set's image id.
        orig_size: (height, width) of the image as stored, before any resizing.
        image_size: (height, width) of the valid (unpadded) image content after transforms.
    """

    labels: Tensor
    boxes: Tensor
    masks: Tensor | None
    is_thing: Tensor
    mask_is_pseudo: Tensor
    has_mask: Tensor
    ignore_mask: Tensor | None
    image_id: int
    orig_size: tuple[int, int]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class Batch:
    """A padded batch of images from one data set.

    Attributes:
        images: uint8 [B, 3, H, W], RGB, zero-padded at the bottom/right to a common size (a multiple of 32 or a
            fixed size); the model normalises with the ImageNet mean/std.
        padding_mask: bool [B, H, W], True on padding pixels.
        targets: one ``Targets`` per image.
        vocabulary: the data set's classes; ``targets[i].labels`` index into it.
        task: "seg" (panoptic: things and stuff with masks) or "det" (detection: things, boxes, masks optional).
        dataset: the data set's name (as stored in its shards).
        annotations: evaluation batches only: per image the stored annotation (``json``: the shard's JSON at the
            original size; ``panoptic_png``: the raw panoptic PNG or None), the ground truth evaluators compare to.
    """

    images: Tensor
    padding_mask: Tensor
    targets: list[Targets]
    vocabulary: Vocabulary = field(compare=False)
    task: Task
    dataset: str
    annotations: list[dict] | None = None
    _model_boxes: list[Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def padded_size(self) -> tuple[int, int]:
        """(H, W) of the padded images: the size model boxes are normalised by."""
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def model_boxes(self) -> list[Tensor]:
        """Per image, the targets' boxes in the model's convention (float32 [N, 4] cxcywh normalised by
        ``padded_size``, ``openseed.core.boxes.targets_to_model_boxes``), converted on the first call and kept."""
        if self._model_boxes is None:
            self._model_boxes = [targets_to_model_boxes(t.boxes.float(), self.padded_size) for t in self.targets]
        return self._model_boxes

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(self, images=self.images.to(device, non_blocking=non_blocking),
                       padding_mask=self.padding_mask.to(device, non_blocking=non_blocking),
                       targets=[t.to(device, non_blocking) for t in self.targets])

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        return replace(self, images=self.images.pin_memory(), padding_mask=self.padding_mask.pin_memory(),
                       targets=[_map_tensors(t, Tensor.pin_memory) for t in self.targets])


def _map_tensors(obj, fn):
    changes = {f.name: fn(getattr(obj, f.name)) for f in fields(obj) if isinstance(getattr(obj, f.name), Tensor)}
    return replace(obj, **changes)
