"""The paper's claims in miniature on synthshapes: every training and evaluation of the study, resumable.

    python experiments/paper_claims/run.py [variant=crowded] [out=runs/paper_claims] [seeds=[0,1,2]] \
        [model=tiny] [stages=[ablations,box_prompts,offline]] [only=[NAME,...]] [overrides=[HYDRA_OVERRIDE,...]]
    python experiments/paper_claims/gather.py study=runs/paper_claims \
        records=[experiments/paper_claims/records.json] out=experiments/paper_claims

Stages (README.md of this folder says what each measures):

- ``ablations`` (Table 9): ``openseed.train`` once per ablation value and seed, in the order baseline, no_decoupled,
  no_mask_assistance, no_conditioned (every seed of one ablation before the next), each into
  ``<out>/runs/<ablation>-s<seed>``;
- ``box_prompts`` (Table 1): for every finished baseline run, ``det_val`` mask AP of each class when its masks are
  decoded from the ground-truth boxes and names (``openseed.evaluation.box_prompts``) at the size the run validated
  at (``data.eval_max_size``: 160), into ``<out>/box_prompts/baseline-s<seed>.json``, with ``mask_AP_unseen`` over
  the classes outside ``seg_train`` as the training reports it for the model's own detections;
- ``offline`` (Table 7): per seed, pseudo masks for ``det_train`` from that seed's baseline model
  (``data_prep.pseudo_masks``, into ``<out>/pseudo/s<seed>``), then the baseline training again with them as the
  detection data's mask supervision (``data.det_masks=true``), into ``<out>/runs/offline-s<seed>``.

A run whose folder already has ``metrics.json`` is not run again, so an interrupted study continues where it stopped
(the folder of a run that was stopped is moved to ``<out>/aborted/`` and the run starts afresh); a failed run stops
the study with its log's path (``<run dir>/driver.log``). Each training is the default experiment
(``synthshapes_joint``: 2 epochs = 500 steps) with ``model=<model>``, ``logger=csv`` and no prediction overlays;
``overrides`` are added to every training (for example ``overrides=[trainer.max_epochs=1]`` for a quicker study).
``variant=crowded`` runs the whole study on synthshapes' crowded variant instead (``experiment=synthshapes_crowded``,
its shards under ``data/synthshapes_crowded``), into ``runs/paper_claims_crowded`` by default.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from data_prep.synthetic import VARIANTS, folder_name
from openseed.cli import Option, UsageError, command, integer, one_of, path, some_of, string_list

ROOT = Path(__file__).resolve().parents[2]
ABLATIONS = ("baseline", "no_decoupled", "no_mask_assistance", "no_conditioned")
STAGES = ("ablations", "box_prompts", "offline")


def data_folder(variant: str) -> Path:
    """Where the training prepares the variant's shards (openseed.train, ``synthshapes_variant``)."""
    return ROOT / "data" / folder_name(variant) / "shards"


class StudyError(RuntimeError):
    pass


def _run(command: list[str], log_file: Path) -> None:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log_file.open("w") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - start) / 60
    if done.returncode != 0:
        raise StudyError(f"exit status {done.returncode} after {minutes:.1f} min: {' '.join(command)} "
                         f"(log: {log_file})")
    print(f"  done in {minutes:.1f} min", flush=True)


def train(run_dir: Path, overrides: list[str], model: str, extra: list[str]) -> Path:
    """One training into ``run_dir`` (skipped when it already finished); returns its checkpoint."""
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if (run_dir / "metrics.json").is_file():
        print(f"{run_dir.name}: finished before, kept", flush=True)
        return checkpoint
    if run_dir.exists():  # a run that was stopped: its checkpoints and logs go aside, it starts afresh
        aside = run_dir.parent.parent / "aborted" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(aside)
        print(f"{run_dir.name}: an unfinished earlier attempt moved to {aside}", flush=True)
    print(f"{run_dir.name}: training ({' '.join(overrides)})", flush=True)
    command = [sys.executable, "-m", "openseed.train", *overrides, f"model={model}", "logger=csv",
               "prediction_overlays=false", *extra, f"hydra.run.dir={run_dir}"]
    _run(command, run_dir / "driver.log")
    return checkpoint


def baseline_run(out: Path, seed: int) -> Path:
    return out / "runs" / f"baseline-s{seed}"


def eval_size(run: Path) -> int:
    """The longer side the run validated its images at (its data config's ``eval_max_size``): box prompts and pseudo
    masks are decoded at the same size as the run's own detections (read from the run's config: the study's
    earlier checkpoints predate training recording it in the model)."""
    import yaml

    data = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["data"]
    if data.get("eval_short_edge") is not None or not data.get("eval_max_size"):
        raise StudyError(f"{run}: the study decodes box prompts at the run's eval_max_size, and this run has "
                         f"eval_short_edge={data.get('eval_short_edge')}, eval_max_size={data.get('eval_max_size')}")
    return int(data["eval_max_size"])


def stage_ablations(out: Path, seeds: list[int], model: str, extra: list[str], only: set[str]) -> None:
    for ablation in ABLATIONS:
        if only and ablation not in only:
            continue
        for seed in seeds:
            train(out / "runs" / f"{ablation}-s{seed}", [f"ablation={ablation}", f"seed={seed}"], model, extra)


def stage_box_prompts(out: Path, seeds: list[int], det_val: Path, seg_train: Path) -> None:
    from openseed.data.shards import ShardSet
    from openseed.evaluation.box_prompts import evaluate_box_prompts
    from openseed.evaluation.report import add_unseen_class_metrics
    from openseed.modeling.openseed import load_model

    seg_classes = set(ShardSet.open(seg_train).vocabulary.names)

    for seed in seeds:
        run = baseline_run(out, seed)
        target = out / "box_prompts" / f"{run.name}.json"
        if target.is_file():
            print(f"{target.name}: scored before, kept", flush=True)
            continue
        if not (run / "metrics.json").is_file():
            raise StudyError(f"{run} has not finished: run the ablations stage first")
        print(f"{run.name}: box-prompted masks on {det_val.name}", flush=True)
        start = time.perf_counter()
        metrics = evaluate_box_prompts(load_model(run / "checkpoints" / "last.ckpt"), det_val, eval_size(run))
        add_unseen_class_metrics({det_val.name: metrics}, seg_classes)  # mask_AP_unseen, as the training reports it
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"run": run.name, "shards": str(det_val), **metrics}, indent=1))
        print(f"  done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)


def stage_offline(out: Path, seeds: list[int], model: str, extra: list[str], det_train: Path) -> None:
    for seed in seeds:
        run = out / "runs" / f"offline-s{seed}"
        if (run / "metrics.json").is_file():
            print(f"{run.name}: finished before, kept", flush=True)
            continue
        teacher = baseline_run(out, seed)
        if not (teacher / "metrics.json").is_file():
            raise StudyError(f"{teacher} has not finished: run the ablations stage first")
        pseudo = out / "pseudo" / f"s{seed}"
        if not (pseudo / "manifest.json").is_file():
            print(f"s{seed}: pseudo masks for {det_train.name} from {teacher.name}", flush=True)
            _run([sys.executable, "-m", "data_prep.pseudo_masks", f"ckpt={teacher / 'checkpoints' / 'last.ckpt'}",
                  f"shards={det_train}", f"out={pseudo}", f"image_size={eval_size(teacher)}", "device=cpu"],
                 out / "pseudo" / f"s{seed}.log")
        train(run, ["ablation=baseline", f"seed={seed}", "data.det_masks=true", f"data.det.path={pseudo}"], model,
              extra)


def _seeds(value, key: str) -> list[int]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise UsageError(f"{key}=[]: give at least one seed")
    return [integer(0)(seed, f"{key}[{index}]") for index, seed in enumerate(values)]


OPTIONS = {
    "variant": Option("the synthshapes variant (data_prep.synthetic): standard, or crowded", "standard",
                      one_of(sorted(VARIANTS))),
    "out": Option("the study folder (null: runs/paper_claims, runs/paper_claims_crowded for crowded)", None, path),
    "seeds": Option("training seeds", [0, 1, 2], _seeds),
    "model": Option("model size (conf/model); small: the CPU default's", "small", path),
    "stages": Option(f"stages to run, in order, from {list(STAGES)}", list(STAGES), some_of(STAGES)),
    "only": Option(f"ablations stage: only these of {list(ABLATIONS)} ([]: all)", [],
                   some_of(ABLATIONS, allow_empty=True)),
    "overrides": Option("Hydra overrides added to every training", [],
                        lambda value, key: string_list(value, key, allow_empty=True)),
    "det_train": Option("null: the variant's shards/det_train", None, path),
    "det_val": Option("null: the variant's shards/det_val", None, path),
    "seg_train": Option("its classes are the 'seen' ones (null: the variant's shards/seg_train)", None, path),
}


@command(OPTIONS, "python experiments/paper_claims/run.py", __doc__)
def main(args) -> int:
    shards = data_folder(args.variant)
    det_train = Path(args.det_train) if args.det_train else shards / "det_train"
    det_val = Path(args.det_val) if args.det_val else shards / "det_val"
    seg_train = Path(args.seg_train) if args.seg_train else shards / "seg_train"
    default_out = ROOT / "runs" / ("paper_claims" if args.variant == "standard" else f"paper_claims_{args.variant}")
    out = (Path(args.out) if args.out else default_out).resolve()
    extra = list(args.overrides)
    if args.variant != "standard":
        extra = [f"experiment=synthshapes_{args.variant}", *extra]
    try:
        for stage in args.stages:
            print(f"== {stage}", flush=True)
            if stage == "ablations":
                stage_ablations(out, args.seeds, args.model, extra, set(args.only))
            elif stage == "box_prompts":
                stage_box_prompts(out, args.seeds, det_val.resolve(), seg_train.resolve())
            else:
                stage_offline(out, args.seeds, args.model, extra, det_train.resolve())
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
