"""Shared fixtures: real data read in place from ../shared/realdata, converted shard sets, shard surgery."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# W&B is the default logger: tests never reach for the network or an account, and keep the console quiet
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
REALDATA = Path(os.environ.get("OPENSEED_REALDATA", ROOT.parent / "shared" / "realdata"))
PANOPTIC = REALDATA / "coco_panoptic_sample"
LABELME = REALDATA / "labelme_coco"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"real test data missing: {path} (set OPENSEED_REALDATA to the shared/realdata folder)")
    return path


@pytest.fixture(scope="session")
def panoptic_shards(tmp_path_factory) -> Path:
    from data_prep.coco_panoptic_to_shards import convert

    out = tmp_path_factory.mktemp("coco_panoptic_sample")
    convert(_need(PANOPTIC / "panoptic_examples.json"), PANOPTIC / "panoptic_examples", PANOPTIC / "input_images",
            out, "coco_panoptic_sample", progress=False)
    return out


@pytest.fixture(scope="session")
def labelme_shards(tmp_path_factory) -> Path:
    from data_prep.coco_detection_to_shards import convert

    out = tmp_path_factory.mktemp("labelme")
    convert(_need(LABELME / "annotations.json"), LABELME, out, "labelme", progress=False)
    return out


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> dict[str, Path]:
    """synthshapes at scale 0.02 (40 / 4 / 80 / 4 images), generated and converted once per test session."""
    from data_prep.prepare_synthshapes import prepare_synthshapes

    return prepare_synthshapes(tmp_path_factory.mktemp("synth"), scale=0.02, workers=2, progress=False)


def read_tar(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def clone_shard_set(source: Path, out: Path, shard_sizes: list[int], mutate=None) -> Path:
    """A shard set with the given shard sizes, made by repeating ``source``'s samples under new image ids.

    ``mutate(global_index, members)`` may change a sample's members (name -> bytes) before it is written.
    """
    manifest = json.loads((source / "manifest.json").read_text())
    members = [m for s in manifest["shards"] for m in read_tar(source / s["file"])]
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    originals = list(samples.values())
    out.mkdir(parents=True, exist_ok=True)
    shards, index = [], 0
    for shard_no, size in enumerate(shard_sizes):
        tar_members = []
        for _ in range(size):
            sample = dict(originals[index % len(originals)])
            meta = json.loads(sample["json"])
            meta["image_id"] = index + 1
            sample["json"] = json.dumps(meta).encode()
            if mutate is not None:
                mutate(index, sample)
            tar_members += [(f"{index + 1:012d}.{ext}", data) for ext, data in sorted(sample.items())]
            index += 1
        file_name = f"{manifest['name']}-{shard_no:06d}.tar"
        write_tar(out / file_name, tar_members)
        shards.append({"file": file_name, "count": size})
    (out / "vocab.json").write_text((source / "vocab.json").read_text())
    manifest.update(shards=shards, num_samples=index)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def model_batch(shard_dir, count: int = 2, size: int = 128):
    """The first ``count`` samples of a shard set, resized to ``size`` (longer side) and collated: a model batch."""
    import itertools

    from openseed.data.shards import ShardSet, read_shards
    from openseed.data.transforms import EvalResize, collate

    shard_set = ShardSet.open(shard_dir)
    samples = [EvalResize(None, size)(s) for s in itertools.islice(read_shards(shard_dir), count)]
    return collate(samples, shard_set.vocabulary, shard_set.task)


@pytest.fixture(scope="session")
def seg_batch(synth_shards):
    """Two synthshapes segmentation training images as a batch (128 px)."""
    return model_batch(synth_shards["seg_train"])


@pytest.fixture(scope="session")
def det_batch(synth_shards):
    """Two synthshapes detection training images as a batch (128 px)."""
    return model_batch(synth_shards["det_train"])


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory) -> Path:
    """The tiny model (seed 0, random weights) saved as a model file."""
    import torch

    from openseed.modeling.checkpoint import save_model
    from openseed.modeling.openseed import build_openseed

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_model") / "tiny.pt"
    save_model(build_openseed("tiny"), path)
    return path
