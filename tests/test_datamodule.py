"""DDP safety of the streams: equal training steps on every rank, validation split disjointly and completely."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from openseed.core.batch import Batch
from openseed.data.datamodule import OpenSeeDDataModule, split_for_slot
from tests.conftest import clone_shard_set

UNEVEN = [1, 23, 2, 9]  # shards of very different sizes (35 samples)


@pytest.fixture(scope="module")
def uneven_seg(panoptic_shards, tmp_path_factory):
    return clone_shard_set(panoptic_shards, tmp_path_factory.mktemp("uneven_seg"), UNEVEN)


@pytest.fixture(scope="module")
def uneven_det(labelme_shards, tmp_path_factory):
    return clone_shard_set(labelme_shards, tmp_path_factory.mktemp("uneven_det"), [40, 3])


def _module(seg, det, rank, world_size, workers, val=(), **kw):
    return OpenSeeDDataModule(seg={"path": str(seg), "batch_size": 2}, det={"path": str(det), "batch_size": 3},
                              val=val, image_size=64, num_workers=workers, shuffle_buffer=8, rank=rank,
                              world_size=world_size, **kw)


def test_two_ranks_two_workers_get_the_same_number_of_steps(uneven_seg, uneven_det):
    steps, seen = [], []
    for rank in (0, 1):
        module = _module(uneven_seg, uneven_det, rank, 2, workers=2)
        assert module.steps_per_epoch == 35 // (2 * 2)  # set by the segmentation data alone
        loader = module.train_dataloader()
        for _ in range(2):  # two epochs
            batches = list(loader)
            steps.append(len(batches))
            for batch in batches:
                assert set(batch) == {"seg", "det"}
                assert isinstance(batch["seg"], Batch) and batch["seg"].task == "seg" and len(batch["seg"]) == 2
                assert batch["det"].task == "det" and len(batch["det"]) == 3
                assert batch["seg"].images.shape == (2, 3, 64, 64)
            seen.append([t.image_id for b in batches for t in b["seg"].targets])
    assert steps == [8, 8, 8, 8]
    assert seen[0] != seen[2]  # ranks draw different data
    assert seen[0] != seen[1]  # and a new order every epoch


def test_training_order_is_reproducible_for_a_seed(uneven_seg, uneven_det):
    def ids(seed):
        loader = _module(uneven_seg, uneven_det, 0, 1, workers=0, seed=seed).train_dataloader()
        return [t.image_id for b in loader for t in b["seg"].targets]

    assert ids(7) == ids(7) and ids(7) != ids(8)


def test_training_samples_are_drawn_in_proportion_to_shard_sizes(uneven_seg, uneven_det):
    """Shards are resampled uniformly and read whole: every image is (about) equally likely."""
    module = _module(uneven_seg, uneven_det, 0, 1, workers=0)
    module.shuffle_buffer = 1
    stream = module.train_dataloader().loader.dataset.streams["seg"]
    ids = [t.image_id for _, batch in zip(range(150), stream.batches((0,))) for t in batch.targets]
    counts = torch.bincount(torch.tensor(ids), minlength=36)[1:].float()
    first_shard, big_shard = counts[0], counts[1:24].mean()  # 1-sample shard vs the 23-sample shard
    assert 0.4 < first_shard / big_shard < 2.5
    assert (counts > 0).sum() >= 33


@pytest.mark.parametrize("sizes", [UNEVEN, [3, 5, 1, 7, 2, 4, 6, 8, 1], [35]])
@pytest.mark.parametrize("workers", [0, 2])
def test_validation_is_split_disjointly_and_completely(panoptic_shards, tmp_path, sizes, workers):
    val = clone_shard_set(panoptic_shards, tmp_path / "val", sizes)
    total = sum(sizes)
    per_rank = []
    for rank in (0, 1):
        module = OpenSeeDDataModule(val=[{"path": str(val), "batch_size": 3}], eval_max_size=64,
                                    num_workers=workers, rank=rank, world_size=2)
        (loader,) = module.val_dataloader()
        batches = list(loader)
        assert len(batches) == len(loader)  # the announced length is exact
        assert all(b.images.shape[-2:] == (64, 64) for b in batches)  # padded like LSJ training batches
        for b in batches:  # the stored ground truth travels along for the evaluators
            assert [a["json"]["image_id"] for a in b.annotations] == [t.image_id for t in b.targets]
            assert all(a["panoptic_png"][:4] == b"\x89PNG" for a in b.annotations)
        per_rank.append([t.image_id for b in batches for t in b.targets])
    first, second = per_rank
    assert not set(first) & set(second)
    assert sorted(first + second) == list(range(1, total + 1))
    assert len(first) + len(second) == total  # each sample exactly once


def test_split_modes():
    assert split_for_slot([5, 5, 5, 5], 1, 4) == ([1], False)
    assert split_for_slot([5, 5, 5, 5, 5], 0, 2) == ([0, 2, 4], False)
    assert split_for_slot([5, 5], 3, 4) == ([0, 1], True)


def test_wrong_kind_of_data_is_refused(uneven_seg, uneven_det):
    module = OpenSeeDDataModule(seg={"path": str(uneven_det), "batch_size": 2})
    with pytest.raises(ValueError, match="'det' data set, expected 'seg'"):
        module.setup()
    with pytest.raises(FileNotFoundError, match="training detection data not found"):
        OpenSeeDDataModule(seg={"path": str(uneven_seg), "batch_size": 1}, det={"path": "/nonexistent",
                                                                                 "batch_size": 1}).setup()
    with pytest.raises(ValueError, match="unknown data source key"):
        OpenSeeDDataModule(seg={"path": str(uneven_seg), "batch_size": 1, "batchsize": 3})


def test_corrupt_sample_inside_training_stream_is_skipped(panoptic_shards, uneven_det, tmp_path):
    def corrupt(index, sample):
        if index % 2 == 0:
            sample["jpg"] = b"\xff\xd8\xff" + b"\x00" * 50

    broken = clone_shard_set(panoptic_shards, tmp_path / "broken", [4, 4], mutate=corrupt)
    module = OpenSeeDDataModule(seg={"path": str(broken), "batch_size": 2}, det={"path": str(uneven_det),
                                "batch_size": 1}, image_size=64, num_workers=0, shuffle_buffer=2)
    batches = list(module.train_dataloader())
    assert len(batches) == 4
    ids = {t.image_id for b in batches for t in b["seg"].targets}
    assert ids and all(i % 2 == 0 for i in ids)  # only the intact (odd index -> even id) samples come through


def _ddp_worker(rank, world_size, port, seg, det, val, out):
    import json

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    try:
        module = OpenSeeDDataModule(seg={"path": seg, "batch_size": 2}, det={"path": det, "batch_size": 3},
                                    val=[{"path": val, "batch_size": 2}], image_size=64, eval_max_size=64,
                                    num_workers=2, shuffle_buffer=4)  # rank and world size from torch.distributed
        steps = sum(1 for _ in module.train_dataloader())
        val_ids = [t.image_id for b in module.val_dataloader()[0] for t in b.targets]
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, {"steps": steps, "val": val_ids})
        if rank == 0:
            with open(out, "w") as handle:
                json.dump(gathered, handle)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two spawned processes with two loader workers each: about a minute on 2 cores
def test_real_ddp_processes_with_gloo(uneven_seg, uneven_det, panoptic_shards, tmp_path):
    """Two real processes (gloo), two loader workers each: same step count, validation split exactly once. The fast
    suite checks the same split with simulated ranks."""
    import json
    import socket

    val = clone_shard_set(panoptic_shards, tmp_path / "val", [2, 9, 1])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "result.json"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(uneven_seg), str(uneven_det), str(val), str(out)),
                                nprocs=2, join=True)
    ranks = json.loads(out.read_text())
    assert [r["steps"] for r in ranks] == [8, 8]
    assert not set(ranks[0]["val"]) & set(ranks[1]["val"])
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == list(range(1, 13))


class _OrderRecorder(L.LightningModule):
    """Trains nothing; records the segmentation image ids of every training batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(tuple(t.image_id for t in batch["seg"].targets))
        return (self.weight - 1.0) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD([self.weight], lr=0.1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_training_continues_the_data_order(uneven_seg, uneven_det, tmp_path, workers):
    """Epoch-boundary resume = the uninterrupted order; mid-epoch resume does not replay the trained batches."""

    def fit(ckpt_path=None, save_as=None, save_at_step=None, **limits):
        module = _OrderRecorder()
        callbacks = [ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=save_at_step,
                                     save_top_k=-1)] if save_at_step else []
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=bool(callbacks), callbacks=callbacks, default_root_dir=tmp_path,
                            **limits)
        trainer.fit(module, datamodule=_module(uneven_seg, uneven_det, 0, 1, workers=workers), ckpt_path=ckpt_path)
        if save_as:
            trainer.save_checkpoint(tmp_path / save_as)
        return module.seen, trainer

    steps = 35 // 2
    full, _ = fit(max_epochs=3)
    assert len(full) == 3 * steps and full[:steps] != full[steps:2 * steps]

    first, _ = fit(max_epochs=1, save_as="epoch1.ckpt")
    assert first == full[:steps]
    rest, trainer = fit(ckpt_path=tmp_path / "epoch1.ckpt", max_epochs=3)
    assert rest == full[steps:] and trainer.global_step == 3 * steps

    # a step checkpoint 5 batches into the second epoch (as a preempted job leaves it)
    fit(max_steps=steps + 5, save_at_step=steps + 5)
    tail, trainer = fit(ckpt_path=tmp_path / "mid.ckpt", max_epochs=3)
    assert trainer.global_step == 3 * steps and len(tail) == 2 * steps - 5
    second_epoch = full[steps:2 * steps]
    assert tail[:steps - 5] != second_epoch[:steps - 5]  # not the second epoch replayed from its start
    assert tail[steps - 5:] == full[2 * steps:]  # the third epoch is the uninterrupted run's
