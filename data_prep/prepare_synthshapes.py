"""Generate synthshapes and convert its four splits to shards, once (both steps are cached).

    python -m data_prep.prepare_synthshapes [root=data/synthshapes] [scale=1.0] [variant=standard|crowded]
        [check_loader=true]    (--help lists every key)

Layout: ``ROOT/raw`` holds the COCO-format files (``data_prep.synthetic``), ``ROOT/shards/{seg_train, seg_val,
det_train, det_val}`` the converted data sets. A conversion is redone when the raw set it came from changed.
``check_loader=true`` then streams a few joint training batches and one validation pass, and prints what it got.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from data_prep import coco_detection_to_shards, coco_panoptic_to_shards, synthetic
from openseed.cli import Option, command, integer, number, one_of, path
from openseed.data.shards import MANIFEST

SPLITS = ("seg_train", "seg_val", "det_train", "det_val")


def prepare_synthshapes(root: str | Path, seed: int = 0, scale: float = 1.0, image_size: int = 160,
                        workers: int | None = None, progress: bool = True, variant: str = "standard"
                        ) -> dict[str, Path]:
    """Make sure ``ROOT/shards/<split>`` exists for every split, generating and converting what is missing.

    ``variant``: ``data_prep.synthetic.VARIANTS`` (standard or crowded)."""
    root = Path(root)
    raw, shards = root / "raw", root / "shards"
    info = synthetic.is_cached(raw, seed, scale, image_size, variant)
    if info is None:
        info = synthetic.generate(raw, seed=seed, scale=scale, image_size=image_size, workers=workers,
                                  progress=progress, variant=variant)
    made = {k: info[k] for k in ("seed", "scale", "image_size", "version", "counts")}
    if variant != "standard":  # standard shards converted before the variants existed stay valid
        made["variant"] = variant
    source = {"synthshapes": made}
    workers = os.cpu_count() or 1 if workers is None else workers
    result = {}
    for split in SPLITS:
        out = shards / split
        result[split] = out
        manifest = out / MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()).get("source") == source:
            continue
        name = f"synthshapes_{split}" if variant == "standard" else f"synthshapes_{variant}_{split}"
        if split.startswith("seg"):
            summary = coco_panoptic_to_shards.convert(raw / split / "panoptic.json", raw / split / "panoptic",
                                                      raw / split / "images", out, name, maxcount=500,
                                                      workers=workers, progress=progress, source=source)
        else:
            summary = coco_detection_to_shards.convert(raw / split / "instances.json", raw / split / "images", out,
                                                       name, maxcount=500, workers=workers, progress=progress,
                                                       source=source)
        print(summary.report())
    return result


def check_loader(shard_dirs: dict[str, Path], steps: int = 3) -> None:
    """Build the data module of ``conf/data/synthshapes.yaml`` on these shards, stream a few joint training batches
    and one validation pass, and print what came out."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from openseed.config import CONF as conf
    overrides = ["+data=synthshapes", "+paths=default", f"data.seg.path={shard_dirs['seg_train']}",
                 f"data.det.path={shard_dirs['det_train']}", f"data.val.0.path={shard_dirs['seg_val']}",
                 f"data.val.1.path={shard_dirs['det_val']}"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        module = instantiate(compose(overrides=overrides).data)
    start = time.perf_counter()
    loader = module.train_dataloader()
    for step, batch in zip(range(steps), loader):
        parts = ", ".join(f"{k}: {tuple(b.images.shape)} images, {sum(len(t) for t in b.targets)} targets"
                          for k, b in batch.items())
        print(f"train step {step}: {parts}")
    print(f"training epoch = {len(loader)} steps (seg batch {module.seg.batch_size}); first {steps} steps in "
          f"{time.perf_counter() - start:.1f} s")
    for val_loader, shards in zip(module.val_dataloader(), module.val_sets):
        seen = sum(len(b) for b in val_loader)
        print(f"validation {shards.name}: {seen} of {shards.num_samples} images in {len(val_loader)} batches")


OPTIONS = {
    "root": Option("the data folder (raw/ and shards/ under it)", "data/synthshapes", path),
    "seed": Option("generator seed", 0, integer(0)),
    "scale": Option("multiply the default split sizes by this", 1.0, lambda value, key: number(value, key, above=0)),
    "image_size": Option("image side in pixels (>= 64)", 160, integer(64)),
    "workers": Option("processes (null: all CPUs); does not change the output", None, integer(1)),
    "variant": Option("standard or crowded (data_prep.synthetic)", "standard", one_of(sorted(synthetic.VARIANTS))),
    "check_loader": Option("then stream a few training batches and one validation pass", False),
}


@command(OPTIONS, "python -m data_prep.prepare_synthshapes", __doc__)
def main(args) -> int:
    start = time.perf_counter()
    dirs = prepare_synthshapes(args.root, args.seed, args.scale, args.image_size, args.workers,
                               variant=args.variant)
    print(f"synthshapes shards ready under {Path(args.root) / 'shards'} ({time.perf_counter() - start:.1f} s)")
    if args.check_loader:
        check_loader(dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
