"""Training reliability: config values checked with the key named before any work; checkpoints that a kill cannot
leave half-written; a resume that notices a damaged checkpoint and names (or uses) the newest intact one."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from openseed.config import ConfigError
from openseed.train import train
from openseed.training.checkpoint_io import (
    DamagedCheckpointError,
    SafeCheckpointIO,
    resolve_resume,
    verify_checkpoint,
)
from tests.test_platform_configs import _compose as _compose_named
from tests.test_train import _compose, _short_run_overrides


@pytest.mark.parametrize(("override", "message"), [
    ("data.seg.batch_size=abc", r"data.seg.batch_size: expected int, got 'abc'"),
    ("module.optimizer.lr=abc", r"module.optimizer.lr: expected float.*got 'abc'"),
    ("trainer.max_epochs=abc", r"trainer.max_epochs: expected int or None, got 'abc'"),
    ("data.val.1.batch_size=2.5", r"data.val\[1\].batch_size: expected int, got 2.5"),
    ("seed=x", r"seed: expected int, got 'x'"),
    ("model.num_fg=many", r"model.num_fg: expected int, got 'many'"),
    ("+model.hidden_dimm=3", r"model.hidden_dimm: .*build_openseed takes no such option"),
])
def test_wrong_typed_config_values_name_the_key_before_any_work(override, message, tmp_path):
    """Before the fix: a TypeError deep in the data module / after the model was built / ignored under debug=fast.
    The data folder does not exist, so an error about the value (not the data) proves the check ran first."""
    cfg = _compose(["model=tiny", "debug=fast", "prepare_synthshapes=false", f"paths.data_dir={tmp_path}/none",
                    override], tmp_path)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def _checkpoint(step: int, size: int = 1000) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((size,), float(step))}}


def test_save_writes_beside_the_target_and_cleans_a_killed_save(tmp_path, monkeypatch):
    """The temporary file lies in the target's folder (the rename is then atomic on that file system; before the fix
    Lightning wrote through a transaction in the temporary folder, then moved it across file systems)."""
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.ckpt.{dead.pid}.partial"
    stale.write_bytes(b"x" * 100)
    SafeCheckpointIO().save_checkpoint(_checkpoint(3), tmp_path / "last.ckpt")
    ((source, target),) = replaced
    assert os.path.dirname(source) == str(tmp_path) and str(target) == str(tmp_path / "last.ckpt")
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert verify_checkpoint(tmp_path / "last.ckpt") is None
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


def test_kill_during_saves_never_leaves_a_partial_checkpoint(tmp_path):
    """kill -9 a process that saves ~8 MB checkpoints in a loop: last.ckpt is always a complete, earlier save."""
    script = textwrap.dedent(f"""
        import torch
        from openseed.training.checkpoint_io import SafeCheckpointIO
        io = SafeCheckpointIO()
        step = 0
        while True:
            step += 1
            io.save_checkpoint({{"global_step": step, "w": torch.full((2_000_000,), float(step))}},
                               {str(tmp_path / "last.ckpt")!r})
            if step == 1:
                open({str(tmp_path / "started")!r}, "w").close()
    """)
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and process.poll() is None, "the saving process did not start"
            time.sleep(0.05)
        time.sleep(0.7)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert verify_checkpoint(tmp_path / "last.ckpt") is None
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] >= 1 and torch.all(saved["w"] == saved["global_step"])
    SafeCheckpointIO().save_checkpoint(_checkpoint(99), tmp_path / "last.ckpt")  # the next save cleans up
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "started") == ["last.ckpt"]


def test_damage_is_detected_and_the_newest_intact_checkpoint_named(tmp_path, caplog):
    io = SafeCheckpointIO()
    io.save_checkpoint(_checkpoint(4), tmp_path / "epoch=1-step=4.ckpt")
    io.save_checkpoint(_checkpoint(2), tmp_path / "epoch=0-step=2.ckpt")
    io.save_checkpoint(_checkpoint(6, size=100_000), tmp_path / "last.ckpt")
    data = bytearray((tmp_path / "last.ckpt").read_bytes())
    (tmp_path / "last.ckpt").write_bytes(data[:131072])  # what a kill during a cross-device copy left before
    assert "truncated" in verify_checkpoint(tmp_path / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="openseed.training.checkpoint_io"):
        assert resolve_resume("last", tmp_path) == str(tmp_path / "epoch=1-step=4.ckpt")
    assert "last.ckpt is damaged" in caplog.text and "step 4" in caplog.text
    with pytest.raises(DamagedCheckpointError, match=r"last.ckpt is damaged .*ckpt_path=.*epoch=1-step=4.ckpt"):
        resolve_resume(str(tmp_path / "last.ckpt"), tmp_path)
    middle = len(data) // 2  # one flipped byte inside the tensor data: torch.load alone would read it silently
    data[middle] ^= 0xFF
    (tmp_path / "last.ckpt").write_bytes(data)
    assert "does not match its checksum" in verify_checkpoint(tmp_path / "last.ckpt")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    assert verify_checkpoint(tmp_path / "empty.ckpt") == "empty file (0 bytes)"
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        resolve_resume(str(tmp_path / "nope.ckpt"), tmp_path)


def test_training_resumes_past_a_damaged_last_checkpoint(synth_shards, tmp_path, caplog):
    overrides = [o for o in _short_run_overrides(synth_shards) if not o.startswith("+trainer.max_steps")]
    overrides += ["++prediction_overlays=false"]
    train(_compose(overrides + ["trainer.max_epochs=2"], tmp_path))
    folder = tmp_path / "checkpoints"
    assert torch.load(folder / "epoch=1-step=2.ckpt", weights_only=True)["global_step"] == 2
    (folder / "last.ckpt").write_bytes((folder / "last.ckpt").read_bytes()[:4096])
    with caplog.at_level(logging.WARNING, logger="openseed.training.checkpoint_io"):
        train(_compose(overrides + ["trainer.max_epochs=3", "ckpt_path=last"], tmp_path))
    assert "resuming from" in caplog.text and "epoch=1-step=2.ckpt" in caplog.text
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3  # one more epoch, not three
    assert not list(folder.glob(".*partial"))


def test_evaluate_names_a_wrong_typed_data_value_before_reading_the_checkpoint(tmp_path):
    from openseed.evaluate import evaluate

    cfg = _compose_named([f"paths.data_dir={tmp_path / 'none'}", "data.val.0.batch_size=abc",
                    f"ckpt_path={tmp_path / 'missing.ckpt'}"], tmp_path, config_name="evaluate")  # not read
    with pytest.raises(ConfigError, match=r"data.val\[0\].batch_size: expected int, got 'abc'"):
        evaluate(cfg)


def test_command_line_ends_with_one_message_and_exit_status_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "openseed.train", "model=tiny", "prepare_synthshapes=false",
                             f"paths.data_dir={tmp_path / 'none'}", "data.seg.batch_size=abc",
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_MODE": "offline"})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "data.seg.batch_size: expected int, got 'abc' (str)" in output and "Traceback" not in output
