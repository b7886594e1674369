"""Offline mask assistance: decode a mask for every box of a detection data set with a trained model.

    python -m data_prep.pseudo_masks ckpt=model.safetensors shards=data/shards/objects365v1_train \
        out=data/shards/objects365v1_train_pseudo [image_size=1024 batch_size=8]

Each box's class name and box become a conditioned query (box-prompted decoding, no noise); its mask is written as
compressed RLE with ``pseudo_mask: true`` (paper Tables 7-8). Images and everything else are copied untouched; boxes
that already have an annotated mask keep it unless ``overwrite=true``; crowd boxes get no mask. A box that the
decoding resize drops (under ``MIN_BOX_SIDE`` px wide or high at ``image_size``, or outside the image) gets no mask
either: it is written without ``rle`` (``has_mask`` False) and counted, by reason, in the summary's
``boxes_without_mask``. Masks are matched to their objects by the object's position in the JSON, carried through the
resize, so a dropped box never shifts the others' masks. Train with the result by pointing ``data.det.path`` at it
and setting ``data.det_masks=true``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from openseed.cli import Option, command, integer, path
from openseed.core.codecs import encode_rle
from openseed.data.shards import MANIFEST, VOCAB, ShardSet, iter_raw_samples
from openseed.data.transforms import MIN_BOX_SIDE, EvalResize
from openseed.evaluation.box_prompts import PromptNames, decode_box_prompts

DROPPED_BY_RESIZE = (f"box dropped by the resize (under {MIN_BOX_SIDE:g} px wide or high at the decoding size, "
                     "or outside the image)")


def pseudo_mask_shards(model, shards_dir: str | Path, out_dir: str | Path, image_size: int = 1024,
                       batch_size: int = 8, overwrite: bool = False, progress: bool = True) -> dict:
    """Write a copy of a detection shard set with a pseudo mask for every non-crowd box; returns a summary."""
    from webdataset import TarWriter

    source = ShardSet.open(shards_dir)
    if source.task != "det":
        raise ValueError(f"{shards_dir} is a {source.task!r} data set; pseudo masks are for detection data")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    names = PromptNames(model, source.vocabulary.prompt_names())
    resize = EvalResize(None, image_size)
    counts = {"images": 0, "pseudo_masks": 0, "kept_annotated": 0, "crowd_without_mask": 0, "skipped": 0,
              "boxes_without_mask": {}}  # reason -> number of non-crowd boxes that got no mask
    start = time.perf_counter()
    bar = tqdm(total=source.num_samples, desc="pseudo masks", unit="img", disable=not progress)
    shard_records = []
    for url, count in zip(source.urls, source.counts):
        out_name = Path(url).name
        raws = list(iter_raw_samples([url]))
        with TarWriter(str(out_dir / out_name)) as writer:
            for first in range(0, len(raws), batch_size):
                chunk = raws[first: first + batch_size]
                _write_chunk(model, chunk, source, names, resize, writer, overwrite, counts)
                bar.update(len(chunk))
        shard_records.append({"file": out_name, "count": count})
    bar.close()
    (out_dir / VOCAB).write_text((Path(shards_dir) / VOCAB).read_text())
    manifest = json.loads((Path(shards_dir) / MANIFEST).read_text())
    counts["seconds"] = round(time.perf_counter() - start, 2)
    manifest.update(mask_format="rle", shards=shard_records,
                    source={"pseudo_masks": {"from": str(shards_dir), "image_size": image_size, **counts},
                            "previous": manifest.get("source", {})})
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return counts


def _write_chunk(model, raws, source, names, resize, writer, overwrite, counts) -> None:
    for raw, meta, masks in decode_box_prompts(model, raws, source, names, resize):
        if meta is None:
            counts["skipped"] += 1
            continue
        rles = dict(zip(masks, encode_rle(torch.stack(list(masks.values()))))) if masks else {}
        for index, obj in enumerate(meta["objects"]):
            if obj["iscrowd"]:
                counts["crowd_without_mask"] += int("rle" not in obj)
                continue
            rle = rles.get(index)
            if "rle" in obj and not obj.get("pseudo_mask") and (not overwrite or rle is None):
                counts["kept_annotated"] += 1
                continue
            if rle is None:  # no mask for this box: none is written (an older pseudo mask goes too)
                obj.pop("rle", None)
                obj["pseudo_mask"] = False
                reasons = counts["boxes_without_mask"]
                reasons[DROPPED_BY_RESIZE] = reasons.get(DROPPED_BY_RESIZE, 0) + 1
                continue
            obj["rle"], obj["pseudo_mask"] = rle, True
            counts["pseudo_masks"] += 1
        meta["mask_format"] = "rle"
        out = {k: v for k, v in raw.items() if not k.startswith("__")}
        out.update(__key__=raw["__key__"], json=json.dumps(meta).encode())
        writer.write(out)
        counts["images"] += 1


OPTIONS = {
    "ckpt": Option("an openseed model file or training checkpoint", required=True, check=path),
    "shards": Option("a converted detection data set", required=True, check=path),
    "out": Option("the output folder (the same data set with the pseudo masks)", required=True, check=path),
    "image_size": Option("longer side the images are decoded at", 1024, integer(1)),
    "batch_size": Option("images per forward pass", 8, integer(1)),
    "overwrite": Option("replace annotated masks too", False),
    "device": Option("torch device (null: cuda when available, else cpu)", None, path),
}


@command(OPTIONS, "python -m data_prep.pseudo_masks", __doc__)
def main(args) -> int:
    from openseed.modeling.openseed import load_model

    try:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(args.ckpt).to(device)
        summary = pseudo_mask_shards(model, args.shards, args.out, args.image_size, args.batch_size, args.overwrite)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"pseudo masks: {summary}")
    for reason, number in summary["boxes_without_mask"].items():
        print(f"warning: {number} box(es) got no mask: {reason}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
