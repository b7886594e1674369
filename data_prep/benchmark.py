"""Data pipeline throughput: converters (images/s) and training batches (images/s), printed as markdown tables.

    python -m data_prep.benchmark [root=data/synthshapes] [realdata=../shared/realdata] [batches=30]
                                  [gpu_check=runs/gpu_check/gpu_check.json] [gpus_per_node=8]

Converters run on synthshapes (generated and cached under ``root`` if missing). Training-batch throughput is measured
for LSJ at 1024 on real COCO photos (the panoptic sample in ``realdata``, resampled endlessly) and for LSJ at the CPU
default size (160) on synthshapes, with 0 and 2 loader workers, after a warm-up.

Feeding a GPU: the joint batches of the paper's setting (per GPU 4 segmentation images with their panoptic masks and
8 detection images with boxes, LSJ 1024, COCO photos) from one loader worker process and from ``workers``, against
the images per second one GPU's training step consumes: the ``train_step`` figure of a ``make gpu-check`` report
when ``gpu_check`` names one, else the reference's 2.85 images/s per V100 as the floor. It prints the workers one GPU
and one node of ``gpus_per_node`` GPUs need (each worker is one single-threaded process: one CPU core).
"""

from __future__ import annotations

import json
import math
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


#: Images per second one V100 trains in the reference's setting: the floor a loader must feed when no GPU figure of
#: our own is at hand.
REFERENCE_GPU_IMAGES_PER_S = 2.85
#: The per-GPU joint batch of experiment=swint_joint (the paper's 32 + 64 images per step on 8 GPUs).
JOINT_BATCH = {"seg": 4, "det": 8}


def joint_images_per_second(seg_dir: Path, det_dir: Path, workers: int, batches: int,
                            batch_sizes: dict[str, int] = JOINT_BATCH, image_size: int = 1024) -> float:
    """Images per second (both streams together) of the training loader's joint batches: segmentation with masks,
    detection with boxes only, LSJ at ``image_size`` with the paper's scales, padded to ``image_size`` squared."""
    from openseed.data.datamodule import JointTrainDataset, OpenSeeDDataModule, SizedLoader, TrainStream
    from openseed.data.shards import ShardSet

    module = OpenSeeDDataModule(image_size=image_size, scale_range=(0.1, 2.0), num_workers=workers, rank=0,
                                world_size=1)
    pad = (image_size, image_size)
    streams = {"seg": TrainStream(ShardSet.open(seg_dir), batch_sizes["seg"], module.train_transform, pad, 64),
               "det": TrainStream(ShardSet.open(det_dir), batch_sizes["det"], module.train_transform, pad, 64,
                                  keep_masks=False)}
    warmup = 2 if workers == 0 else 2 * workers
    loader = SizedLoader(module._loader(JointTrainDataset(streams, rank=0, seed=0), persistent=False),
                         warmup + batches)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(joint["seg"]) + len(joint["det"]) for joint in iterator)
    return count / (time.perf_counter() - start)


def gpu_images_per_second(report: Path | None) -> tuple[float, str]:
    """(images/s one GPU's training step consumes, where the figure comes from): the first batch that fitted in
    the ``train_step`` section of a ``gpu_check.json``, or the reference's V100 floor without a report."""
    if report is None:
        return REFERENCE_GPU_IMAGES_PER_S, "the reference's training speed per V100, as the floor"
    try:
        data = json.loads(Path(report).read_text())
        section = data["sections"]["train_step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{report}: not a gpu_check.json with a train_step section "
                         f"({type(err).__name__}: {err})") from err
    fitted = [row for row in section.get("figures", {}).get("tried", []) if row.get("fits")]
    if section.get("status") != "ok" or not fitted:
        raise ValueError(f"{report}: its train_step section has no step that ran (status {section.get('status')!r})")
    row = fitted[0]
    device = data.get("environment", {}).get("device", "GPU")
    return float(row["images_per_s"]), f"{report}: {device}, {row['seg']} + {row['det']} images per step"


def workers_needed(consumed: float, per_worker: float) -> int:
    """Loader worker processes that produce at least ``consumed`` images/s at ``per_worker`` images/s each."""
    if per_worker <= 0:
        raise ValueError(f"a worker's rate must be positive, got {per_worker}")
    return max(1, math.ceil(consumed / per_worker - 1e-9))


OPTIONS = {
    "root": Option("the synthshapes folder (made when missing)", str(ROOT / "data" / "synthshapes"), path),
    "realdata": Option("the shared real data folder", str(ROOT.parent / "shared" / "realdata"), path),
    "batches": Option("timed batches per loader setting", 30, integer(1)),
    "workers": Option("loader worker processes of the parallel setting", min(2, os.cpu_count() or 1), integer(1)),
    "repeats": Option("loader measurements per setting; the median is shown", 3, integer(1)),
    "gpu_check": Option("a make gpu-check report (gpu_check.json) whose training step sets the images/s to feed; "
                        "without it, the reference's 2.85 images/s per V100", None, path),
    "gpus_per_node": Option("GPUs per node, for the workers a node needs", 8, integer(1)),
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
        det = Path(tmp) / "coco_det"
        coco_detection_to_shards.convert(pan / "panoptic_coco_detection_format.json", pan / "input_images", det,
                                         "coco_det_sample", progress=False, keep_masks=False)
        print_feeding(coco, det, args)
    return 0


def print_feeding(seg_dir: Path, det_dir: Path, args) -> None:
    """The joint loader from one worker process and from ``args.workers``, against what one GPU consumes."""
    consumed, source = gpu_images_per_second(args.gpu_check)
    batch = f"{JOINT_BATCH['seg']} seg (panoptic masks) + {JOINT_BATCH['det']} det (boxes)"
    print("\n| joint batches, COCO photos, LSJ 1024 | workers | images/s | images/s per worker |\n|---|---|---|---|")
    rates = {}
    for workers in sorted({1, args.workers}):
        rates[workers] = statistics.median(joint_images_per_second(seg_dir, det_dir, workers, args.batches)
                                           for _ in range(args.repeats))
        print(f"| {batch} | {workers} | {rates[workers]:.1f} | {rates[workers] / workers:.1f} |", flush=True)
    per_worker = rates[1]
    per_gpu = workers_needed(consumed, per_worker)
    print(f"\none GPU consumes {consumed:.2f} images/s ({source}).\nOne loader worker process gives "
          f"{per_worker:.1f} images/s ({consumed / per_worker:.2f} of a worker per GPU): {per_gpu} worker(s) per GPU, "
          f"{per_gpu * args.gpus_per_node} per node of {args.gpus_per_node} GPUs (one CPU core each)")


if __name__ == "__main__":
    raise SystemExit(main())
