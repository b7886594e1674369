"""Results as COCO records (the JSON objects of a COCO results file), written once for the evaluators, the predictor
and the tools.

- ``instances_to_coco``: instance detections (``openseed.core.predictions.Instances``) ->
  ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"[, "segmentation": compressed RLE]}``.
- ``box_prompt_to_coco``: masks decoded from given boxes (box prompts) -> records that name their class
  (``category_name``) and carry the prompt box, a score, the mask's ``area`` and its RLE.

Boxes are pixel xyxy in (``openseed.core.boxes``), COCO ``[x, y, w, h]`` out; RLE as
``openseed.core.codecs.encode_rle``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from openseed.core.boxes import xyxy_to_xywh
from openseed.core.codecs import encode_rle
from openseed.core.predictions import BoxPromptMasks, Instances


def instances_to_coco(instances: Instances, image_id: int, category_ids: Sequence[int] | None = None) -> list[dict]:
    """Detections -> COCO result dicts (image_id, category_id in the data set's ids, bbox [x, y, w, h], score, and
    segmentation as compressed RLE when masks are present)."""
    labels = instances.labels.tolist()
    scores = instances.scores.tolist()
    boxes = xyxy_to_xywh(instances.boxes.detach().float().cpu()).tolist()
    rles = encode_rle(instances.masks) if instances.masks is not None else None
    records = []
    for i, (label, score, box) in enumerate(zip(labels, scores, boxes)):
        record = {"image_id": int(image_id),
                  "category_id": int(category_ids[label]) if category_ids is not None else int(label),
                  "bbox": box, "score": float(score)}
        if rles is not None:
            record["segmentation"] = rles[i]
        records.append(record)
    return records


def box_prompt_to_coco(prompted: BoxPromptMasks, image_id: int,
                       scores: Tensor | Sequence[float] | None = None) -> list[dict]:
    """Box-prompted (conditioned) masks -> COCO-style records, one per box: image_id, category_name, bbox [x, y, w, h]
    (the prompt box), score (1.0 when not given), area (mask pixels), segmentation (compressed RLE, str counts)."""
    masks, boxes_xyxy, names = prompted.masks, prompted.boxes, prompted.names
    num = masks.shape[0]
    if boxes_xyxy.shape[0] != num or len(names) != num:
        raise ValueError(f"{num} masks, {boxes_xyxy.shape[0]} boxes and {len(names)} names must match")
    score_list = [1.0] * num if scores is None else [float(s) for s in (scores.tolist() if isinstance(scores, Tensor)
                                                                         else scores)]
    areas = masks.flatten(1).sum(dim=1).tolist()
    return [{"image_id": int(image_id), "category_name": str(name), "bbox": box, "score": score, "area": int(area),
             "segmentation": rle}
            for name, box, score, area, rle in zip(names, xyxy_to_xywh(boxes_xyxy.detach().float().cpu()).tolist(),
                                                   score_list, areas, encode_rle(masks))]
