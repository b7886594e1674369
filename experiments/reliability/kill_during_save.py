"""kill -9 a process that saves training checkpoints in a loop, many times, and count what it leaves behind.

    python experiments/reliability/kill_during_save.py trials=20 mb=48 tmpdir=/dev/shm

Compares Lightning's own checkpoint writer (``TorchCheckpointIO``: serialise, write through an fsspec transaction whose
temporary file lies in the temporary folder, then move it to the target) with ``openseed.training.checkpoint_io.
SafeCheckpointIO`` (temporary file beside the target, fsync, rename). With ``tmpdir`` on another file system than
the target (here /dev/shm, a tmpfs, against the ext4 disk) the move is a copy, and a kill during it leaves a partial
``last.ckpt``. For each writer it prints: trials, kills that left ``last.ckpt`` damaged (``verify_checkpoint``), kills
that left temporary files (in the target folder or the temporary folder) and their total size, and how many
temporaries are still there after the next save into that folder (a restarted run's first save).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from openseed.cli import Option, command, integer, path
from openseed.training.checkpoint_io import SafeCheckpointIO, verify_checkpoint

SAVER = """
import sys, torch
from pathlib import Path
kind, target, mb = sys.argv[1], sys.argv[2], int(sys.argv[3])
if kind == "lightning":
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO as IO
else:
    from openseed.training.checkpoint_io import SafeCheckpointIO as IO
io, step = IO(), 0
while True:
    step += 1
    io.save_checkpoint({"global_step": step, "w": torch.full((mb * 2**18,), float(step))}, target)
    Path(target + ".started").touch()
"""


def _temporaries(folder: Path, tmpdir: Path, before: set[Path]) -> list[Path]:
    here = [p for p in folder.iterdir() if p.name not in ("last.ckpt", "last.ckpt.started")]
    return here + [p for p in tmpdir.iterdir() if p not in before and p.is_file()]


def trial(kind: str, mb: int, tmpdir: Path, rng: random.Random) -> tuple[bool, int, int, int]:
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as folder:
        folder = Path(folder)
        target = folder / "last.ckpt"
        before = set(tmpdir.iterdir())
        env = {**os.environ, "TMPDIR": str(tmpdir)}
        process = subprocess.Popen([sys.executable, "-c", SAVER, kind, str(target), str(mb)], env=env)
        deadline = time.monotonic() + 120
        while not Path(str(target) + ".started").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {kind} saver did not start")
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        damaged = verify_checkpoint(target) is not None
        left = _temporaries(folder, tmpdir, before)
        size = sum(p.stat().st_size for p in left)
        env_tmp, os.environ["TMPDIR"] = os.environ.get("TMPDIR"), str(tmpdir)
        tempfile.tempdir = None  # re-read TMPDIR
        try:
            _writer(kind).save_checkpoint({"global_step": 0, "w": torch.zeros(1)}, target)
        finally:
            os.environ.pop("TMPDIR") if env_tmp is None else os.environ.__setitem__("TMPDIR", env_tmp)
            tempfile.tempdir = None
        remaining = _temporaries(folder, tmpdir, before)
        for path in remaining:
            path.unlink(missing_ok=True)
        return damaged, len(left), size, len(remaining)


def _writer(kind: str):
    if kind == "lightning":
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

        return TorchCheckpointIO()
    return SafeCheckpointIO()


OPTIONS = {
    "trials": Option("kills per saver", 20, integer(1)),
    "mb": Option("checkpoint size in MB (float32 values)", 48, integer(1)),
    "tmpdir": Option("the savers' temporary folder", tempfile.gettempdir(), path),
    "seed": Option("seed of the kill times", 0, integer(0)),
}


@command(OPTIONS, "python experiments/reliability/kill_during_save.py", __doc__)
def main(args) -> int:
    # a folder of our own inside the temporary folder: other programs' files there are never touched
    tmpdir = Path(tempfile.mkdtemp(prefix="openseed-kill-", dir=args.tmpdir))
    print("| writer | trials | damaged last.ckpt | kills leaving temporaries | their size (MB) | temporaries after the "
          "next save |")
    print("|---|---|---|---|---|---|")
    for kind in ("lightning", "openseed"):
        rng = random.Random(args.seed)
        results = [trial(kind, args.mb, tmpdir, rng) for _ in range(args.trials)]
        damaged = sum(r[0] for r in results)
        leaving = sum(1 for r in results if r[1])
        size = sum(r[2] for r in results) / 2**20
        remaining = sum(r[3] for r in results)
        name = "Lightning TorchCheckpointIO" if kind == "lightning" else "openseed SafeCheckpointIO"
        print(f"| {name} | {args.trials} | {damaged} | {leaving} | {size:.0f} | {remaining} |")
    shutil.rmtree(tmpdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
