"""OpenSeeDModule: the training and validation loop around the model and its criterion (Lightning).

- ``training_step`` gets ``{"seg": Batch, "det": Batch}`` and sums the two data sets' weighted losses; it logs each
  data set's total and its final-layer loss terms (``train/seg/loss_mask`` ...) and the sum (``train/loss``).
- ``configure_optimizers``: AdamW with parameter groups: backbone and text tower at ``lr x 0.1``; no weight decay on
  norms, biases, scalars, embeddings and position tables; the learning rate drops x0.1 at 90% and 95% of the steps.
- validation: every validation set (the data module's ``val_sets``, each with its own vocabulary) is post-processed
  and scored by a ``DatasetEvaluator``; metrics are logged as ``val/<data set>/<metric>`` (PQ, SQ, RQ, mask / box AP,
  mIoU as fractions).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict
from functools import partial

import torch
from lightning import LightningModule
from torch import nn

from openseed.core.batch import Batch
from openseed.evaluation.runner import DatasetEvaluator
from openseed.losses.criterion import SetCriterion
from openseed.modeling.openseed import OpenSeeD
from openseed.modeling.postprocess import InferenceConfig
from openseed.training.schedules import step_with_warmup

NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "level_embed", "logit_scale")
FINAL_TERMS = ("loss_class", "loss_bbox", "loss_giou", "loss_mask", "loss_dice")


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, backbone_multiplier: float = 0.1,
                     text_multiplier: float = 0.1, text_prefixes: tuple[str, ...] = ("text_encoder.tower.",)
                     ) -> list[dict]:
    """AdamW groups: (backbone | text | rest) x (decay | no decay). Frozen parameters are left out. "text": the
    parameters whose names start with one of ``text_prefixes`` (the model's ``text_lr_prefixes``: the tower, and with
    the reference's scope also the joint-space projection and the logit scale).

    No decay: parameters of normalisation layers and embeddings, every bias and 0/1-d parameter, and position tables.
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "text" if name.startswith(tuple(text_prefixes)) \
            else "rest"
        decays = not (id(param) in no_decay or param.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES))
        multiplier = {"backbone": backbone_multiplier, "text": text_multiplier, "rest": 1.0}[part]
        group = groups.setdefault((part, decays), {"name": f"{part}{'' if decays else '_no_decay'}", "params": [],
                                                   "lr": lr * multiplier,
                                                   "weight_decay": weight_decay if decays else 0.0})
        group["params"].append(param)
    return list(groups.values())


class OpenSeeDModule(LightningModule):
    """Args:
        model: the ``OpenSeeD`` network (its config is saved in the checkpoint).
        criterion: the set criterion.
        optimizer: the optimizer without its parameters (a ``functools.partial``, e.g. Hydra's ``_partial_``; default
            AdamW with the paper's lr 1e-4 and weight decay 0.05). Its ``lr`` and ``weight_decay`` set the parameter
            groups' (``parameter_groups``).
        backbone_lr_multiplier: lr factor of the backbone (0.1). The text tower uses its own encoder's multiplier.
        scheduler: the lr schedule without its optimizer and length (a partial taking ``(optimizer,
            total_steps)``; default ``schedules.step_with_warmup``), stepped every optimizer step.
        inference: post-processing thresholds for validation.
    """

    def __init__(self, model: OpenSeeD, criterion: SetCriterion, optimizer: Callable | None = None,
                 backbone_lr_multiplier: float = 0.1, scheduler: Callable | None = None,
                 inference: InferenceConfig | None = None):
        super().__init__()
        self.model, self.criterion = model, criterion
        self.optimizer = optimizer or partial(torch.optim.AdamW, lr=1e-4, weight_decay=0.05)
        self.scheduler = scheduler or partial(step_with_warmup)
        for name, made in (("optimizer", self.optimizer), ("scheduler", self.scheduler)):
            if not isinstance(made, partial):
                raise TypeError(f"{name} must be a functools.partial (a config with _partial_: true), got "
                                f"{type(made).__name__}")
        self.inference = inference or InferenceConfig()
        self.save_hyperparameters(ignore=["model", "criterion", "inference", "optimizer", "scheduler"])
        # the checkpoint's hyper-parameters stay plain data (torch.load(weights_only=True) reads them)
        self.hparams["optimizer"] = _describe(self.optimizer)
        self.hparams["scheduler"] = _describe(self.scheduler)
        self.hparams["model_config"] = asdict(model.config)  # a training checkpoint is a model file too
        self.evaluators: list[DatasetEvaluator] = []

    # ------------------------------------------------------------------------------------------------ steps
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, Batch):
            return batch.to(device)
        if isinstance(batch, dict):
            return {k: v.to(device) for k, v in batch.items()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def training_step(self, batch: dict[str, Batch], batch_idx: int) -> torch.Tensor:
        total = 0.0
        for task, part in batch.items():
            outputs = self.model(part, clean_group=self.criterion.wants_clean_group(task))
            losses = self.criterion(outputs, part)
            loss = self.criterion.total_loss(losses)
            size = len(part)
            self.log(f"train/{task}/loss", loss, batch_size=size)
            for key in FINAL_TERMS:
                self.log(f"train/{task}/{key}", losses[key], batch_size=size)
            total = total + loss
        self.log("train/loss", total, prog_bar=True, batch_size=sum(len(p) for p in batch.values()))
        return total

    def on_validation_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        self.evaluators = [DatasetEvaluator.for_shards(shards, self.inference) for shards in datamodule.val_sets]
        self.val_names = [shards.name for shards in datamodule.val_sets]

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0):
        return self.evaluators[dataloader_idx].score(self.model, batch)  # outputs, for callbacks (overlays)

    def on_validation_epoch_end(self) -> None:
        self.val_results = {}
        for name, evaluator in zip(self.val_names, self.evaluators):
            metrics = evaluator.compute()
            self.val_results[name] = metrics
            for key, value in metrics.items():
                if key != "per_class":
                    self.log(f"val/{name}/{key}", float(value), sync_dist=False, rank_zero_only=True)
        self.evaluators = []

    # ------------------------------------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        lr, weight_decay = _setting(self.optimizer, "lr"), _setting(self.optimizer, "weight_decay")
        groups = parameter_groups(self.model, lr, weight_decay, self.hparams.backbone_lr_multiplier,
                                  self.model.text_encoder.lr_multiplier, self.model.text_lr_prefixes)
        optimizer = self.optimizer(groups)
        scheduler = self.scheduler(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _describe(made: partial) -> dict:
    """A partial as plain data: ``{"target": "module.name", **keywords}`` (lists for sequences)."""
    func = made.func
    keywords = {k: list(v) if isinstance(v, tuple) else v for k, v in made.keywords.items()}
    return {"target": f"{func.__module__}.{func.__qualname__}", **keywords}


def _setting(made: partial, name: str):
    """A partial's keyword, else its function's default for it."""
    if name in made.keywords:
        return made.keywords[name]
    return inspect.signature(made.func).parameters[name].default
