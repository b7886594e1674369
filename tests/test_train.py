"""The Hydra training entry point: configs compose, and a fast_dev_run trains and validates on synthshapes."""

import json
import struct
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning import Callback
from omegaconf import open_dict

from openseed.config import CONF
from openseed.train import train
from tests._wandb_log import config_values, history_values, wait_for_records

TRAINERS = sorted(p.stem for p in (Path(CONF) / "trainer").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (Path(CONF) / "logger").glob("*.yaml"))


def _compose(overrides, tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("logger", LOGGERS)
def test_every_trainer_and_logger_composes(trainer, logger, tmp_path):
    cfg = _compose([f"trainer={trainer}", f"logger={logger}", "experiment=synthshapes_joint"], tmp_path)
    assert cfg.trainer._target_ == "lightning.Trainer" and cfg.model.size == "small"
    assert "decoupled" not in cfg.criterion and cfg.criterion.class_weight == 4.0


def test_unknown_key_stops_before_work(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        _compose(["model.hidden_dimm=3"], tmp_path)


def test_fast_dev_run_on_synthshapes(synth_shards, tmp_path, capsys):
    cfg = _compose(["model=tiny", "debug=fast", "prepare_synthshapes=false", "criterion.num_points=256",
                    f"data.seg.path={synth_shards['seg_train']}", f"data.det.path={synth_shards['det_train']}",
                    f"data.val.0.path={synth_shards['seg_val']}", f"data.val.1.path={synth_shards['det_val']}",
                    "data.seg.batch_size=2", "data.det.batch_size=2", "data.val.0.batch_size=2",
                    "data.val.1.batch_size=2"], tmp_path)
    results = train(cfg)
    assert set(results) == {"synthshapes_seg_val", "synthshapes_det_val"}
    assert {"PQ", "mIoU", "mask_AP", "box_AP"} <= set(results["synthshapes_seg_val"])
    assert "| synthshapes_seg_val |" in capsys.readouterr().out


def test_the_crowded_experiment_reads_the_variant_it_prepares(tmp_path):
    cfg = _compose(["experiment=synthshapes_crowded"], tmp_path)
    assert cfg.synthshapes_variant == "crowded" and cfg.model.size == "small" and cfg.module.optimizer.lr == 5e-4
    assert all("/synthshapes_crowded/shards/" in p for p in (cfg.data.seg.path, cfg.data.det.path,
                                                            cfg.data.val[0].path, cfg.data.val[1].path))


@pytest.mark.parametrize("overrides, message", [
    (["data=synthshapes_crowded"], "reads synthshapes_crowded, but synthshapes_variant=standard prepares synthshapes"),
    (["synthshapes_variant=crowded"], "reads synthshapes, but synthshapes_variant=crowded prepares synthshapes_"),
    (["synthshapes_variant=busy"], "unknown synthshapes variant 'busy'"),
])
def test_a_synthshapes_variant_other_than_the_data_configs_is_an_error(overrides, message, tmp_path):
    cfg = _compose([*overrides, f"paths.data_dir={tmp_path}/data"], tmp_path)
    with pytest.raises(ValueError, match=message):
        train(cfg)
    assert not (tmp_path / "data").exists()  # nothing generated


def test_missing_data_is_a_clear_error(tmp_path):
    cfg = _compose(["model=tiny", "debug=fast", "prepare_synthshapes=false", f"paths.data_dir={tmp_path}/none"],
                   tmp_path)
    with pytest.raises(FileNotFoundError, match="training segmentation data not found"):
        train(cfg)


def _short_run_overrides(synth_shards, logger="csv"):
    return ["model=tiny", "prepare_synthshapes=false", "criterion.num_points=256", "+trainer.max_steps=1",
            "trainer.log_every_n_steps=1", "trainer.check_val_every_n_epoch=1", f"logger={logger}",
            "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "data.num_workers=0",
            f"data.seg.path={synth_shards['seg_train']}", f"data.det.path={synth_shards['det_train']}",
            f"data.val.0.path={synth_shards['seg_val']}", f"data.val.1.path={synth_shards['det_val']}",
            "data.seg.batch_size=2", "data.det.batch_size=2", "data.val.0.batch_size=2", "data.val.1.batch_size=2"]


def test_wandb_offline_run_holds_metrics_and_overlay_images(synth_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no console capture inside pytest's own
    train(_compose(_short_run_overrides(synth_shards, logger="wandb"), tmp_path))
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    records = wait_for_records(next(run.glob("*.wandb")))
    history = history_values(records)
    assert 0.0 < float(history["train/loss"][0]) < 1e4
    for key in ("val/synthshapes_seg_val/PQ", "val/synthshapes_det_val/box_AP", "final/synthshapes_det_val/box_AP"):
        (value,) = history[key]
        assert 0.0 <= float(value) <= 100.0, (key, value)
    # the validation overlays: panoptic masks for the segmentation set, boxes and masks for the detection set
    assert list((run / "files" / "media" / "images").rglob("*.png"))
    assert "val/synthshapes_seg_val/overlays/all_masks" in history
    assert {"val/synthshapes_det_val/overlays/all_boxes", "val/synthshapes_det_val/overlays/all_masks"} <= set(history)
    # the resolved config
    config = config_values(records)
    assert {"prepare_synthshapes", "criterion", "trainer", "data"} <= set(config)
    criteria = [json.loads(value) for value in config["criterion"]]
    assert criteria and all(c["num_points"] == 256 for c in criteria)


def test_wandb_log_reader_joins_chunks_across_blocks_and_stops_at_a_torn_tail(tmp_path):
    from wandb.proto import wandb_internal_pb2

    from tests._wandb_log import BLOCK, read_records

    def chunk(kind, payload):
        return struct.pack("<IHB", 0, len(payload), kind) + payload

    def history_record(key, size):
        record = wandb_internal_pb2.Record()
        item = record.history.item.add()
        item.key, item.value_json = key, json.dumps("x" * size)
        return record.SerializeToString()

    small, big = history_record("a/b", 10), history_record("val/long_key/PQ", 40000)  # big spans two blocks
    log = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0) + chunk(1, small))
    first = BLOCK - len(log) - 7
    log += chunk(2, big[:first])
    log += chunk(4, big[first:])
    assert b"val/long_key/PQ" in big and len(log) > BLOCK
    path = tmp_path / "run.wandb"
    path.write_bytes(bytes(log))
    records = read_records(path)
    assert [r.history.item[0].key for r in records] == ["a/b", "val/long_key/PQ"]
    assert json.loads(records[1].history.item[0].value_json) == "x" * 40000
    path.write_bytes(bytes(log[:-100]))  # the writer has not finished the last chunk yet
    assert [r.history.item[0].key for r in read_records(path)] == ["a/b"]


def test_wandb_run_is_finished_when_training_crashes(synth_shards, tmp_path, monkeypatch):
    import wandb

    from openseed.training.module import OpenSeeDModule

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no console capture inside pytest's own

    def crash(self, batch, batch_idx):
        raise RuntimeError("boom")

    monkeypatch.setattr(OpenSeeDModule, "training_step", crash)
    with pytest.raises(RuntimeError, match="boom"):
        train(_compose(_short_run_overrides(synth_shards, logger="wandb"), tmp_path))
    assert wandb.run is None


def test_csv_run_writes_overlay_pictures(synth_shards, tmp_path):
    train(_compose(_short_run_overrides(synth_shards), tmp_path))
    assert list(tmp_path.rglob("overlays/synthshapes_seg_val_step*.png"))
    assert list(tmp_path.rglob("overlays/synthshapes_det_val_step*.png"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    # the checkpoint records the evaluation resize its validation used: later tools evaluate it at 160 px too
    from openseed.modeling.openseed import read_model_config

    recorded = read_model_config(tmp_path / "checkpoints" / "last.ckpt")
    assert (recorded.eval_short_edge, recorded.eval_max_size) == (None, 160)
    # the end-of-run prediction overlays: one per validation set, at the validation image's own size
    from PIL import Image

    for name, task in (("synthshapes_seg_val", "panoptic"), ("synthshapes_det_val", "instance")):
        with Image.open(tmp_path / f"prediction_{name}_{task}.png") as picture:
            assert picture.size == (160, 160)
        assert (tmp_path / f"prediction_{name}_{task}.json").is_file()
    # throughput: 2 seg + 2 det images in the one step
    import csv

    (metrics_file,) = tmp_path.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics_file.open()) if r.get("train/images_per_sec")]
    assert len(rows) == 1
    row = {k: float(v) for k, v in rows[0].items() if k.startswith("train/") and v}
    assert row["train/images_per_sec"] > 0
    assert row["train/seg/images_per_sec"] * row["train/sec_per_step"] == pytest.approx(2.0)
    assert row["train/images_per_sec"] == pytest.approx(2 * row["train/det/images_per_sec"])


class LastCheckpointProbe(Callback):
    """Records, at the start of every epoch, the step stored in checkpoints/last.ckpt (None: no file yet)."""

    seen: list = []

    def on_train_epoch_start(self, trainer, module):
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        LastCheckpointProbe.seen.append(torch.load(path, weights_only=True)["global_step"] if path.is_file() else None)


def test_last_checkpoint_is_written_after_every_epoch(synth_shards, tmp_path):
    overrides = [o for o in _short_run_overrides(synth_shards) if not o.startswith("+trainer.max_steps")]
    overrides += ["+trainer.max_steps=3", "trainer.max_epochs=3", "++prediction_overlays=false",
                  "+callbacks.probe._target_=tests.test_train.LastCheckpointProbe"]
    LastCheckpointProbe.seen = []
    train(_compose(overrides, tmp_path))
    assert LastCheckpointProbe.seen == [None, 1, 2]  # resumable from every epoch end, not only the run's end
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def test_a_run_is_bit_reproducible_on_one_machine_and_the_seed_moves_it(synth_shards, tmp_path):
    """Two epochs with validation between them and loader workers: the same seed gives bit-identical weights and
    metrics (same machine, thread count and data.num_workers; docs/training.md, "Reproducibility"); another seed
    changes the initialisation and the data order (data.seed follows seed)."""
    def run(seed, folder):
        overrides = [o for o in _short_run_overrides(synth_shards) if not o.startswith(("+trainer.max_steps",
                                                                                         "+trainer.limit_train",
                                                                                         "data.num_workers"))]
        cfg = _compose(overrides + [f"seed={seed}", "+trainer.limit_train_batches=2", "trainer.max_epochs=2",
                                    "data.num_workers=2"], tmp_path / folder)
        assert cfg.data.seed == seed
        metrics = train(cfg)
        state = torch.load(tmp_path / folder / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
        assert state["global_step"] == 4
        return metrics, state["state_dict"]

    first_metrics, first = run(1, "a")
    again_metrics, again = run(1, "b")
    other_metrics, other = run(2, "c")
    assert again_metrics == first_metrics
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
