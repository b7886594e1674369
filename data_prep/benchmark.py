"""Data pipeline throughput: converters (images/s) and training batches (images/s), printed as markdown tables.

    python -m data_prep.benchmark [root=data/synthshapes] [realdata=../shared/realdata] [batches=30]

Converters run on synthshapes (generated and cached under ``root`` if missing). Training-batch throughput is measured
for LSJ at 1024 on real COCO photos (the panoptic sample in ``realdata``, resampled endlessly) and for LSJ at the CPU
default size (160) on synthshapes, with 0 and 2 loader workers, after a warm-up.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from data_prep import coco_detection_to_shards, coco_panoptic_to_shards
from data_prep.prepare_synthshapes import prepare_synthshapes
from openseed.cli import Option, command, integer, path

ROOT = Path(__file__).resolve().parents[1]


def converter_rows(raw: Path, workers: int) -> list[str]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("seg_train", "det_train"):
            if split.startswith("seg"):
                summary = coco_panoptic_to_shards.convert(raw / split / "panoptic.json", raw / split / "panoptic",
                                                          raw / split / "images", Path(tmp) / split, "bench",
                                                          workers=workers, progress=False)
                kind = "coco_panoptic_to_shards"
            else:
                summary = coco_detection_to_shards.convert(raw / split / "instances.json", raw / split / "images",
                                                           Path(tmp) / split, "bench", workers=workers,
                                                           progress=False)
                kind = "coco_detection_to_shards"
            rows.append(f"| {kind} | synthshapes {split} | {summary.written} | {workers} | "
                        f"{summary.written / summary.seconds:.0f} |")
    return rows


def loader_images_per_second(shard_dir: Path, image_size: int, scale_range: tuple[float, float], batch_size: int,
                             workers: int, batches: int) -> float:
    from openseed.data.datamodule import JointTrainDataset, OpenSeeDDataModule, SizedLoader, TrainStream
    from openseed.data.shards import ShardSet

    module = OpenSeeDDataModule(image_size=image_size, scale_range=scale_range, num_workers=workers, rank=0,
                                world_size=1)
    stream = TrainStream(ShardSet.open(shard_dir), batch_size, module.train_transform, (image_size, image_size),
                         shuffle_buffer=64)
    warmup = 3 if workers == 0 else 2 * workers
    loader = SizedLoader(module._loader(JointTrainDataset({"seg": stream}, rank=0, seed=0), persistent=False),
                         warmup + batches)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(batch["seg"]) for batch in iterator)
    return count / (time.perf_counter() - start)


OPTIONS = {
    "root": Option("the synthshapes folder (made when missing)", str(ROOT / "data" / "synthshapes"), path),
    "realdata": Option("the shared real data folder", str(ROOT.parent / "shared" / "realdata"), path),
    "batches": Option("timed batches per loader setting", 30, integer(1)),
    "workers": Option("loader worker processes of the parallel setting", min(2, os.cpu_count() or 1), integer(1)),
    "repeats": Option("loader measurements per setting; the median is shown", 3, integer(1)),
}


@command(OPTIONS, "python -m data_prep.benchmark", __doc__)
def main(args) -> int:
    shard_dirs = prepare_synthshapes(args.root, progress=False)
    print(f"machine: {os.cpu_count()} CPU cores\n")
    print("| converter | data | images | workers | images/s |\n|---|---|---|---|---|")
    for row in converter_rows(Path(args.root) / "raw", args.workers):
        print(row, flush=True)

    pan = Path(args.realdata) / "coco_panoptic_sample"
    with tempfile.TemporaryDirectory() as tmp:
        coco = Path(tmp) / "coco"
        coco_panoptic_to_shards.convert(pan / "panoptic_examples.json", pan / "panoptic_examples",
                                        pan / "input_images", coco, "coco_sample", progress=False)
        # (data, LSJ size, LSJ scale range, batch): the paper's setting, and the CPU default of conf/data/synthshapes
        settings = [("COCO panoptic photos (~640x480)", coco, 1024, (0.1, 2.0), 4),
                    ("synthshapes seg_train (160x160)", shard_dirs["seg_train"], 1024, (0.1, 2.0), 4),
                    ("synthshapes seg_train (160x160)", shard_dirs["seg_train"], 160, (0.5, 1.5), 16)]
        print("\n| training batches | LSJ size | scales | batch | workers | images/s |\n|---|---|---|---|---|---|")
        for name, path, size, scales, batch in settings:
            for workers in (0, args.workers):
                speed = statistics.median(loader_images_per_second(path, size, scales, batch, workers, args.batches)
                                          for _ in range(args.repeats))
                print(f"| {name} | {size} | {scales[0]}-{scales[1]} | {batch} | {workers} | {speed:.1f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
