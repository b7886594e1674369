"""The training module: parameter groups, a joint fast_dev_run on synthshapes with validation, resume state."""

from functools import partial

import lightning as L
import pytest
import torch

from openseed.data.datamodule import OpenSeeDDataModule
from openseed.losses.criterion import SetCriterion
from openseed.modeling.openseed import build_openseed, load_model
from openseed.training.module import OpenSeeDModule, parameter_groups

ADAMW = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)


def test_parameter_groups_multipliers_and_no_decay():
    model = build_openseed("tiny")
    groups = {g["name"]: g for g in parameter_groups(model, lr=1e-4, weight_decay=0.05)}
    assert groups["backbone"]["lr"] == pytest.approx(1e-5) and groups["text"]["lr"] == pytest.approx(1e-5)
    assert groups["rest"]["lr"] == pytest.approx(1e-4) and groups["rest"]["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]}
    assert "decoder.bg_content.weight" in no_decay and "decoder.bg_anchor.weight" in no_decay  # embeddings
    assert "pixel_decoder.level_embed" in no_decay and "decoder.class_head.logit_scale" in no_decay
    assert any("relative_position_bias_table" in n for n in no_decay)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in [p for g in groups.values() if g["weight_decay"] == 0 for p in g["params"]]:
        name = names[id(p)]
        assert p.ndim <= 1 or id(p) in embeddings or "table" in name or "embed" in name, name
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.fixture()
def datamodule(synth_shards):
    return OpenSeeDDataModule(seg={"path": str(synth_shards["seg_train"]), "batch_size": 2},
                              det={"path": str(synth_shards["det_train"]), "batch_size": 2},
                              val=[{"path": str(synth_shards["seg_val"]), "batch_size": 2},
                                   {"path": str(synth_shards["det_val"]), "batch_size": 2}],
                              image_size=128, eval_max_size=128, num_workers=0)


def _trainer(tmp_path, **kw):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, gradient_clip_val=0.1, **kw)


def test_joint_training_and_validation_per_data_set(datamodule, tmp_path):
    torch.manual_seed(0)
    module = OpenSeeDModule(build_openseed("tiny"), SetCriterion(num_points=256, mask_assistance="online"),
                            optimizer=ADAMW)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=2, num_sanity_val_steps=0, val_check_interval=3)
    trainer.fit(module, datamodule=datamodule)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/seg/loss_mask", "train/det/loss_bbox", "val/synthshapes_seg_val/PQ",
                "val/synthshapes_seg_val/mIoU", "val/synthshapes_det_val/box_AP", "val/synthshapes_det_val/mask_AP"):
        assert key in metrics, key
    assert torch.isfinite(metrics["train/loss"])
    assert trainer.global_step == 3
    lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
    assert max(lrs) == pytest.approx(1e-3 * 0.01)  # steps 3 of 3: past both milestones (0.9, 0.95)


def test_checkpoint_resumes_step_and_optimizer_and_loads_as_a_model(datamodule, tmp_path):
    torch.manual_seed(0)
    module = OpenSeeDModule(build_openseed("tiny"), SetCriterion(num_points=256), optimizer=ADAMW)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    path = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    assert state["global_step"] == 2 and state["optimizer_states"][0]["state"]
    resumed = OpenSeeDModule(build_openseed("tiny"), SetCriterion(num_points=256), optimizer=ADAMW)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(resumed, datamodule=datamodule, ckpt_path=path)
    assert trainer.global_step == 3
    model = load_model(path)  # a training checkpoint is also a model file
    assert torch.equal(model.decoder.class_head.bias, module.model.decoder.class_head.bias)


class _ParameterChecksum(L.Callback):
    """At the end of training every rank contributes a checksum of its parameters; rank 0 writes them all."""

    def __init__(self, path):
        self.path = str(path)

    def on_train_end(self, trainer, module):
        import json

        checksum = torch.stack([p.detach().double().sum() for p in module.parameters()]).tolist()
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, {"rank": trainer.global_rank, "sums": checksum,
                                                       "steps": trainer.global_step})
        if trainer.is_global_zero:
            with open(self.path, "w") as handle:
                json.dump(gathered, handle)


def test_ddp_training_on_two_cpu_processes_keeps_ranks_identical(synth_shards, tmp_path):
    """Two processes (gloo), a few joint steps: same step count and bit-identical parameters on both ranks."""
    import json

    torch.manual_seed(0)
    datamodule = OpenSeeDDataModule(seg={"path": str(synth_shards["seg_train"]), "batch_size": 2},
                                    det={"path": str(synth_shards["det_train"]), "batch_size": 2},
                                    image_size=96, num_workers=0)
    module = OpenSeeDModule(build_openseed("tiny"), SetCriterion(num_points=128), optimizer=ADAMW)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, use_distributed_sampler=False, default_root_dir=tmp_path,
                        callbacks=[_ParameterChecksum(tmp_path / "sums.json")])
    trainer.fit(module, datamodule=datamodule)
    ranks = json.loads((tmp_path / "sums.json").read_text())
    assert [r["steps"] for r in ranks] == [3, 3]
    assert ranks[0]["sums"] == ranks[1]["sums"]


def test_step_with_warmup_schedule_and_the_optimizer_partial():
    from openseed.training.schedules import step_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    schedule = step_with_warmup(optimizer, total_steps=100, milestones=(0.5, 0.8), gamma=0.1, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.01 + 0.99 * 0.5) and lrs[10] == 1.0
    assert lrs[49] == 1.0 and lrs[50] == pytest.approx(0.1) and lrs[79] == pytest.approx(0.1)
    assert lrs[80] == pytest.approx(0.01)
    module = OpenSeeDModule(build_openseed("tiny"), SetCriterion(num_points=64), optimizer=ADAMW)
    assert module.hparams["optimizer"] == {"target": "torch.optim.adamw.AdamW", "lr": 1e-3, "weight_decay": 0.05}
    assert module.hparams["scheduler"]["target"] == "openseed.training.schedules.step_with_warmup"
    with pytest.raises(TypeError, match="optimizer must be a functools.partial"):
        OpenSeeDModule(build_openseed("tiny"), SetCriterion(num_points=64), optimizer=torch.optim.AdamW)
