"""Look at a converted data set: a summary of its manifest, and a picture of samples with their targets.

    python -m data_prep.inspect_shards root=DIR [out=samples.png] [count=8] [lsj=512]

The picture shows each sample's masks (coloured, half transparent), boxes and class names exactly as the training
pipeline delivers them; with ``lsj=SIZE`` after large-scale jitter at that size, otherwise at the stored size.
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter

import torch
from PIL import Image

from openseed.cli import Option, command, integer, path
from openseed.data.shards import Sample, ShardSet, read_shards
from openseed.data.transforms import LargeScaleJitter
from openseed.visualize import draw_overlay, grid


def render(sample: Sample, names: list[str]) -> Image.Image:
    """The image with masks blended in, crowd/ignore regions greyed, boxes and labels drawn."""
    return draw_overlay(sample.image.permute(1, 2, 0).numpy(),
                        None if sample.masks is None else sample.masks.numpy(), sample.boxes.numpy(),
                        [names[int(label)] for label in sample.labels],
                        None if sample.ignore_mask is None else sample.ignore_mask.numpy())


OPTIONS = {
    "root": Option("a converted data set folder (with manifest.json)", required=True, check=path),
    "out": Option("write a PNG of the first `count` samples here", None, path),
    "count": Option("samples to summarise and draw", 8, integer(1)),
    "lsj": Option("apply large-scale jitter at this size first", None, integer(1)),
    "seed": Option("seed of the jitter", 0, integer(0)),
}


@command(OPTIONS, "python -m data_prep.inspect_shards", __doc__)
def main(args) -> int:
    try:
        shard_set = ShardSet.open(args.root)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    vocab = shard_set.vocabulary
    print(f"{shard_set.name}: task {shard_set.task}, masks {shard_set.mask_format}, {shard_set.num_samples} images "
          f"in {len(shard_set.urls)} shards, {len(vocab)} classes ({vocab.num_things} things)")
    samples = list(itertools.islice(read_shards(args.root), args.count))
    labels = Counter(vocab.prompt_names()[int(label)] for s in samples for label in s.labels)
    print(f"first {len(samples)} images: {sum(labels.values())} targets; most common: {labels.most_common(5)}")
    if args.out:
        if args.lsj:
            generator = torch.Generator().manual_seed(args.seed)
            samples = [LargeScaleJitter(args.lsj)(s, generator) for s in samples]
        grid([render(s, vocab.prompt_names()) for s in samples]).save(args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
