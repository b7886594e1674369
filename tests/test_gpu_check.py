"""openseed.gpu_check's CPU half: the no-CUDA exit, the training-step and inference sections on a tiny model, the
report (JSON after every section, markdown tables), a failing section recorded while the others run, and the FSDP
section's overrides composing with the project's configs."""

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from data_prep import benchmark
from openseed import gpu_check
from openseed.config import CONF


def test_without_cuda_it_says_so_and_exits_0(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([f"out={tmp_path / 'out'}"]) == 0
    assert "no CUDA device here; nothing was run" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_sections_on_the_cpu_write_the_report(tmp_path, monkeypatch):
    def broken(out):
        raise RuntimeError("no GPU for FSDP here")

    monkeypatch.setattr(gpu_check, "fsdp", broken)
    report = gpu_check.run(tmp_path, ["train_step", "fsdp", "inference"], device="cpu", size=64, height=48,
                           width=80, model="tiny", batches=((1, 1),), repeats=1, dtype="fp32", warmup=0)
    sections = report["sections"]
    assert [sections[k]["status"] for k in ("train_step", "fsdp", "inference")] == ["ok", "failed", "ok"]
    assert sections["fsdp"]["error"] == "RuntimeError: no GPU for FSDP here"
    step = sections["train_step"]["figures"]
    assert step["model"] == "tiny" and 1 < step["parameters_M"] < 20
    tried = step["tried"][0]
    assert (tried["seg"], tried["det"], tried["fits"]) == (1, 1, True) and tried["step_s"] > 0
    assert tried["images_per_s"] == pytest.approx(2 / tried["step_s"]) and tried["peak_gib"] is None  # CPU
    assert sections["inference"]["figures"]["padded"] == [64, 96]  # to multiples of 32, as the predictor pads
    rows = sections["inference"]["figures"]["rows"]
    assert [r["dtype"] for r in rows] == ["fp32", "bf16"] and all(r["latency_ms"] > 0 for r in rows)
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert written["sections"]["fsdp"]["status"] == "failed" and written["environment"]["torch"] == torch.__version__
    text = (tmp_path / "gpu_check.md").read_text()
    assert "| 1 + 1 | yes |" in text and "| fp32 |" in text and "failed: RuntimeError: no GPU for FSDP here" in text
    # the data benchmark reads the images/s to feed from this report
    consumed, source = benchmark.gpu_images_per_second(tmp_path / "gpu_check.json")
    assert consumed == tried["images_per_s"] and "1 + 1 images per step" in source


def test_synthetic_batches_are_valid_training_batches():
    vocabulary = gpu_check._vocabulary(things=5, stuff=3)
    seg = gpu_check.synthetic_batch("seg", 2, 64, vocabulary, "cpu", objects=8)
    det = gpu_check.synthetic_batch("det", 3, 64, vocabulary, "cpu", objects=8)
    assert seg.images.shape == (2, 3, 64, 64) and len(det) == 3
    for target in seg.targets:
        assert target.masks.shape == (8, 64, 64) and target.has_mask.all()
        assert (~target.is_thing).sum() == 2 and (target.labels[~target.is_thing] >= 5).all()
        for box, mask in zip(target.boxes, target.masks):  # each mask fills its box
            x0, y0, x1, y1 = box.long().tolist()
            assert mask.sum() == (x1 - x0) * (y1 - y0) > 0
    assert all(t.masks is None and t.is_thing.all() and (t.labels < 5).all() for t in det.targets)
    few = gpu_check.synthetic_batch("seg", 1, 64, vocabulary, "cpu", objects=3)  # too few for a stuff band
    assert few.targets[0].is_thing.all() and (few.targets[0].labels < 5).all()


def test_fsdp_overrides_compose_with_the_configs(tmp_path):
    overrides = [o for o in gpu_check.fsdp_overrides(tmp_path, 5) if not o.startswith("hydra.")]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.trainer.strategy._target_ == "openseed.training.distributed.fsdp_strategy"
    assert (cfg.trainer.devices, cfg.trainer.max_steps, cfg.trainer.limit_val_batches) == (1, 5, 0)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.prediction_overlays is False
