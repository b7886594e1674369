"""Multi-GPU and cluster helpers the trainer configs name: an FSDP strategy factory and a requeue checkpoint callback.

- ``fsdp_strategy(wrap=[...])`` builds Lightning's ``FSDPStrategy`` from class *names* (Hydra cannot pass class
  objects): each listed block class becomes its own FSDP unit (``ModuleWrapPolicy``), optionally with activation
  checkpointing. ``conf/trainer/fsdp.yaml`` uses it with the backbone, pixel-decoder, decoder and text-tower blocks.
- ``CheckpointOnSignal`` saves ``last.ckpt`` when SLURM (through submitit) announces the end of the job, before
  submitit requeues it; ``conf/launcher/slurm.yaml`` adds it. The requeued job resumes with ``ckpt_path=last``.
"""

from __future__ import annotations

import importlib
import logging
import signal as signals
from collections.abc import Iterable, Sequence
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

log = logging.getLogger(__name__)

# Short names accepted in ``wrap`` besides dotted paths: the repeated blocks of every part of the model.
KNOWN_BLOCKS: dict[str, str] = {
    "SwinTransformerBlock": "timm.models.swin_transformer.SwinTransformerBlock",  # backbone: Swin (T, L, tiny)
    "FocalNetBlock": "timm.models.focalnet.FocalNetBlock",  # backbone: Focal-T
    "Bottleneck": "timm.models.resnet.Bottleneck",  # backbone: ResNet-50
    "BasicBlock": "timm.models.resnet.BasicBlock",  # backbone: tiny_resnet (ResNet-18/34 style)
    "DeformableEncoderLayer": "openseed.modeling.pixel_decoder.DeformableEncoderLayer",  # pixel decoder
    "DecoderLayer": "openseed.modeling.decoder.DecoderLayer",  # decoder
    "CLIPEncoderLayer": "transformers.models.clip.modeling_clip.CLIPEncoderLayer",  # text tower: CLIP
    "ResidualAttentionBlock": "openseed.modeling.clip_text.ResidualAttentionBlock",  # text tower: clip_transformer
    "BertLayer": "transformers.models.bert.modeling_bert.BertLayer",  # text tower: MiniLM, tiny
}


def resolve_module_classes(names: Iterable[str]) -> tuple[type[nn.Module], ...]:
    """Module classes from dotted paths (``package.module.Class``) or ``KNOWN_BLOCKS`` short names.

    Raises:
        ValueError: a name that is not a known short name, cannot be imported, or is not an ``nn.Module`` subclass;
            the message names it.
    """
    classes = []
    for name in names:
        path = KNOWN_BLOCKS.get(name, name)
        module_name, _, attribute = path.rpartition(".")
        if not module_name:
            raise ValueError(f"unknown module class {name!r}: give a dotted path (package.module.Class) or one of "
                             f"{sorted(KNOWN_BLOCKS)}")
        try:
            cls = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"unknown module class {name!r}: {err}") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"{name!r} is not an nn.Module class")
        classes.append(cls)
    return tuple(dict.fromkeys(classes))


class _NormClippingFSDPPrecision(FSDPPrecision):
    """``FSDPPrecision`` that can clip by norm: through the root FSDP module, whose ``clip_grad_norm_`` takes the norm
    over all shards (Lightning's plugin refuses norm clipping because it holds no reference to that module)."""

    def __init__(self, plugin: FSDPPrecision, strategy: FSDPStrategy):
        super().__init__(plugin.precision)
        self.scaler = plugin.scaler  # 16-mixed: Lightning unscales before clipping
        self._strategy = strategy

    def clip_grad_by_norm(self, optimizer, clip_val: float) -> None:
        self._strategy.model.clip_grad_norm_(clip_val)


class OpenSeeDFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP strategy with two fixes for this project's training module.

    - Gradient clipping by norm works (the trainer configs clip at 0.1), see ``_NormClippingFSDPPrecision``.
    - ``configure_optimizers`` runs with the full parameters summoned: with ``use_orig_params=True`` a sharded
      parameter is otherwise a flat 1-d view, and the optimizer's no-weight-decay rule (``ndim <= 1``) would take
      every weight out of weight decay. The optimizer keeps the same parameter objects, so it works on the shards.
    """

    def setup_environment(self) -> None:
        if self.root_device.type != "cuda":  # Lightning checks this only for its own FSDPStrategy class
            raise ValueError(f"FSDP needs GPUs (trainer.accelerator=gpu), got device {self.root_device}; use "
                             "trainer=cpu or trainer=ddp without GPUs")
        super().setup_environment()

    def setup(self, trainer) -> None:
        self.enable_norm_clipping()
        super().setup(trainer)

    def enable_norm_clipping(self) -> None:
        """Swap Lightning's FSDP precision plugin for the one that clips by norm (same precision and scaler)."""
        plugin = self.precision_plugin
        if type(plugin) is FSDPPrecision:
            self.precision_plugin = _NormClippingFSDPPrecision(plugin, self)

    def setup_optimizers(self, trainer) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not self.kwargs.get("use_orig_params") or not isinstance(self.model, FullyShardedDataParallel):
            return super().setup_optimizers(trainer)
        with FullyShardedDataParallel.summon_full_params(self.model, writeback=False):
            return super().setup_optimizers(trainer)


def fsdp_strategy(wrap: Sequence[str], activation_checkpointing: bool | Sequence[str] = False,
                  sharding_strategy: str = "FULL_SHARD", **kwargs) -> OpenSeeDFSDPStrategy:
    """An FSDP strategy whose units are the listed block classes.

    Args:
        wrap: module classes (dotted paths or ``KNOWN_BLOCKS`` names); every instance becomes its own FSDP unit, the
            rest of the model stays in the root unit. Classes the model does not contain are harmless.
        activation_checkpointing: False; True to recompute the activations of the ``wrap`` blocks in the backward
            pass; or a list of classes to checkpoint instead.
        sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD.
        **kwargs: any other ``FSDPStrategy`` argument (``state_dict_type``, ``cpu_offload``, ``limit_all_gathers``...).
    """
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if isinstance(wrap, str):
        raise ValueError(f"wrap must be a list of class names, got the string {wrap!r}")
    classes = resolve_module_classes(wrap)
    if not classes:
        raise ValueError("wrap names no module class: FSDP would shard the whole model as one unit")
    if activation_checkpointing is True:
        kwargs["activation_checkpointing_policy"] = ModuleWrapPolicy(set(classes))
    elif activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = ModuleWrapPolicy(set(resolve_module_classes(
            activation_checkpointing)))
    return OpenSeeDFSDPStrategy(auto_wrap_policy=ModuleWrapPolicy(set(classes)), sharding_strategy=sharding_strategy,
                                **kwargs)


class CheckpointOnSignal(Callback):
    """Saves ``last.ckpt`` when the job is about to end (time limit or preemption), then hands the signal on.

    submitit asks SLURM for ``signal`` (USR2, ``signal_delay_s`` before the time limit; on preemption where the cluster
    sends it) and its handler requeues the job, knowing nothing of the training state. This callback takes the signal
    over while fitting: the handler only records it; at the end of the current training step all ranks agree on it
    (any rank that got it counts), save the ``ModelCheckpoint``'s ``last.ckpt`` together (a collective under DDP and
    FSDP), and then the previous handler runs (submitit: requeue and exit). The requeued job starts with
    ``ckpt_path=last`` and resumes from that step.

    Args:
        signal: the signal's name (submitit's ``SUBMITIT_PREEMPT_SIGNAL``, default USR2).
    """

    def __init__(self, signal: str = "SIGUSR2"):
        name = signal if signal.startswith("SIG") else f"SIG{signal}"
        if not hasattr(signals, name):
            raise ValueError(f"unknown signal {signal!r}")
        self.signum = getattr(signals, name)
        self.received = False
        self._previous = None
        self._installed = False

    def _record(self, signum, frame) -> None:
        self.received = True
        log.warning("received %s: saving last.ckpt at the end of this training step",
                    signals.Signals(signum).name)

    def on_train_start(self, trainer, pl_module) -> None:
        # here, not in setup: Lightning snapshots every signal handler after setup and puts the snapshot back after
        # fitting, which must hold the previous (submitit's) handler, not this one
        if not self._installed:
            self._previous = signals.signal(self.signum, self._record)
            self._installed = True

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._installed:
            signals.signal(self.signum, self._previous)
            self._installed = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received, all=False):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        log.warning("saved %s at step %d", path, trainer.global_step)
        self.received = False
        previous = self._previous
        self._restore()  # the job is ending: the next signal goes straight to the previous handler
        if callable(previous):
            previous(self.signum, None)


def last_checkpoint_path(trainer) -> Path:
    """Where ``ckpt_path="last"`` looks: ``last.ckpt`` in the (first) ``ModelCheckpoint``'s folder."""
    callbacks = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    if not callbacks or callbacks[0].dirpath is None:
        raise RuntimeError("CheckpointOnSignal needs a ModelCheckpoint callback with a dirpath (callbacks group)")
    callback = callbacks[0]
    return Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
