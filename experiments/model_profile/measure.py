"""Model size and training-step cost.

    python experiments/model_profile/measure.py [steps=5] [size=small] [data=data/synthshapes]
        [seg_batch=8] [det_batch=6] [num_points=512] [params=false]    (--help lists every key)

1. Parameter counts of the released architectures (swint_nodecouple, swint_decouple, swinl_decouple; their text
   tower is the reference's CLIP-style transformer, 12 layers, width 512) and the CPU sizes, whole model and parts.
2. Forward + backward time and peak memory of one joint training step (segmentation + detection batch; the model
   and criterion of the default experiment, conf/experiment/synthshapes_joint.yaml, composed with Hydra: its batch
   sizes, image size, 512 mask points and online mask assistance, ``size``, ``num_points``, ``seg_batch`` and
   ``det_batch`` overriding them) on this machine's CPU, and the criterion's forward (matcher included) inside it.
3. Where a training step's time goes: the forward time of backbone, pixel decoder, text encoder and decoder, inside
   them the deformable attention, the matcher and the rest of the criterion, and the backward pass (torch.profiler;
   the regions are marked with ``record_function`` in the code).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

from data_prep.prepare_synthshapes import prepare_synthshapes  # noqa: E402
from openseed.cli import Option, command, integer, path  # noqa: E402
from openseed.config import CONF  # noqa: E402
from openseed.data.datamodule import OpenSeeDDataModule  # noqa: E402
from openseed.modeling.openseed import build_openseed  # noqa: E402

PARTS = ("backbone", "pixel_decoder", "decoder", "text_encoder")


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_table() -> None:
    print("| configuration | " + " | ".join(PARTS) + " | whole model |\n|---|" + "---|" * (len(PARTS) + 1))
    for size in ("swint_nodecouple", "swint_decouple", "swinl_decouple", "small", "tiny"):
        if size in ("small", "tiny"):  # MiniLM's weights are read from its package
            model = build_openseed(size)
        else:
            with torch.device("meta"):  # shapes only: no memory, no initialisation
                model = build_openseed(size)
        cells = [f"{count(getattr(model, part)) / 1e6:.2f} M" for part in PARTS]
        print(f"| {size} | " + " | ".join(cells) + f" | {count(model) / 1e6:.2f} M |", flush=True)
        del model


def joint_step(model, criterion, batch, criterion_seconds: list[float] | None = None) -> torch.Tensor:
    """Forward, losses and backward of one joint batch, as ``OpenSeeDModule.training_step`` runs them; the
    criterion's forward time is appended to ``criterion_seconds``."""
    total, spent = 0, 0.0
    for task, part in batch.items():
        outputs = model(part, clean_group=criterion.wants_clean_group(task))
        start = time.perf_counter()
        losses = criterion(outputs, part)
        spent += time.perf_counter() - start
        total = total + criterion.total_loss(losses)
    total.backward()
    if criterion_seconds is not None:
        criterion_seconds.append(spent)
    return total


def experiment(size: str, num_points: int, seg_batch: int, det_batch: int):
    """The default experiment's composed config with these overrides."""
    overrides = ["experiment=synthshapes_joint", f"model={size}", f"criterion.num_points={num_points}",
                 f"data.seg.batch_size={seg_batch}", f"data.det.batch_size={det_batch}"]
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose("train", overrides=overrides)


OPTIONS = {
    "steps": Option("timed joint steps (after one warm-up)", 5, integer(1)),
    "size": Option("model config (conf/model)", "small", path),
    "data": Option("the synthshapes folder (made when missing)", str(ROOT / "data" / "synthshapes"), path),
    "num_points": Option("point samples per mask in the criterion", 512, integer(1)),
    "seg_batch": Option("segmentation images per step", 8, integer(1)),
    "det_batch": Option("detection images per step", 6, integer(1)),
    "params": Option("print the parameter count of each part first", True),
}


@command(OPTIONS, "python experiments/model_profile/measure.py", __doc__)
def main(args) -> int:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    if args.params:
        parameter_table()

    cfg = experiment(args.size, args.num_points, args.seg_batch, args.det_batch)
    dirs = prepare_synthshapes(args.data, progress=False)
    data = OpenSeeDDataModule(seg={"path": str(dirs["seg_train"]), "batch_size": args.seg_batch},
                              det={"path": str(dirs["det_train"]), "batch_size": args.det_batch},
                              image_size=cfg.data.image_size, scale_range=tuple(cfg.data.scale_range), num_workers=0)
    batches = [b for _, b in zip(range(args.steps + 1), data.train_dataloader())]
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    criterion = instantiate(cfg.criterion)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    joint_step(model, criterion, batches[0])  # warm-up
    optimizer.step()
    optimizer.zero_grad()
    times, criterion_times = [], []
    for batch in batches[1:]:
        start = time.perf_counter()
        joint_step(model, criterion, batch, criterion_times)
        times.append(time.perf_counter() - start)
        optimizer.step()
        optimizer.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    criterion_times.sort()
    print(f"\n{args.size}: joint step ({args.seg_batch} seg + {args.det_batch} det images, {cfg.data.image_size} px, "
          f"{args.num_points} points, mask assistance {criterion.mask_assistance}) forward+backward median "
          f"{times[len(times) // 2]:.2f} s over {len(times)} steps, of which the criterion's forward "
          f"{criterion_times[len(times) // 2]:.3f} s; peak resident memory {peak / 1024:.0f} MiB "
          f"(+{(peak - before) / 1024:.0f} MiB over the loaded model and data)")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        joint_step(model, criterion, batches[1])
        step_ms = (time.perf_counter() - start) * 1000
    totals = {e.key: e.cpu_time_total / 1000 for e in prof.key_averages()}
    regions = ["backbone", "pixel_decoder", "text_encoder", "decoder", "ms_deform_attn", "matcher", "criterion"]
    print(f"\nprofiled step: {step_ms:.0f} ms (profiler overhead included)\n")
    print("| region | ms | share of step |\n|---|---|---|")
    for region in regions:
        ms = totals.get(region, 0.0)
        note = {"ms_deform_attn": " (forward, inside pixel decoder + decoder)",
                "matcher": " (inside criterion)", "criterion": " (matcher included)"}.get(region, "")
        print(f"| {region}{note} | {ms:.0f} | {100 * ms / step_ms:.0f}% |")
    backward = sum(v for k, v in totals.items() if k.startswith("autograd::engine::evaluate_function"))
    print(f"| backward pass (all parts) | {backward:.0f} | {100 * backward / step_ms:.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
