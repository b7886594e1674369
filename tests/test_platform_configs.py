"""The training platform: FSDP, SLURM launcher and TensorBoard configs, the experiment presets, resuming a requeued
job from its fixed folder, and ``openseed.evaluate``."""

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import OmegaConf, open_dict

from openseed.config import CONF
from openseed.train import train

TRAINERS = ["cpu", "gpu", "ddp", "fsdp"]
EXPERIMENTS = sorted(p.stem for p in (Path(CONF) / "experiment").glob("*.yaml"))
PAPER = {"swint_joint": ("swint_decouple", "objects365v1_train"),
         "swinl_joint": ("swinl_decouple", "objects365v2_train")}


def _compose(overrides, output_dir, config_name="train"):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


def _resolved(cfg) -> dict:
    """Every key but Hydra's own, resolved (as train() logs them): fails on a missing key or a bad interpolation."""
    return {key: OmegaConf.to_container(value, resolve=True, throw_on_missing=True) if OmegaConf.is_config(value)
            else value for key, value in cfg.items() if key != "hydra"}


def _synth_overrides(shards, steps=1, val_batches=0, detection=True, logger="csv"):
    """A tiny model on the synthshapes fixture shards for a few steps (validation on ``val_batches`` batches)."""
    overrides = ["model=tiny", "prepare_synthshapes=false", "criterion.num_points=256", f"+trainer.max_steps={steps}",
                 "trainer.log_every_n_steps=1", f"+trainer.limit_val_batches={val_batches}",
                 "++trainer.num_sanity_val_steps=0", "+trainer.enable_progress_bar=false",
                 "++prediction_overlays=false", "data.num_workers=0", "data.pin_memory=false", "data.shuffle_buffer=4",
                 "data.image_size=160", "data.eval_max_size=160", "trainer.check_val_every_n_epoch=1",
                 f"logger={logger}",
                 f"data.seg.path={shards['seg_train']}", "data.seg.batch_size=2",
                 f"data.val.0.path={shards['seg_val']}", "data.val.0.batch_size=2"]
    if val_batches:  # validation runs at the end of an epoch: end it after the last step
        overrides.append(f"+trainer.limit_train_batches={steps}")
    if detection:
        overrides += [f"data.det.path={shards['det_train']}", "data.det.batch_size=2",
                      f"data.val.1.path={shards['det_val']}", "data.val.1.batch_size=2"]
    return overrides


# ------------------------------------------------------------------------------------------------ experiment presets
@pytest.mark.parametrize("trainer", TRAINERS)
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_with_every_trainer(experiment, trainer, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEED_DATA", str(tmp_path / "data"))
    cfg = _compose([f"experiment={experiment}", f"trainer={trainer}"], tmp_path)
    values = _resolved(cfg)
    assert values["trainer"]["_target_"] == "lightning.Trainer"
    assert values["data"]["seg"]["path"].startswith(str(tmp_path / "data"))
    if trainer == "fsdp":
        assert values["trainer"]["strategy"]["_target_"] == "openseed.training.distributed.fsdp_strategy"
    datamodule = instantiate(cfg.data)  # every data key is a real argument
    assert (datamodule.det is None) == (experiment == "swint_coco")


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_paper_presets_follow_the_spec(experiment, tmp_path):
    from openseed.modeling.openseed import MODEL_SIZES

    size, detection = PAPER[experiment]
    cfg = _resolved(_compose([f"experiment={experiment}"], tmp_path))
    data, module, trainer = cfg["data"], cfg["module"], cfg["trainer"]
    assert cfg["name"] == experiment and cfg["model"]["size"] == size and cfg["model"]["backbone_pretrained"] is True
    assert data["det"]["path"].endswith(f"shards/{detection}")
    assert data["seg"]["path"].endswith("shards/coco_panoptic_train2017")
    assert [v["path"].rsplit("/", 1)[-1] for v in data["val"]] == ["coco_panoptic_val2017"]
    assert data["image_size"] == 1024 and data["scale_range"] == [0.1, 2.0] and data["eval_max_size"] == 1024
    assert 8 * data["seg"]["batch_size"] == 32 and 8 * data["det"]["batch_size"] == 64  # per step on 8 GPUs
    optimizer, scheduler = module["optimizer"], module["scheduler"]
    assert optimizer["_target_"] == "torch.optim.AdamW" and optimizer["_partial_"] is True
    assert optimizer["lr"] == 1e-4 and optimizer["weight_decay"] == 0.05 and module["backbone_lr_multiplier"] == 0.1
    assert scheduler["milestones"] == [0.9, 0.95] and scheduler["gamma"] == 0.1 and scheduler["warmup_steps"] == 0
    assert MODEL_SIZES[size].text_lr_multiplier == 0.1
    assert trainer["max_epochs"] == 30 and trainer["precision"] == "bf16-mixed" and trainer["strategy"] == "ddp"
    assert set(cfg["logger"]) == {"wandb"} and cfg["prepare_synthshapes"] is False


def test_segmentation_only_preset_trains_without_detection_data(synth_shards, tmp_path):
    cfg = _compose(["experiment=swint_coco", "trainer=cpu", "logger=csv", "model.backbone_pretrained=false"]
                   + _synth_overrides(synth_shards, detection=False), tmp_path)
    assert cfg.data.det is None and cfg.model.size == "tiny"
    train(cfg)
    (metrics,) = tmp_path.rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert "train/seg/loss" in header and not any(c.startswith("train/det/") for c in header)


# ------------------------------------------------------------------------------------------------ fine-tuning
def test_finetuning_starts_from_a_converted_reference_model(synth_shards, tmp_path):
    """model=converted model.init_from=FILE: the converted small reference model (its own config) with the file's
    weights, trained for two steps with a fresh optimizer and schedule."""
    from openseed.convert_checkpoint import convert
    from openseed.modeling.checkpoint import read_checkpoint
    from tests._reference import reference_path

    converted = tmp_path / "converted.pt"
    convert(reference_path("swint_decouple", "weights.pt"), converted,
            config_file=reference_path("swint_decouple", "config.yaml"), log=lambda message: None)
    overrides = [o for o in _synth_overrides(synth_shards, steps=2) if o != "model=tiny"]
    cfg = _compose(overrides + ["model=converted", f"model.init_from={converted}", "trainer=cpu", "logger=csv"],
                   tmp_path)
    _, initial = read_checkpoint(converted)
    model = instantiate(cfg.model)
    assert model.config.text_tower == "clip_transformer" and model.config.level_order == "coarse_first"
    assert all(torch.equal(value, initial[key]) for key, value in model.state_dict().items())
    train(cfg)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2  # the schedule and the step start afresh
    trained = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    assert set(trained) == set(initial)
    changed = [key for key, value in initial.items() if not torch.equal(trained[key], value)]
    assert "decoder.class_head.project.weight" in changed and "text_encoder.tower.ln_final.weight" in changed


# ------------------------------------------------------------------------------------------------ FSDP
EXPECTED_UNITS = {  # model size -> FSDP units per block class: backbone blocks (tiny: Swin 1-1-2-1, small: ResNet
    # basic blocks 1-1-1-1), pixel-decoder encoder layers, decoder layers, text tower layers (tiny BERT, MiniLM)
    "tiny": {"_PadThenShiftSwinBlock": 5, "DeformableEncoderLayer": 1, "DecoderLayer": 2, "BertLayer": 2},
    "small": {"BasicBlock": 4, "DeformableEncoderLayer": 2, "DecoderLayer": 4, "BertLayer": 6},
}


@pytest.mark.parametrize("size", sorted(EXPECTED_UNITS))
def test_fsdp_config_wraps_the_model_blocks(size, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = _compose(["trainer=fsdp", f"model={size}", "trainer.strategy.activation_checkpointing=true"], tmp_path)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.use_distributed_sampler is False
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy) and strategy.kwargs["use_orig_params"] is True
    policy = strategy.kwargs["auto_wrap_policy"]
    model = instantiate(cfg.model)
    units = Counter(type(m).__name__ for m in model.modules() if policy(m, recurse=False))
    assert units == EXPECTED_UNITS[size]
    checkpointed = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert Counter(type(m).__name__ for m in model.modules() if checkpointed(m, recurse=False)) == units


def test_fsdp_factory_names_unknown_classes_and_clips_by_norm():
    import lightning as L
    from lightning.pytorch.plugins.precision import FSDPPrecision

    from openseed.training.distributed import fsdp_strategy

    with pytest.raises(ValueError, match="NoSuchLayer"):
        fsdp_strategy(wrap=["openseed.modeling.decoder.NoSuchLayer"])
    with pytest.raises(ValueError, match="'Decoderlayer'.*DecoderLayer"):
        fsdp_strategy(wrap=["Decoderlayer"])
    with pytest.raises(ValueError, match="not an nn.Module"):
        fsdp_strategy(wrap=["openseed.modeling.openseed.OpenSeeDConfig"])
    strategy = fsdp_strategy(wrap=["DecoderLayer", "SwinTransformerBlock"], sharding_strategy="SHARD_GRAD_OP")
    assert {c.__name__ for c in strategy.kwargs["auto_wrap_policy"]._module_classes} == {
        "DecoderLayer", "SwinTransformerBlock"}

    class Root(torch.nn.Module):  # stands for the root FSDP module, whose clip_grad_norm_ spans all shards
        clipped = []

        def clip_grad_norm_(self, max_norm):
            self.clipped.append(max_norm)

    with pytest.raises(ValueError, match="FSDP needs GPUs"):
        L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False).strategy.setup_environment()
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    strategy.enable_norm_clipping()
    strategy.model = Root()
    strategy.precision_plugin.clip_grad_by_norm(None, 0.1)  # Lightning's own plugin raises here
    assert Root.clipped == [0.1] and strategy.precision_plugin.precision == "bf16-mixed"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_fit_of_the_tiny_model(synth_shards, tmp_path):
    from openseed.modeling.openseed import load_model

    train(_compose(_synth_overrides(synth_shards, steps=2, val_batches=1) + ["trainer=fsdp", "trainer.devices=1"],
                   tmp_path))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert load_model(last).decoder.num_fg == 10  # a full state dict: loads as a model


# ------------------------------------------------------------------------------------------------ SLURM launcher
def test_slurm_launcher_composes_with_a_fixed_run_folder(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    monkeypatch.setenv("OPENSEED_SLURM_PARTITION", "gpu-long")
    cfg = _compose(["launcher=slurm", "experiment=swint_joint"], tmp_path)
    hydra_cfg = cfg.hydra
    assert hydra_cfg.mode.name == "MULTIRUN" and hydra_cfg.runtime.choices["hydra/launcher"] == "submitit_slurm"
    assert hydra_cfg.sweep.dir == "outputs/swint_joint" and hydra_cfg.sweep.subdir == "seed0"
    launcher = OmegaConf.to_container(hydra_cfg.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher") and launcher["partition"] == "gpu-long"
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (1, 8, 8)
    assert launcher["name"] == "swint_joint" and launcher["submitit_folder"] == "outputs/swint_joint/.submitit/%j"
    assert launcher["max_num_timeout"] > 0 and launcher["signal_delay_s"] >= 60 and launcher["account"] is None
    assert cfg.ckpt_path == "last" and cfg.trainer.num_nodes == 1 and cfg.trainer.strategy == "ddp"
    (environment,) = [instantiate(p) for p in cfg.trainer.plugins]
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is True
    assert cfg.callbacks.checkpoint_on_signal.signal == "USR2"

    cfg = _compose(["launcher=slurm", "name=ablation", "seed=3", "hydra.launcher.nodes=2"], tmp_path)
    assert (cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir, cfg.trainer.num_nodes) == ("outputs/ablation", "seed3", 2)


class StartStep(Callback):
    """Test callback: records the step each fit starts from; at the end of step 1 sends the job-end signal."""

    starts: list[int] = []

    def on_train_start(self, trainer, module):
        self.starts.append(trainer.global_step)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR2)


@pytest.fixture(scope="module")
def requeued_run(synth_shards, tmp_path_factory):
    """A SLURM-style run in a fixed folder: stopped by the job-end signal after step 2 (the stand-in for submitit's
    handler records the saved step and exits, as submitit's does), then started again with the same config."""
    run_dir = tmp_path_factory.mktemp("outputs") / "synth" / "seed0"
    saved_steps = []

    def submitit_handler(signum, frame):
        saved_steps.append(torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"])
        raise SystemExit(-1)

    StartStep.starts.clear()
    overrides = ["launcher=slurm", "trainer=cpu", "+callbacks.probe._target_=tests.test_platform_configs.StartStep"]
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            train(_compose(overrides + _synth_overrides(synth_shards, steps=3), run_dir))
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler  # handed back after the save
        train(_compose(overrides + _synth_overrides(synth_shards, steps=3), run_dir))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    return {"dir": run_dir, "starts": list(StartStep.starts), "saved": saved_steps}


def test_requeued_job_resumes_from_last_checkpoint(requeued_run):
    assert requeued_run["saved"] == [2]  # the signal came during step 1: last.ckpt saved at the end of step 2
    assert requeued_run["starts"] == [0, 2]  # ckpt_path=last: a fresh folder starts at 0, the requeued job at 2


# ------------------------------------------------------------------------------------------------ TensorBoard
def test_tensorboard_logger_writes_scalars_and_hparams(synth_shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_compose(_synth_overrides(synth_shards, steps=1, val_batches=1, logger="tensorboard"), tmp_path))
    (run,) = {events.parent for events in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")}
    scalars = EventAccumulator(str(run)).Reload().Tags()["scalars"]  # every events file of the run
    for tag in ("train/loss", "train/seg/loss_mask", "val/synthshapes_seg_val/PQ", "val/synthshapes_det_val/box_AP"):
        assert tag in scalars, tag
    assert "num_points: 256" in (run / "hparams.yaml").read_text()


# ------------------------------------------------------------------------------------------------ openseed.evaluate
def _evaluate_cfg(shards, tmp_path, ckpt_path):
    overrides = [f"data.val.0.path={shards['seg_val']}", f"data.val.1.path={shards['det_val']}",
                 "data.num_workers=0", f"paths.data_dir={tmp_path / 'none'}"]
    if ckpt_path is not None:
        overrides.append(f"ckpt_path={ckpt_path}")
    return _compose(overrides, tmp_path / "eval", config_name="evaluate")


def test_evaluate_a_training_checkpoint_on_the_validation_sets(requeued_run, synth_shards, tmp_path, capsys):
    from openseed.evaluate import evaluate

    last = requeued_run["dir"] / "checkpoints" / "last.ckpt"
    results = evaluate(_evaluate_cfg(synth_shards, tmp_path, last))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["ckpt_path"] == str(last) and set(saved["per_class"]["synthshapes_seg_val"]) >= {"PQ", "box_AP"}
    written = saved["metrics"]
    assert set(written) == set(results) == {"synthshapes_seg_val", "synthshapes_det_val"}
    assert {"PQ", "SQ", "RQ", "mIoU", "box_AP", "mask_AP"} <= set(written["synthshapes_seg_val"])
    assert {"box_AP", "mask_AP"} <= set(written["synthshapes_det_val"])
    for metrics in written.values():
        assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "per_class")
    assert "| synthshapes_det_val |" in capsys.readouterr().out


def test_evaluate_a_converted_reference_model_with_its_own_preprocessing(panoptic_shards, tmp_path, monkeypatch):
    """A converted checkpoint records the reference's evaluation resize (shortest edge 800, longest 1333, padding to
    32) and instance settings: evaluate applies them over the data config's 1024 square (eval_resize=auto)."""
    from openseed.convert_checkpoint import convert
    from openseed.evaluate import evaluate
    from openseed.evaluation.runner import DatasetEvaluator
    from tests._reference import reference_path

    converted = tmp_path / "converted.pt"
    convert(reference_path("swint_nodecouple", "weights.pt"), converted,
            config_file=reference_path("swint_nodecouple", "config.yaml"), log=lambda message: None)
    seen = []
    update = DatasetEvaluator.update

    def recording(self, outputs, batch):
        seen.append((tuple(batch.images.shape[-2:]), [t.image_size for t in batch.targets], self.inference.top_k,
                     self.inference.clip_boxes))
        return update(self, outputs, batch)

    monkeypatch.setattr(DatasetEvaluator, "update", recording)
    overrides = ["data=coco_panoptic", f"data.val.0.path={panoptic_shards}", "data.val.0.batch_size=2",
                 "data.num_workers=0", "data.pin_memory=false", f"ckpt_path={converted}"]
    results = evaluate(_compose(overrides, tmp_path / "eval", config_name="evaluate"))
    assert len(seen) == 1 and seen[0][2:] == (100, False)
    (padded, sizes, _, _) = seen[0]
    assert all(min(size) == 800 or max(size) == 1333 for size in sizes) and padded[0] % 32 == padded[1] % 32 == 0
    assert padded == tuple(-(-max(size[i] for size in sizes) // 32) * 32 for i in (0, 1)) != (1024, 1024)
    assert {"PQ", "mIoU", "box_AP", "mask_AP"} <= set(results["coco_panoptic_sample"])
    seen.clear()
    evaluate(_compose(overrides + ["eval_resize=data"], tmp_path / "eval_data", config_name="evaluate"))
    assert seen[0][0] == (1024, 1024)  # the data config's square


def test_evaluate_needs_a_checkpoint_file(synth_shards, tmp_path):
    from openseed.evaluate import evaluate

    with pytest.raises(ValueError, match="ckpt_path is required.*python -m openseed.evaluate ckpt_path="):
        evaluate(_evaluate_cfg(synth_shards, tmp_path, None))
    with pytest.raises(FileNotFoundError, match="missing.ckpt: not found"):
        evaluate(_evaluate_cfg(synth_shards, tmp_path, tmp_path / "missing.ckpt"))
    with pytest.raises(FileNotFoundError, match="a folder, not a file"):
        evaluate(_evaluate_cfg(synth_shards, tmp_path, tmp_path))


def test_evaluate_defaults_to_the_training_validation_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENSEED_DATA", str(tmp_path))
    for data in ("synthshapes", "coco_o365"):
        train_cfg = _resolved(_compose([f"data={data}"], tmp_path))
        eval_cfg = _resolved(_compose([f"data={data}", "ckpt_path=x.ckpt"], tmp_path, config_name="evaluate"))
        assert eval_cfg["data"]["val"] == train_cfg["data"]["val"] and eval_cfg["device"] == "auto"
