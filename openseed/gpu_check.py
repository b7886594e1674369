"""Every GPU figure from one command, for the rare, short loan of a CUDA machine: ``make gpu-check`` or

    python -m openseed.gpu_check out=runs/gpu_check [sections=[tests,deform_attn,train_step,inference,fsdp]]

Sections (each runs on its own; one that fails is recorded with its error and the next one runs):

- ``tests``: ``pytest -m gpu`` (the compiled Triton kernels against float64 references, the module on both backends);
  passed / failed / skipped counts from its JUnit XML.
- ``deform_attn``: ``python -m openseed.ops.benchmark``: Triton fp32 / bf16 / fp16 against the PyTorch path, forward
  and forward + backward, encoder and decoder shapes, peak memory, max error, bandwidth (docs/kernels.md).
- ``train_step``: one joint training step of the full-size decoupled Swin-T (``swint_decouple``, random weights) at
  1024 x 1024 in bf16 autocast with AdamW: a segmentation batch and a detection batch of synthetic images and targets,
  first at the per-GPU batch of ``experiment=swint_joint`` (4 + 8 images: the paper's 32 + 64 on 8 GPUs), then at the
  smaller ones in ``batches`` while it does not fit; median step time, images/s, peak memory.
- ``inference``: the converted Swin-T architecture (random weights) on one 800 x 1333 image, fp32 and bf16 autocast:
  median latency and peak memory.
- ``fsdp``: ``openseed.train`` on synthshapes with ``trainer=fsdp`` (one GPU, bf16-mixed) and ``model=swint_decouple``
  for a few steps: wall time and whether it finished.

It writes ``gpu_check.json`` (every figure, the device, torch / triton versions) and ``gpu_check.md`` (the tables)
under ``out``. Without CUDA it says so and exits 0 having run nothing (``device=cpu`` runs the training-step and
inference sections on the CPU at sizes given on the command line: what the fast test suite does).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from pathlib import Path

import torch

from openseed.cli import Option, command, integer, one_of, path, some_of

SECTIONS = ("tests", "deform_attn", "train_step", "inference", "fsdp")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- synthetic data
def synthetic_batch(task: str, batch_size: int, size: int, vocabulary, device, seed: int = 0, objects: int = 12):
    """A training batch of ``batch_size`` random ``size`` x ``size`` images with ``objects`` rectangles each (things
    and, for "seg", stuff bands with masks; "det": boxes only), on ``device``."""
    from openseed.core.batch import Batch, Targets

    generator = torch.Generator().manual_seed(seed)
    num_things = sum(vocabulary.is_thing)
    targets = []
    for _ in range(batch_size):
        n = objects
        x0 = torch.randint(0, size * 3 // 4, (n,), generator=generator)
        y0 = torch.randint(0, size * 3 // 4, (n,), generator=generator)
        w = torch.randint(size // 16, size // 4, (n,), generator=generator)
        h = torch.randint(size // 16, size // 4, (n,), generator=generator)
        boxes = torch.stack([x0, y0, (x0 + w).clamp(max=size), (y0 + h).clamp(max=size)], dim=1).float()
        is_thing = torch.ones(n, dtype=torch.bool)
        labels = torch.randint(0, num_things, (n,), generator=generator)
        stuff = n // 4 if task == "seg" else 0  # the last quarter are stuff bands across the image
        if stuff:
            is_thing[-stuff:] = False
            labels[-stuff:] = num_things + torch.randint(0, len(vocabulary) - num_things, (stuff,), generator=generator)
            band = size // stuff
            for k in range(stuff):
                boxes[n - stuff + k] = torch.tensor([0.0, k * band, size, (k + 1) * band])
        masks = None
        if task == "seg":
            masks = torch.zeros(n, size, size, dtype=torch.bool)
            for j, (a, b, c, d) in enumerate(boxes.long().tolist()):
                masks[j, b:d, a:c] = True
        targets.append(Targets(labels=labels, boxes=boxes, masks=masks, is_thing=is_thing,
                               mask_is_pseudo=torch.zeros(n, dtype=torch.bool),
                               has_mask=torch.full((n,), task == "seg", dtype=torch.bool), ignore_mask=None,
                               image_id=0, orig_size=(size, size), image_size=(size, size)))
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=generator)
    batch = Batch(images=images, padding_mask=torch.zeros(batch_size, size, size, dtype=torch.bool),
                  targets=targets, vocabulary=vocabulary, task=task, dataset=f"synthetic_{task}")
    return batch.to(device)


def _vocabulary(things: int = 80, stuff: int = 53):
    from openseed.core.vocabulary import Vocabulary

    names = [f"thing {k}" for k in range(things)] + [f"stuff {k}" for k in range(stuff)]
    return Vocabulary.from_names(names, [True] * things + [False] * stuff)


# ----------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _timed(step: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


# ----------------------------------------------------------------------------------------------- sections
def train_step(model_name: str = "swint_decouple", size: int = 1024, batches=((4, 8), (2, 4), (1, 2)),
               device: str = "cuda", dtype: str = "bf16", warmup: int = 2, repeats: int = 5) -> dict:
    """Joint training steps (a segmentation and a detection batch, forward, losses, backward, AdamW step): the first
    (seg, det) batch sizes in ``batches`` that fit, with every larger one recorded as out of memory."""
    from openseed.losses.criterion import SetCriterion
    from openseed.modeling.openseed import build_openseed

    device_ = torch.device(device)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    vocabulary = _vocabulary()
    model = build_openseed(model_name).to(device_).train()
    criterion = SetCriterion().to(device_)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    parameters = sum(p.numel() for p in model.parameters())
    result = {"model": model_name, "size": size, "dtype": dtype, "parameters_M": parameters / 1e6, "tried": []}
    for seg_size, det_size in batches:
        parts = {"seg": synthetic_batch("seg", seg_size, size, vocabulary, device_, seed=1),
                 "det": synthetic_batch("det", det_size, size, vocabulary, device_, seed=2)}

        def step(parts=parts):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_.type, dtype=autocast, enabled=autocast is not None):
                total = 0.0
                for task, part in parts.items():
                    outputs = model(part, clean_group=criterion.wants_clean_group(task))
                    total = total + criterion.total_loss(criterion(outputs, part))
            total.backward()
            optimizer.step()
            return total

        _peak_reset(device_)
        try:
            times = _timed(step, device_, warmup, repeats)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            if not _is_oom(err):
                raise
            optimizer.zero_grad(set_to_none=True)
            result["tried"].append({"seg": seg_size, "det": det_size, "fits": False})
            continue
        median = statistics.median(times)
        result["tried"].append({"seg": seg_size, "det": det_size, "fits": True, "step_s": median,
                                "step_s_min": min(times), "step_s_max": max(times),
                                "images_per_s": (seg_size + det_size) / median, "peak_gib": _peak_gib(device_)})
        break
    return result


def inference(model_name: str = "swint_decouple", height: int = 800, width: int = 1333, device: str = "cuda",
              warmup: int = 2, repeats: int = 10) -> dict:
    """Latency of one image through the whole model (text embeddings of the vocabulary computed once, as the
    predictor does; no post-processing), fp32 and bf16 autocast."""
    from openseed.modeling.openseed import build_openseed

    device_ = torch.device(device)
    model = build_openseed(model_name).to(device_).eval()
    vocabulary = _vocabulary()
    # padded to a multiple of 32 at the bottom / right, as the predictor and the evaluation loader pad (1333 -> 1344)
    padded_h, padded_w = -(-height // 32) * 32, -(-width // 32) * 32
    images = torch.zeros(1, 3, padded_h, padded_w, dtype=torch.uint8)
    images[:, :, :height, :width] = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8)
    padding = torch.ones(1, padded_h, padded_w, dtype=torch.bool)
    padding[:, :height, :width] = False
    images, padding = images.to(device_), padding.to(device_)
    result = {"model": model_name, "height": height, "width": width, "padded": [padded_h, padded_w], "rows": []}
    with torch.no_grad():
        text = model.embed_vocabulary(vocabulary)
        for dtype in ("fp32", "bf16"):
            def forward(dtype=dtype):
                with torch.autocast(device_.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                    return model.forward_images(images, padding, vocabulary, text=text, masks="final")
            _peak_reset(device_)
            times = _timed(forward, device_, warmup, repeats)
            result["rows"].append({"dtype": dtype, "latency_ms": 1000 * statistics.median(times),
                                   "latency_ms_min": 1000 * min(times), "peak_gib": _peak_gib(device_)})
    return result


def run_tests(out: Path, timeout: int = 300) -> dict:
    junit = out / "gpu_tests.xml"
    command_ = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    start = time.perf_counter()
    done = subprocess.run(command_, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "gpu_tests.log").write_text(done.stdout + done.stderr)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if junit.is_file():
        for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "returncode": done.returncode, "seconds": time.perf_counter() - start,
            "log": str(out / "gpu_tests.log")}


def deform_attn(out: Path, repeats: int = 20, timeout: int = 300) -> dict:
    target = out / "deform_attn.json"
    command_ = [sys.executable, "-m", "openseed.ops.benchmark", f"repeats={repeats}", f"out={target}"]
    done = subprocess.run(command_, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "deform_attn.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0 or not target.is_file():
        raise RuntimeError(f"openseed.ops.benchmark exited with {done.returncode} (see {out / 'deform_attn.log'})")
    return {"results": json.loads(target.read_text()), "table": done.stdout}


def fsdp_overrides(run_dir: Path, steps: int) -> list[str]:
    """``openseed.train``'s overrides for the FSDP section: synthshapes (generated on first use), the full-size
    decoupled Swin-T, FSDP on one GPU in bf16-mixed, ``steps`` steps, no validation."""
    return ["experiment=synthshapes_joint", "model=swint_decouple", "trainer=fsdp", "trainer.devices=1",
            f"+trainer.max_steps={steps}", "+trainer.limit_val_batches=0", "logger=csv", "prediction_overlays=false",
            f"hydra.run.dir={run_dir}"]


def fsdp(out: Path, steps: int = 5, timeout: int = 420) -> dict:
    run_dir = out / "fsdp_run"
    command_ = [sys.executable, "-m", "openseed.train", *fsdp_overrides(run_dir, steps)]
    start = time.perf_counter()
    done = subprocess.run(command_, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    (out / "fsdp.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"openseed.train with trainer=fsdp exited with {done.returncode} (see {out / 'fsdp.log'})")
    return {"steps": steps, "seconds": time.perf_counter() - start, "command": " ".join(command_[1:])}


# ----------------------------------------------------------------------------------------------- report
def environment() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "host": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env['device']}", "", f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, "
             f"{env['time']}.", ""]
    for name in SECTIONS:
        section = report["sections"].get(name)
        if section is None:
            continue
        lines.append(f"## {name}")
        lines.append("")
        if section["status"] != "ok":
            lines += [f"{section['status']}: {section.get('error', '')}", ""]
            continue
        figures = section["figures"]
        if name == "tests":
            lines.append(f"{figures['passed']} passed, {figures['failures']} failed, {figures['errors']} errors, "
                         f"{figures['skipped']} skipped in {figures['seconds']:.0f} s")
        elif name == "deform_attn":
            lines.append("```")
            lines.append(figures["table"].rstrip())
            lines.append("```")
        elif name == "train_step":
            lines += [f"{figures['model']} ({figures['parameters_M']:.0f} M parameters), {figures['size']} px, "
                      f"{figures['dtype']} autocast, AdamW:", "",
                      "| seg + det images | fits | step (s) | images/s | peak memory (GiB) |", "|---|---|---|---|---|"]
            lines += [f"| {t['seg']} + {t['det']} | {'yes' if t['fits'] else 'no'} | {_cell(t.get('step_s'), 3)} | "
                      f"{_cell(t.get('images_per_s'), 2)} | {_cell(t.get('peak_gib'), 2)} |" for t in figures["tried"]]
        elif name == "inference":
            lines += [f"{figures['model']}, one {figures['height']} x {figures['width']} image:", "",
                      "| dtype | latency (ms) | min (ms) | peak memory (GiB) |", "|---|---|---|---|"]
            lines += [f"| {r['dtype']} | {_cell(r['latency_ms'])} | {_cell(r['latency_ms_min'])} | "
                      f"{_cell(r['peak_gib'], 2)} |" for r in figures["rows"]]
        elif name == "fsdp":
            lines.append(f"{figures['steps']} steps in {figures['seconds']:.0f} s (start-up included): "
                         f"`{figures['command']}`")
        lines += ["", f"({section['seconds']:.0f} s)", ""]
    return "\n".join(lines) + "\n"


def run(out: Path, sections, device: str = "cuda", size: int = 1024, height: int = 800, width: int = 1333,
        model: str = "swint_decouple", batches=((4, 8), (2, 4), (1, 2)), repeats: int = 5,
        dtype: str = "bf16", warmup: int = 2) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(), "sections": {}}
    jobs = {
        "tests": lambda: run_tests(out),
        "deform_attn": lambda: deform_attn(out),
        "train_step": lambda: train_step(model, size, batches, device, dtype, warmup, repeats),
        "inference": lambda: inference(model, height, width, device, warmup, repeats),
        "fsdp": lambda: fsdp(out),
    }
    for name in sections:
        start = time.perf_counter()
        print(f"gpu_check: {name} ...", flush=True)
        try:
            report["sections"][name] = {"status": "ok", "figures": jobs[name]()}
        except Exception as err:  # one section's failure is a figure too; the next section runs
            report["sections"][name] = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        report["sections"][name]["seconds"] = time.perf_counter() - start
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))  # after every section
    (out / "gpu_check.md").write_text(markdown(report))
    return report


OPTIONS = {
    "out": Option("folder for gpu_check.json, gpu_check.md and the sections' logs", required=True, check=path),
    "sections": Option(f"sections to run, from {list(SECTIONS)}", list(SECTIONS), some_of(SECTIONS)),
    "device": Option("cuda, or cpu to run train_step / inference on the CPU (at small sizes)", "cuda",
                     one_of(("cuda", "cpu"))),
    "model": Option("model of train_step / inference (build_openseed name)", "swint_decouple", path),
    "size": Option("train_step image size", 1024, integer(32)),
    "height": Option("inference image height", 800, integer(32)),
    "width": Option("inference image width", 1333, integer(32)),
    "repeats": Option("timed runs of train_step / inference (median reported)", 5, integer(1)),
}


@command(OPTIONS, "python -m openseed.gpu_check", __doc__.split("\n\n")[0])
def main(args) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing was run (run it on a machine with a GPU: make gpu-check)")
        return 0
    sections = list(args.sections)
    if args.device == "cpu":
        sections = [s for s in sections if s in ("train_step", "inference")]
    os.environ.setdefault("WANDB_MODE", "offline")
    report = run(Path(args.out), sections, args.device, args.size, args.height, args.width, args.model,
                 repeats=args.repeats)
    print(markdown(report))
    failed = [name for name, s in report["sections"].items() if s["status"] != "ok"]
    print(f"written: {Path(args.out) / 'gpu_check.json'}, {Path(args.out) / 'gpu_check.md'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
