"""Training checkpoints that a kill cannot leave half-written, and a resume that notices a damaged one.

Saving (``SafeCheckpointIO``, the trainer's checkpoint plugin): the checkpoint is serialised in memory, written to a
temporary file beside the target (so on the destination's own file system: the rename is atomic there, unlike a move
from a temporary folder on another file system), flushed to disk (fsync), renamed over the target, and the folder
entry flushed too. A kill at any moment leaves either the old or the new checkpoint under the name, never a mix; the
temporary file of a killed save is removed by the next save into that folder.

Checking (``verify_checkpoint``): a PyTorch checkpoint is a zip archive that stores a CRC-32 of every member, so
reading the archive through and comparing the checksums detects truncation and corrupted bytes (``torch.load`` alone
reads a corrupted tensor without complaint). ``resolve_resume`` applies it before training resumes.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from openseed.fileio import atomic_write, remove_stale_partials

log = logging.getLogger(__name__)


class DamagedCheckpointError(ValueError):
    """A checkpoint that must not be resumed from; the message names it and, when one exists, the intact one to use."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin with atomic writes on the destination's file system (see the module doc)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO takes no storage_options")
        path = Path(path)
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path)  # remote storage: its own transaction semantics
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write(buffer.getbuffer(), path)
        log.debug("saved checkpoint %s (%d bytes)", path, buffer.getbuffer().nbytes)


def verify_checkpoint(path: str | Path) -> str | None:
    """None when ``path`` is a complete PyTorch checkpoint whose every member matches its stored CRC-32, else the
    reason it is not (missing, empty, truncated, corrupted member, not a zip checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return "file not found"
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except zipfile.BadZipFile as err:
        return f"truncated or not a checkpoint ({size} bytes: {err})"
    except (OSError, EOFError, zipfile.LargeZipFile, ValueError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    if bad is not None:
        return f"corrupted: member {bad} does not match its checksum"
    return None


def _step(path: Path) -> int:
    """The global step a checkpoint records (read without running stored code); -1 when unreadable."""
    from openseed.modeling.checkpoint import load_weights_only

    try:
        return int(load_weights_only(path).get("global_step", -1))
    except (ValueError, AttributeError, TypeError):
        return -1


def newest_intact(folder: str | Path, exclude: Path | None = None) -> tuple[Path, int] | None:
    """The intact checkpoint (``*.ckpt``) in ``folder`` with the highest global step (newest file on a tie)."""
    candidates = []
    for path in Path(folder).glob("*.ckpt"):
        if exclude is not None and path.resolve() == exclude.resolve():
            continue
        if verify_checkpoint(path) is None:
            candidates.append((_step(path), path.stat().st_mtime, path))
    if not candidates:
        return None
    step, _, path = max(candidates)
    return path, step


def resolve_resume(ckpt_path: str | None, checkpoint_dir: str | Path | None) -> str | None:
    """The checkpoint to resume from, checked. ``"last"`` means ``<checkpoint_dir>/last.ckpt``: when it is damaged,
    the newest intact checkpoint in that folder is used instead, with a warning. A named file that is damaged is a
    ``DamagedCheckpointError`` that names the newest intact checkpoint beside it (pass that one to resume)."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        if checkpoint_dir is None:
            return ckpt_path
        path = Path(checkpoint_dir) / "last.ckpt"
        if not path.exists():
            fallback = newest_intact(checkpoint_dir) if Path(checkpoint_dir).is_dir() else None
            if fallback is None:
                return ckpt_path  # nothing to resume from: Lightning says so and starts afresh
            path = fallback[0]
    else:
        path = Path(ckpt_path)
        if not path.exists():
            raise FileNotFoundError(f"ckpt_path: checkpoint not found: {path}")
    reason = verify_checkpoint(path)
    if reason is None:
        return str(path)
    fallback = newest_intact(path.parent, exclude=path)
    advice = (f"the newest intact checkpoint there is {fallback[0]} (step {fallback[1]})" if fallback
              else f"no intact checkpoint is left in {path.parent}")
    if ckpt_path == "last" and fallback is not None:
        log.warning("%s is damaged (%s); resuming from %s (step %d) instead", path, reason, fallback[0], fallback[1])
        return str(fallback[0])
    raise DamagedCheckpointError(f"ckpt_path: {path} is damaged ({reason}); {advice}"
                                 + (f": resume with ckpt_path={fallback[0]}" if fallback else ""))
