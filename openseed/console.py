"""What a training run prints: a progress display that suits where the output goes, and no messages a user cannot
act on.

``progress_bar`` (the ``callbacks.progress_bar`` entry) picks Lightning's live progress bar when standard output is a
terminal, and ``LineProgressBar`` (a plain line every ``every_n_seconds``) when it goes to a file or a pipe (a SLURM
log, ``| tee``), where a live bar writes carriage-return frames or nothing until the end.

``quiet_known_noise`` drops the library messages that are expected for this platform and say nothing to act on:
Lightning's advertising tips, its notice about the modules kept in eval mode on purpose (the frozen text tower, frozen
norms), its note that the module's own ``transfer_batch_to_device`` is used (deliberate: batches are dataclasses), a
deprecation inside Lightning's pytree helper (fixed upstream, not in our code), and Lightning's second copy of every
log line when Hydra already logs to the console.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

from lightning.pytorch.callbacks import ProgressBar

# (warning category, message regex) pairs: expected here, nothing for the user to change
EXPECTED_WARNINGS = (
    (UserWarning, r"Found \d+ module\(s\) in eval mode at the start of training"),
    (UserWarning, r"You have overridden `transfer_batch_to_device` in `LightningModule`"),
    (Warning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)
_TIP_PREFIX = "💡 Tip:"


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_TIP_PREFIX)


def quiet_known_noise() -> None:
    """Install the filters described in the module docstring (idempotent)."""
    for category, message in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
        if logging.getLogger().handlers:  # Hydra (or the user) logs already: Lightning's own stderr copy goes
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:
                    logger.removeHandler(handler)
            logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropTips) for f in handler.filters):
            handler.addFilter(_DropTips())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class LineProgressBar(ProgressBar):
    """Progress as plain lines, at most one every ``every_n_seconds`` (and at each epoch's end), from global rank 0:
    ``epoch 2/10 | step 120/500 (24%) | 1.93 it/s | eta 3m17s | train/loss 2.314``; and one line per validation."""

    def __init__(self, every_n_seconds: float = 30.0, stream=None):
        super().__init__()
        if every_n_seconds <= 0:
            raise ValueError(f"every_n_seconds must be > 0, got {every_n_seconds}")
        self.every_n_seconds, self.stream = every_n_seconds, stream
        self._enabled = True
        self._epoch_start = self._last = self._val_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _print(self, trainer, line: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(line, file=self.stream or sys.stdout, flush=True)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = self._last = time.monotonic()

    def _line(self, trainer, pl_module, done: int) -> str:
        elapsed = max(time.monotonic() - self._epoch_start, 1e-9)
        total = self.total_train_batches
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs not in (None, -1) else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}"]
        if isinstance(total, int) and total > 0:
            parts.append(f"step {done}/{total} ({100 * done / total:.0f}%)")
            parts.append(f"{done / elapsed:.2f} it/s")
            parts.append(f"eta {_duration((total - done) * elapsed / done)}")
        else:
            parts += [f"step {done}", f"{done / elapsed:.2f} it/s"]
        metrics = self.get_metrics(trainer, pl_module)
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items() if k != "v_num"]
        return " | ".join(parts)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        last = isinstance(self.total_train_batches, int) and batch_idx + 1 >= self.total_train_batches
        if now - self._last >= self.every_n_seconds or last:
            self._last = now
            self._print(trainer, self._line(trainer, pl_module, batch_idx + 1))

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            batches = sum(int(n) for n in trainer.num_val_batches) if trainer.num_val_batches else 0
            self._print(trainer, f"validation after epoch {trainer.current_epoch + 1}: {batches} batches in "
                                 f"{_duration(time.monotonic() - self._val_start)}")


def progress_bar(every_n_seconds: float = 30.0, stream=None) -> ProgressBar:
    """Lightning's live bar on a terminal, ``LineProgressBar`` otherwise (see the module docstring)."""
    if (stream or sys.stdout).isatty():
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
        from lightning_utilities.core.imports import RequirementCache

        return RichProgressBar() if RequirementCache("rich>=12.3.0") else TQDMProgressBar()
    return LineProgressBar(every_n_seconds, stream)
