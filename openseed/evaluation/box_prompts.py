"""Box-prompted segmentation, and scoring it against a data set's masks (the paper's "box prompts", Table 1).

Every non-crowd ground-truth box of a detection data set with masks becomes, with its class name, a conditioned
query without noise (``OpenSeeD.segment_boxes``); the mask decoded from it is compared with that object's own mask.
Detection is given, so only the masks are tested:

- ``mask_AP`` / ``mask_AP50`` and per class AP: the COCO instance protocol, every decoded mask labelled with its
  box's class and scored 1.0 (ties: the AP then measures how many masks pass each IoU threshold);
- ``mIoU``: the mean, over boxes, of the IoU between a box's mask and its object's mask (per class as well).

A box that the decoding resize drops (under ``MIN_BOX_SIDE`` px wide or high at the decoding size) gets no mask: it
is a miss for AP, IoU 0, and counted in ``boxes_without_mask``. Objects stored without a mask are left out of the
truth (counted in ``objects_without_truth``); undecodable samples are counted in ``skipped_images``.

``decode_box_prompts`` is the decoding step alone (one mask per box at the original image size, kept with its
object's index in the stored JSON); ``data_prep.pseudo_masks`` writes its masks as pseudo masks (offline mask
assistance, Table 7). Command line::

    python -m openseed.evaluation.box_prompts ckpt=model.safetensors shards=data/shards/det_val [image_size=160]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from openseed.cli import Option, command, integer, path
from openseed.core.boxes import stored_box_xywh
from openseed.core.codecs import encode_rle
from openseed.core.vocabulary import Vocabulary
from openseed.data.shards import ShardSet, decode_object_mask, decode_sample, iter_raw_samples
from openseed.data.transforms import EvalResize, collate, eval_resize_for
from openseed.evaluation.instances import evaluate_coco
from openseed.evaluation.runner import DatasetEvaluator


class PromptNames:
    """The class names given with a data set's boxes (``names[label]``), with their vocabulary embedded once (in
    evaluation mode: the prompt ensemble) for every ``decode_box_prompts`` call."""

    def __init__(self, model, names: Sequence[str]):
        self.names = list(names)
        self.vocabulary = Vocabulary.from_names(sorted(set(self.names)) or ["object"])
        model.eval()
        with torch.no_grad():
            self.text = model.embed_vocabulary(self.vocabulary)


@torch.no_grad()
def decode_box_prompts(model, raws: Sequence[dict], source: ShardSet, names: PromptNames, resize: EvalResize,
                       pad_to: tuple[int, int] | None = None
                       ) -> Iterator[tuple[dict, dict | None, dict[int, torch.Tensor] | None]]:
    """For each raw sample: (raw, meta, masks) with meta its stored JSON, parsed, and masks = {index of the object
    in ``meta["objects"]``: bool [H0, W0] mask at the original size} for every non-crowd box the resize keeps; meta
    and masks are None for a sample that cannot be decoded (``decode_sample`` logs it). ``names.names[label]`` is the
    class name given with a box of that label.

    Masks are paired with their objects by identity: each box's position among the non-crowd objects is carried
    through the resize (which drops thin or clipped boxes), so a dropped box never shifts the others' masks."""
    decoded = [(raw, decode_sample(raw, source.vocabulary)) for raw in raws]
    usable = [(raw, s) for raw, s in decoded if s is not None]
    results: dict[int, tuple[dict, dict[int, torch.Tensor]]] = {}
    if usable:
        resized, positions = [], []
        for _, sample in usable:
            moved = resize(replace(sample, labels=torch.arange(len(sample.labels))))
            positions.append(moved.labels.tolist())
            resized.append(replace(moved, labels=sample.labels[moved.labels]))
        batch = collate(resized, source.vocabulary, source.task, pad_to=pad_to)
        device = next(model.parameters()).device
        masks = model.segment_boxes(batch.images.to(device), batch.padding_mask.to(device),
                                    [t.boxes.to(device) for t in batch.targets],
                                    [[names.names[int(label)] for label in t.labels] for t in batch.targets],
                                    vocabulary=names.vocabulary, text=names.text)
        for (raw, sample), image_masks, kept in zip(usable, masks, positions):
            height, width = sample.orig_size
            full = F.interpolate(image_masks[None].float(), size=(height, width), mode="nearest")[0].bool().cpu() \
                if len(image_masks) else torch.zeros((0, height, width), dtype=torch.bool)
            meta = json.loads(raw["json"])
            targets = [i for i, obj in enumerate(meta["objects"]) if not obj["iscrowd"]]  # decode_sample's order
            results[id(raw)] = meta, {targets[k]: mask for k, mask in zip(kept, full)}
    for raw, _ in decoded:
        yield raw, *results.get(id(raw), (None, None))


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@torch.no_grad()
def evaluate_box_prompts(model, shards_dir, image_size: int | None = None, batch_size: int = 8,
                         device: str = "cpu") -> dict:
    """Score the masks ``model`` decodes from a detection data set's own boxes and class names (module doc).

    Images are resized as ``evaluate_shards`` resizes them (``eval_resize_for``). Returns fractions: ``mask_AP``,
    ``mask_AP50``, ``mIoU``, ``per_class`` ({"mask_AP": {name: AP}, "IoU": {name: mean IoU}}), and the counts
    ``boxes``, ``boxes_without_mask``, ``objects_without_truth``, ``skipped_images``."""
    source = ShardSet.open(shards_dir)
    if source.task != "det" or source.mask_format != "rle":
        raise ValueError(f"{shards_dir}: box prompts are scored on a detection data set with masks "
                         f"(task 'det', mask format 'rle'), this one is {source.task!r} / {source.mask_format!r}")
    model = model.to(device).eval()
    resize, pad_to = eval_resize_for(model.config, image_size)
    names = PromptNames(model, source.vocabulary.prompt_names())
    truth = DatasetEvaluator.for_shards(source)
    detections: list[dict] = []
    ious: dict[int, list[float]] = {}  # category id -> one IoU per box
    counts = {"boxes": 0, "boxes_without_mask": 0, "objects_without_truth": 0, "skipped_images": 0}
    for chunk in _chunks(iter_raw_samples(source.urls), batch_size):
        for _, meta, masks in decode_box_prompts(model, chunk, source, names, resize, pad_to):
            if meta is None:
                counts["skipped_images"] += 1
                continue
            objects = meta["objects"]
            scored = {**meta, "objects": [o for o in objects if o["iscrowd"] or "rle" in o]}
            truth.add_instance_truth(scored, None)
            for index, obj in enumerate(objects):
                if obj["iscrowd"]:
                    continue
                if "rle" not in obj:
                    counts["objects_without_truth"] += 1
                    continue
                counts["boxes"] += 1
                mask = masks.get(index)
                if mask is None:
                    counts["boxes_without_mask"] += 1
                    ious.setdefault(obj["category_id"], []).append(0.0)
                    continue
                gt = decode_object_mask(obj, *mask.shape)
                union = int((gt | mask).sum())
                ious.setdefault(obj["category_id"], []).append(int((gt & mask).sum()) / union if union else 0.0)
                detections.append({"image_id": int(meta["image_id"]), "category_id": obj["category_id"],
                                   "bbox": stored_box_xywh(obj), "score": 1.0,
                                   "segmentation": encode_rle(mask[None])[0]})
    stats = evaluate_coco(truth.coco_truth(), detections, "segm")
    name_of = {c["id"]: c["name"] for c in truth.categories}
    every_iou = [v for values in ious.values() for v in values]
    return {"mask_AP": stats["AP"], "mask_AP50": stats["AP50"],
            "mIoU": float(np.mean(every_iou)) if every_iou else 0.0,
            "per_class": {"mask_AP": {c["name"]: c["AP"] for c in stats["per_category"]},
                          "IoU": {name_of[k]: float(np.mean(v)) for k, v in sorted(ious.items())}},
            **counts}


CLI_OPTIONS = {
    "ckpt": Option("a model file or training checkpoint", required=True, check=path),
    "shards": Option("a converted detection data set with masks (det_val)", required=True, check=path),
    "image_size": Option("longer side the images are decoded at (null: the model's evaluation size)", None,
                         integer(1)),
    "batch_size": Option("images per forward pass", 8, integer(1)),
    "device": Option("torch device", "cpu", path),
    "json": Option("print one JSON object instead of the summary", False),
}


@command(CLI_OPTIONS, "python -m openseed.evaluation.box_prompts", __doc__)
def main(args) -> int:
    from openseed.modeling.openseed import load_model

    try:
        metrics = evaluate_box_prompts(load_model(args.ckpt), args.shards, args.image_size, args.batch_size,
                                       args.device)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics))
        return 0
    print(f"{args.shards}: box-prompted masks of {metrics['boxes']} boxes: mask AP {100 * metrics['mask_AP']:.1f}, "
          f"AP50 {100 * metrics['mask_AP50']:.1f}, mIoU {100 * metrics['mIoU']:.1f}")
    for key in ("boxes_without_mask", "objects_without_truth", "skipped_images"):
        if metrics[key]:
            print(f"warning: {key.replace('_', ' ')}: {metrics[key]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
