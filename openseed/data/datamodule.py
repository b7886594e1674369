"""Streaming shards into joint training batches and finite evaluation batches (LightningDataModule).

Training: every (rank, worker) draws shards uniformly at random *with replacement* and reads each drawn shard
whole (so every image is equally likely, whatever the shard sizes: each draw yields every image of the shard once),
shuffles samples in a buffer, applies LSJ and batches. The streams are endless; each rank's loader is cut at
exactly ``steps_per_epoch`` batches, so all DDP ranks run the same number of steps. The segmentation data sets the
epoch ("balanced sampling"): ``steps_per_epoch = seg samples // (seg batch x world size)``, whatever the size of the
detection data. A step's batch is ``{"seg": Batch, "det": Batch}``.

Evaluation: finite; the samples are split over all (rank, worker) slots so that each is seen exactly once: by whole
shards when there are at least as many shards as slots, else by sample index.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from openseed.core.batch import Batch
from openseed.data.coco import DataError
from openseed.data.shards import STREAM_SKIPS, Sample, ShardSet, decode_sample, iter_raw_samples
from openseed.data.transforms import EvalResize, LargeScaleJitter, collate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    """One converted data set and the batch size it is read with (per rank)."""

    path: str
    batch_size: int

    @classmethod
    def of(cls, value: DataSource | Mapping) -> DataSource:
        if isinstance(value, DataSource):
            return value
        unknown = set(value) - {"path", "batch_size"}
        if unknown:
            raise ValueError(f"unknown data source key(s) {sorted(unknown)}; expected path and batch_size")
        if int(value["batch_size"]) < 1:
            raise ValueError(f"batch_size must be >= 1, got {value['batch_size']}")
        return cls(str(value["path"]), int(value["batch_size"]))


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _shuffled(samples: Iterator, buffer_size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle: keep ``buffer_size`` samples, emit a random one as each new one arrives."""
    buffer = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class TrainStream:
    """An endless, shuffled, augmented stream of batches from one shard set, for one (rank, worker) slot.

    Unreadable samples and shards are skipped (counted and logged by ``STREAM_SKIPS``), but a stream with nothing
    readable does not spin forever: it stops with a ``DataError`` naming the shard files when every shard of the set
    has been read since the last readable sample without giving one (all samples corrupt, zero-byte or broken tars),
    or after ``max_consecutive_skips`` unreadable samples in a row. Its default, 1000 or three times the largest
    shard's sample count, whichever is more, lets one wholly unreadable shard among good ones be skipped.
    """

    def __init__(self, shards: ShardSet, batch_size: int, transform: Callable, pad_to: tuple[int, int] | None,
                 shuffle_buffer: int, keep_masks: bool = True, max_consecutive_skips: int | None = None):
        if max_consecutive_skips is None:
            max_consecutive_skips = max([1000] + [3 * count for count in shards.counts])
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.pad_to, self.shuffle_buffer, self.keep_masks = pad_to, shuffle_buffer, keep_masks
        self.max_consecutive_skips = max_consecutive_skips

    def _readable_samples(self, rng: random.Random) -> Iterator[Sample]:
        """Decoded samples of shards drawn with replacement, without end, until the data proves unreadable."""
        all_urls = set(self.shards.urls)
        barren: set[str] = set()  # shards read whole since the last readable sample, none of them giving one
        run, run_urls = 0, {}  # unreadable samples in a row, and the shards they came from (in order)
        while True:
            url = rng.choice(self.shards.urls)
            readable = False
            for raw in iter_raw_samples([url]):
                sample = decode_sample(raw, self.shards.vocabulary, dense_masks=False)
                if sample is None:
                    run += 1
                    run_urls[url] = None
                    if run >= self.max_consecutive_skips:
                        raise DataError(f"{self.shards.root}: {run} training samples in a row could not be read "
                                        f"(max_consecutive_skips={self.max_consecutive_skips}), from shard(s) "
                                        f"{_names(run_urls)}; last: {STREAM_SKIPS.last}")
                    continue
                readable, run, run_urls = True, 0, {}
                barren.clear()
                yield sample
            if not readable:
                barren.add(url)
                if barren >= all_urls:
                    raise DataError(f"{self.shards.root}: no readable training sample in a whole pass over the "
                                    f"{len(all_urls)} shard(s) {_names(sorted(all_urls))}: each was read and gave "
                                    f"none (skips in this process: {dict(STREAM_SKIPS.counts)}; last: "
                                    f"{STREAM_SKIPS.last}); check the files or convert the data set again")

    def batches(self, seed: tuple) -> Iterator[Batch]:
        rng = random.Random(repr(seed))
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        pending: list[Sample] = []
        for sample in _shuffled(self._readable_samples(rng), self.shuffle_buffer, rng):
            if not self.keep_masks:
                sample = _without_masks(sample)
            pending.append(self.transform(sample, generator))
            if len(pending) == self.batch_size:
                yield collate(pending, self.shards.vocabulary, self.shards.task, pad_to=self.pad_to)
                pending = []


def _names(urls, at_most: int = 10) -> str:
    """Shard file names for a message: the first ``at_most``, then how many more."""
    names = [Path(url).name for url in urls]
    more = f" and {len(names) - at_most} more" if len(names) > at_most else ""
    return ", ".join(names[:at_most]) + more


def _without_masks(sample: Sample) -> Sample:
    """A detection sample with boxes only (its masks, annotated or pseudo, are not used for training)."""
    return replace(sample, masks=None, ignore_mask=None, segment_map=None,
                   has_mask=torch.zeros_like(sample.has_mask), mask_is_pseudo=torch.zeros_like(sample.mask_is_pseudo))


class JointTrainDataset(IterableDataset):
    """Endless ``{"seg": Batch, "det": Batch}`` (or only the streams configured) for one rank.

    Each iteration (epoch) draws from streams keyed by (seed, epoch, rank, worker, name). :meth:`start_at` places
    the first iteration at a resumed position: an epoch-boundary resume continues the exact order of an uninterrupted
    run; a mid-epoch resume draws the rest of that epoch from a stream keyed also by the batches already done, so it
    does not replay the batches trained before the interruption (the draws are i.i.d. shard picks, so a fresh key
    leaves the sampling distribution unchanged).
    """

    def __init__(self, streams: Mapping[str, TrainStream], rank: int, seed: int):
        super().__init__()
        self.streams, self.rank, self.seed = dict(streams), rank, seed
        self.epoch = -1  # advanced in each (persistent) worker copy at every new iteration
        self.batches_done = 0  # batches of the first epoch already trained before a mid-epoch resume

    def start_at(self, epoch: int, batches_done: int = 0) -> None:
        """Make the next iteration epoch ``epoch``, of which ``batches_done`` batches were trained already."""
        self.epoch, self.batches_done = epoch - 1, batches_done

    def __iter__(self) -> Iterator[dict[str, Batch]]:
        self.epoch += 1
        worker, _ = _worker()
        resumed = (self.batches_done,) if self.batches_done else ()
        self.batches_done = 0  # only the first epoch after a resume is partial
        iterators = {name: stream.batches((self.seed, self.epoch, self.rank, worker, name) + resumed)
                     for name, stream in self.streams.items()}
        while True:
            yield {name: next(iterator) for name, iterator in iterators.items()}


def split_for_slot(counts: Sequence[int], slot: int, num_slots: int) -> tuple[list[int], bool]:
    """Which shards a slot reads and whether it must subsample them by index (see module docstring)."""
    if len(counts) >= num_slots:
        return list(range(slot, len(counts), num_slots)), False
    return list(range(len(counts))), True


def slot_sample_count(counts: Sequence[int], slot: int, num_slots: int) -> int:
    shards, by_index = split_for_slot(counts, slot, num_slots)
    if not by_index:
        return sum(counts[i] for i in shards)
    total = sum(counts)
    return len(range(slot, total, num_slots))


class EvalDataset(IterableDataset):
    """One pass over a shard set for one rank, each sample in exactly one (rank, worker) slot."""

    def __init__(self, shards: ShardSet, batch_size: int, transform: Callable, rank: int, world_size: int,
                 pad_to: tuple[int, int] | None = None):
        super().__init__()
        self.shards, self.batch_size, self.transform = shards, batch_size, transform
        self.rank, self.world_size, self.pad_to = rank, world_size, pad_to

    def __iter__(self) -> Iterator[Batch]:
        worker, num_workers = _worker()
        num_slots, slot = self.world_size * num_workers, self.rank * num_workers + worker
        shard_ids, by_index = split_for_slot(self.shards.counts, slot, num_slots)
        raws = iter_raw_samples(self.shards.urls[i] for i in shard_ids)
        if by_index:
            raws = itertools.islice(raws, slot, None, num_slots)
        pending: list[Sample] = []
        for raw in raws:
            sample = decode_sample(raw, self.shards.vocabulary, dense_masks=False)
            if sample is None:
                continue
            pending.append(self.transform(sample))
            if len(pending) == self.batch_size:
                yield collate(pending, self.shards.vocabulary, self.shards.task, pad_to=self.pad_to,
                              keep_annotations=True)
                pending = []
        if pending:
            yield collate(pending, self.shards.vocabulary, self.shards.task, pad_to=self.pad_to, keep_annotations=True)

    def num_batches(self, num_workers: int) -> int:
        workers = max(num_workers, 1)
        num_slots = self.world_size * workers
        return sum(-(-slot_sample_count(self.shards.counts, self.rank * workers + w, num_slots) // self.batch_size)
                   for w in range(workers))


class SizedLoader:
    """A DataLoader over an endless or finite stream, cut at (or sized to) ``length`` batches per pass.

    Iterating is lazy: nothing starts (no worker process, no epoch advanced in a persistent worker's dataset copy)
    until the first batch is asked for, so an ``iter()`` that only checks iterability (Lightning does one before
    training) does not consume an epoch of the training stream.
    """

    def __init__(self, loader: DataLoader, length: int):
        self.loader, self.length = loader, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        return self._batches()

    def _batches(self):
        yield from itertools.islice(iter(self.loader), self.length)


class TrainLoader(SizedLoader):
    """The training loader: before its first pass it asks ``position()`` for (epoch, batches done in that epoch),
    the trainer's position after a checkpoint restore, and starts the stream there (persistent workers copy the
    dataset at that first pass and count epochs on from it)."""

    def __init__(self, loader: DataLoader, length: int, position: Callable[[], tuple[int, int]]):
        super().__init__(loader, length)
        self.position, self.started = position, False

    def _batches(self):
        if not self.started:
            self.loader.dataset.start_at(*self.position())
            self.started = True
        yield from super()._batches()


class OpenSeeDDataModule(LightningDataModule):
    """Joint segmentation + detection training streams and any number of validation sets.

    Args:
        seg: training segmentation source (path to a converted data set, per-rank batch size); sets the epoch.
        det: training detection source, or None for segmentation-only training.
        val: validation sources, each evaluated on its own vocabulary.
        image_size: LSJ crop size; training batches are padded to image_size x image_size.
        scale_range: LSJ random scale range.
        eval_short_edge, eval_max_size: evaluation resize (``EvalResize``). With ``eval_short_edge=None`` (longer
            side to ``eval_max_size``) evaluation batches are padded to ``eval_max_size`` squared, like the LSJ
            training batches, so that the model sees the same normalised coordinates in training and evaluation;
            otherwise to a multiple of 32.
        num_workers: DataLoader workers per rank (per loader).
        shuffle_buffer: samples held for shuffling per training stream and worker.
        seed: base seed; the data order depends on (seed, epoch, rank, worker).
        det_masks: train with the masks a detection data set carries (annotated, or pseudo masks from
            ``data_prep.pseudo_masks``: offline mask assistance); by default detection data gives boxes only.
        max_consecutive_skips: unreadable training samples in a row after which the run stops with an error naming
            the shards (None: 1000 or three times the largest shard, whichever is more; see ``TrainStream``).
        rank, world_size: override the distributed position (tests, tools); by default taken from the trainer.
    """

    def __init__(self, seg: DataSource | Mapping | None = None, det: DataSource | Mapping | None = None,
                 val: Sequence[DataSource | Mapping] = (), image_size: int = 1024,
                 scale_range: tuple[float, float] = (0.1, 2.0), eval_short_edge: int | None = None,
                 eval_max_size: int | None = 1024, num_workers: int = 2, shuffle_buffer: int = 256, seed: int = 0,
                 pin_memory: bool = False, det_masks: bool = False, max_consecutive_skips: int | None = None,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.seg = DataSource.of(seg) if seg is not None else None
        self.det = DataSource.of(det) if det is not None else None
        self.val_sources = [DataSource.of(v) for v in val]
        self.train_transform = LargeScaleJitter(image_size, tuple(scale_range))
        self.eval_transform = EvalResize(eval_short_edge, eval_max_size)
        self.eval_pad_to = (eval_max_size, eval_max_size) if eval_short_edge is None else None
        self.image_size, self.num_workers, self.shuffle_buffer = image_size, num_workers, shuffle_buffer
        self.seed, self.pin_memory, self.det_masks = seed, pin_memory, det_masks
        self.max_consecutive_skips = max_consecutive_skips
        self._rank, self._world_size = rank, world_size
        self.train_sets: dict[str, ShardSet] = {}
        self.val_sets: list[ShardSet] = []

    # -------------------------------------------------------------------------------------------------- set-up
    def _position(self) -> tuple[int, int]:
        """(rank, world size): the constructor's overrides, else the trainer's, else torch.distributed's."""
        trainer = getattr(self, "trainer", None)
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else _dist_info()
        return (rank if self._rank is None else self._rank,
                world_size if self._world_size is None else self._world_size)

    @property
    def rank(self) -> int:
        return self._position()[0]

    @property
    def world_size(self) -> int:
        return self._position()[1]

    def setup(self, stage: str | None = None) -> None:
        """Open every configured data set (manifest + vocabulary) and check it is of the right kind."""
        if self.seg is not None and "seg" not in self.train_sets:
            self.train_sets["seg"] = _open(self.seg.path, "seg", "training segmentation")
        if self.det is not None and "det" not in self.train_sets:
            self.train_sets["det"] = _open(self.det.path, "det", "training detection")
        if not self.val_sets:
            self.val_sets = [_open(v.path, None, "validation") for v in self.val_sources]

    @property
    def steps_per_epoch(self) -> int:
        """Training steps per epoch on every rank: one pass over the segmentation data across all ranks."""
        self.setup()
        if "seg" in self.train_sets:
            source, shards = self.seg, self.train_sets["seg"]
        elif "det" in self.train_sets:
            source, shards = self.det, self.train_sets["det"]
        else:
            raise ValueError("no training data configured (set data.seg and/or data.det)")
        return max(1, shards.num_samples // (source.batch_size * self.world_size))

    # -------------------------------------------------------------------------------------------------- loaders
    def _loader(self, dataset: IterableDataset, persistent: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                          persistent_workers=persistent and workers > 0,
                          prefetch_factor=2 if workers > 0 else None)

    def train_dataloader(self) -> SizedLoader:
        self.setup()
        sources = {"seg": self.seg, "det": self.det}
        pad = (self.image_size, self.image_size)
        streams = {name: TrainStream(shards, sources[name].batch_size, self.train_transform, pad, self.shuffle_buffer,
                                     keep_masks=name == "seg" or self.det_masks,
                                     max_consecutive_skips=self.max_consecutive_skips)
                   for name, shards in self.train_sets.items()}
        dataset = JointTrainDataset(streams, self.rank, self.seed)
        return TrainLoader(self._loader(dataset, persistent=True), self.steps_per_epoch, self._train_position)

    def _train_position(self) -> tuple[int, int]:
        """(epoch, batches already trained in it) from the attached trainer's batch count, which a checkpoint
        restores: Lightning's own epoch counter is not yet advanced past an end-of-epoch checkpoint when the loader
        starts, its batch count is."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        done = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        limit = trainer.limit_train_batches
        per_epoch = min(self.steps_per_epoch, limit) if isinstance(limit, int) else int(self.steps_per_epoch * limit)
        return divmod(done, max(per_epoch, 1))

    def val_dataloader(self) -> list[SizedLoader]:
        self.setup()
        loaders = []
        for source, shards in zip(self.val_sources, self.val_sets):
            dataset = EvalDataset(shards, source.batch_size, self.eval_transform, self.rank, self.world_size,
                                  pad_to=self.eval_pad_to)
            loaders.append(SizedLoader(self._loader(dataset, persistent=False), dataset.num_batches(self.num_workers)))
        return loaders


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _open(path: str, task: str | None, role: str) -> ShardSet:
    if not Path(path).exists():
        raise FileNotFoundError(f"{role} data not found at {path}; convert it with data_prep (see docs/data.md) "
                                "or point the config at the right folder")
    shards = ShardSet.open(path)
    if task is not None and shards.task != task:
        raise ValueError(f"{role} data at {path} is a {shards.task!r} data set, expected {task!r}")
    return shards
