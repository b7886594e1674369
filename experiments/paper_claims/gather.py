"""Gather the study's runs into its tables (mean and standard deviation over seeds) and its plot.

    python experiments/paper_claims/gather.py study=runs/paper_claims out=experiments/paper_claims

Reads every training under ``<study>/runs/`` (or the job folders of a Hydra multirun given directly): its
``metrics.json`` (written by ``openseed.train`` at the end of a run) and ``.hydra/overrides.yaml``, which say the
variant (``ablation=NAME``; ``offline`` for a baseline trained with ``data.det_masks=true``) and the seed
(``seed=N``, 0 without one), and ``<study>/box_prompts/*.json`` (run.py's box_prompts stage). Writes
``<out>/results.md`` (Tables 1, 9 and 7 in miniature, then every run's figures) and, with matplotlib installed,
``<out>/claims.png``. Runs without ``metrics.json`` (unfinished or crashed) are listed, never skipped silently.
Metrics x100; ``std`` is the sample standard deviation over seeds (n - 1 in the denominator).

Run folders do not outlive the machine they ran on, so the study's figures are also kept as **records**:
``<out>/records.json`` holds every gathered run's and box-prompt score's metrics, and ``records=[FILE,...]``
reads earlier records back, so a study run in parts on different machines is gathered whole:

    python experiments/paper_claims/gather.py study=runs/paper_claims \
        records=[experiments/paper_claims/records.json] out=experiments/paper_claims

A run folder replaces the record of the same name; where both hold a figure and they differ (beyond the record's
``resolution``, the rounding of figures transcribed from a table) the difference is printed, which makes a rerun on
another machine a reproducibility check.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

import yaml

from openseed.cli import Option, command, path, string_list

SEG, DET = "seg_val", "det_val"  # a run's validation sets by role: synthshapes[_crowded]_{seg,det}_val
COLUMNS = ((SEG, "PQ", "PQ"), (SEG, "PQ_things", "PQ things"), (SEG, "PQ_stuff", "PQ stuff"), (SEG, "mIoU", "mIoU"),
           (SEG, "mask_AP", "seg mask AP"), (DET, "box_AP", "det box AP"), (DET, "mask_AP", "det mask AP"),
           (DET, "box_AP_unseen", "box AP unseen"), (DET, "mask_AP_unseen", "mask AP unseen"))
VARIANTS = ("baseline", "no_decoupled", "no_mask_assistance", "no_conditioned", "teacher", "offline")
TABLE9 = VARIANTS[:4]


def describe(run: Path) -> tuple[str, int]:
    """(variant, seed) of a training folder, from its Hydra overrides; a baseline folder named ``teacher-s<seed>`` is
    a ``teacher``: the baseline an offline run's pseudo masks came from when it is not the recorded baseline of its
    seed (a rerun on another machine, whose figures differ)."""
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    values = dict(item.split("=", 1) for item in overrides or [] if "=" in item)
    variant = values.get("ablation", "baseline")
    if variant == "baseline" and values.get("data.det_masks", "false").lower() == "true":
        variant = "offline"
    elif variant == "baseline" and run.name.startswith("teacher-"):
        variant = "teacher"
    return variant, int(values.get("seed", 0))


def _date(path: Path) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))


def collect(study: Path) -> tuple[list[dict], list[str], list[dict]]:
    """(runs, unfinished, box_prompts): one dict per finished training {"variant", "seed", "step", "name",
    (data set, key): value}; the names of unfinished ones; one dict per box-prompt score file."""
    root = study / "runs" if (study / "runs").is_dir() else study
    runs, unfinished = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            unfinished.append(folder.name)
            continue
        data = json.loads(metrics_file.read_text())
        variant, seed = describe(folder)
        row = {"variant": variant, "seed": seed, "step": data["step"], "name": folder.name,
               "source": f"{folder} ({_date(metrics_file)})"}
        by_role = {role: values for name, values in data["metrics"].items() for role in (SEG, DET)
                   if name.endswith(role)}
        for role, key, _ in COLUMNS:
            row[role, key] = by_role.get(role, {}).get(key)
        runs.append(row)
    prompts = [{**json.loads(p.read_text()), "source": f"{p} ({_date(p)})"}
               for p in sorted((study / "box_prompts").glob("*.json"))] if (study / "box_prompts").is_dir() else []
    return sorted_runs(runs), unfinished, prompts


def sorted_runs(runs: list[dict]) -> list[dict]:
    """Runs in the tables' order: by variant (``VARIANTS`` first, others after by name), then seed."""
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(runs, key=lambda r: (order.get(r["variant"], len(order)), r["variant"], r["seed"]))


def _metrics_of(row: dict) -> dict:
    metrics: dict = {}
    for role, key, _ in COLUMNS:
        if row.get((role, key)) is not None:
            metrics.setdefault(role, {})[key] = row[role, key]
    return metrics


def to_records(runs: list[dict], prompts: list[dict]) -> dict:
    """The JSON form of gathered runs and box-prompt scores (``records.json``)."""
    return {
        "runs": [{"name": r["name"], "variant": r["variant"], "seed": r["seed"], "step": r["step"],
                  "source": r["source"], "resolution": r.get("resolution", 0.0),
                  "metrics": _metrics_of(r)} for r in runs],
        "box_prompts": [{key: score[key] for key in ("run", "mask_AP", "mask_AP_unseen", "mIoU", "source",
                                                     "resolution") if key in score} for score in prompts],
    }


def read_records(path: Path) -> tuple[list[dict], list[dict]]:
    """(runs, box_prompts) from a ``records.json``, in ``collect``'s form."""
    try:
        data = json.loads(path.read_text())
        runs = []
        for record in data["runs"]:
            row = {key: record[key] for key in ("name", "variant", "seed", "step")}
            row["source"] = record.get("source", str(path))
            row["record"] = str(path)
            row["resolution"] = float(record.get("resolution", 0.0))
            for role, key, _ in COLUMNS:
                row[role, key] = record["metrics"].get(role, {}).get(key)
            runs.append(row)
        prompts = [{"source": str(path), **score, "record": str(path)} for score in data.get("box_prompts", [])]
        for score in prompts:
            if not {"run", "mask_AP", "mIoU"} <= score.keys():
                raise KeyError(f"a box_prompts record lacks run, mask_AP or mIoU: {score}")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"{path}: not a records file of this study ({type(err).__name__}: {err})") from err
    return runs, prompts


def differences(record: dict, fresh: dict, keys) -> list[str]:
    """The figures where a fresh result and an earlier record of the same run differ beyond the record's rounding."""
    tolerance = float(record.get("resolution", 0.0)) / 2 + 1e-9
    out = []
    for key in keys:
        old, new = record.get(key), fresh.get(key)
        if old is not None and new is not None and abs(old - new) > tolerance:
            label = "/".join(key) if isinstance(key, tuple) else key
            out.append(f"{label} {100 * old:.2f} -> {100 * new:.2f}")
    return out


def merge(records: tuple[list[dict], list[dict]], runs: list[dict], prompts: list[dict]) \
        -> tuple[list[dict], list[dict]]:
    """Earlier records plus this gathering's results; a fresh result replaces the record of the same run, and
    where they disagree it is printed (to stderr) rather than hidden."""
    def kept(recorded: list[dict], fresh: list[dict], name: str, keys: list, what: str) -> list[dict]:
        by_name = {item[name]: item for item in fresh}
        out = []
        for record in recorded:
            if record[name] not in by_name:
                out.append(record)
                continue
            changed = differences(record, by_name[record[name]], keys)
            print(f"{what.format(record[name])} replaces the record from {record['source']}"
                  + (f"; they differ: {', '.join(changed)}" if changed else "; same figures"), file=sys.stderr)
        return out

    kept_runs = kept(records[0], runs, "name", [(role, key) for role, key, _ in COLUMNS], "{}: run folder")
    kept_prompts = kept(records[1], prompts, "run", ["mask_AP", "mask_AP_unseen", "mIoU"],
                        "box prompts of {}: the score file")
    return sorted_runs(kept_runs + runs), sorted(kept_prompts + prompts, key=lambda s: s["run"])


def prompt_seed(score: dict) -> int:
    """The seed of the baseline run a box-prompt score file belongs to (run.py names it ``baseline-s<seed>``)."""
    return int(score["run"].rsplit("-s", 1)[-1])


def spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample std or None for a single value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def cell(values: list[float], scale: float = 100.0) -> str:
    mean, std = spread(values)
    if math.isnan(mean):
        return ""
    return f"{scale * mean:.1f}" if std is None else f"{scale * mean:.1f} ± {scale * std:.1f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def table1(runs: list[dict], prompts: list[dict]) -> list[str]:
    """Own detections vs box prompts on det_val, per baseline seed, then mean ± std."""
    own = {r["seed"]: r for r in runs if r["variant"] == "baseline"}
    lines = _header(["seed", "own detections: mask AP", "box prompts: mask AP", "own: mask AP unseen",
                     "box prompts: mask AP unseen", "ratio unseen (box / own)", "box prompts: mask mIoU"])
    ratios, columns = [], {k: [] for k in range(5)}
    for score in sorted(prompts, key=lambda s: s["run"]):
        seed = prompt_seed(score)
        run = own.get(seed)
        own_all = run[DET, "mask_AP"] if run else None
        own_unseen = run[DET, "mask_AP_unseen"] if run else None
        values = [own_all, score["mask_AP"], own_unseen, score.get("mask_AP_unseen"), score["mIoU"]]
        ratio = score.get("mask_AP_unseen") / own_unseen if own_unseen else None
        for k, v in enumerate(values):
            columns[k].append(v)
        if ratio is not None:
            ratios.append(ratio)
        lines.append(_row([str(seed)] + ["" if v is None else f"{100 * v:.1f}" for v in values[:4]]
                          + ["" if ratio is None else f"{ratio:.1f}x", f"{100 * values[4]:.1f}"]))
    if len(prompts) > 1:
        lines.append(_row(["mean ± std"] + [cell(columns[k]) for k in range(4)] + [cell(ratios, 1.0) + "x",
                                                                                    cell(columns[4])]))
    return lines


def table9(runs: list[dict], variants=TABLE9) -> list[str]:
    lines = _header(["variant", "seeds", "steps"] + [label for _, _, label in COLUMNS])
    for variant in variants:
        group = [r for r in runs if r["variant"] == variant]
        if not group:
            continue
        steps = sorted({r["step"] for r in group})
        lines.append(_row([variant, ",".join(str(r["seed"]) for r in group), "/".join(map(str, steps))]
                          + [cell([r[d, k] for r in group]) for d, k, _ in COLUMNS]))
    return lines


def table7(runs: list[dict]) -> list[str]:
    """Baseline vs offline pseudo-mask training, and the per-seed difference, paired with the model each offline run
    learned from: its seed's ``teacher`` where there is one, else its seed's baseline."""
    lines = table9(runs, ("baseline", "teacher", "offline"))
    base = {r["seed"]: r for r in runs if r["variant"] == "baseline"}
    base.update({r["seed"]: r for r in runs if r["variant"] == "teacher"})
    pairs = [(base[r["seed"]], r) for r in runs if r["variant"] == "offline" and r["seed"] in base]
    if pairs:
        label = "offline - its teacher (paired)" if any(b["variant"] == "teacher" for b, _ in pairs) \
            else "offline - baseline (paired)"
        lines.append(_row([label, ",".join(str(o["seed"]) for _, o in pairs), ""]
                          + [cell([o[d, k] - b[d, k] for b, o in pairs if o[d, k] is not None and b[d, k] is not None])
                             for d, k, _ in COLUMNS]))
    return lines


def every_run(runs: list[dict]) -> list[str]:
    lines = _header(["run", "variant", "seed", "steps"] + [label for _, _, label in COLUMNS])
    for r in runs:
        lines.append(_row([r["name"], r["variant"], str(r["seed"]), str(r["step"])]
                          + ["" if r[d, k] is None else f"{100 * r[d, k]:.1f}" for d, k, _ in COLUMNS]))
    return lines


def markdown(runs: list[dict], unfinished: list[str], prompts: list[dict]) -> str:
    parts = ["## Table 1 analogue: masks of the detection-only classes from box prompts vs own detections (det_val)",
             "", *table1(runs, prompts), "",
             "## Table 9 analogue: ablations (mean ± std over seeds)", "", *table9(runs), "",
             "## Table 7 analogue: offline mask assistance (pseudo masks for det_train)", "", *table7(runs), "",
             "## Every run", "", *every_run(runs)]
    sources: dict[str, list[str]] = {}
    for r in runs:
        if "record" in r:
            sources.setdefault(r["source"], []).append(r["name"])
    for s in prompts:
        if "record" in s:
            sources.setdefault(s["source"], []).append(f"box prompts of {s['run']}")
    for source, names in sources.items():
        parts += ["", f"From records, not run folders here ({source}): " + ", ".join(names)]
    if unfinished:
        parts += ["", "Runs without metrics.json (unfinished or crashed): " + ", ".join(unfinished)]
    return "\n".join(parts) + "\n"


def plot(runs: list[dict], prompts: list[dict], path: Path) -> bool:
    """Three panels (Tables 1, 9, 7): bars at the mean, a dot per seed. False when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 3, 1.6]})

    def bars(ax, groups: list[tuple[str, list[float]]], offset: float = 0.0, width: float = 0.8, label=None,
             color=None):
        for k, (_, values) in enumerate(groups):
            values = [100 * v for v in values if v is not None]
            if not values:
                continue
            ax.bar(k + offset, statistics.fmean(values), width, color=color, alpha=0.6,
                   label=label if k == 0 else None)
            ax.scatter([k + offset] * len(values), values, color="black", s=10, zorder=3)

    own = {r["seed"]: r for r in runs if r["variant"] == "baseline"}
    unseen_prompt = [s.get("mask_AP_unseen") for s in prompts]
    unseen_own = [own[prompt_seed(s)][DET, "mask_AP_unseen"] for s in prompts if prompt_seed(s) in own]
    bars(axes[0], [("own detections", unseen_own), ("box prompts", unseen_prompt)])
    axes[0].set_xticks([0, 1], ["own\ndetections", "box\nprompts"])
    axes[0].set_title("Table 1: det_val mask AP, unseen classes")

    keys = [(SEG, "PQ"), (SEG, "PQ_things"), (SEG, "PQ_stuff"), (DET, "box_AP"), (DET, "mask_AP_unseen")]
    present = [v for v in TABLE9 if any(r["variant"] == v for r in runs)]
    width = 0.8 / max(1, len(present))
    for j, variant in enumerate(present):
        group = [r for r in runs if r["variant"] == variant]
        bars(axes[1], [(k, [r[k] for r in group]) for k in keys], offset=(j - (len(present) - 1) / 2) * width,
             width=width, label=variant, color=f"C{j}")
    axes[1].set_xticks(range(len(keys)), ["PQ", "PQ things", "PQ stuff", "det box AP", "mask AP unseen"])
    axes[1].set_title("Table 9: ablations (bar = mean, dot = seed)")
    axes[1].legend(fontsize=8)

    keys7 = [(DET, "mask_AP"), (DET, "mask_AP_unseen")]
    for j, variant in enumerate(("baseline", "offline")):
        group = [r for r in runs if r["variant"] == variant]
        bars(axes[2], [(k, [r[k] for r in group]) for k in keys7], offset=(j - 0.5) * 0.4, width=0.4,
             label=variant, color=f"C{j}")
    axes[2].set_xticks([0, 1], ["det mask AP", "mask AP unseen"])
    axes[2].set_title("Table 7: offline pseudo masks")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_ylabel("x100")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


OPTIONS = {
    "study": Option("run.py's out folder, or a Hydra multirun folder (optional with records)", None, path),
    "records": Option("earlier records.json files to include; run folders replace their entries", [],
                      lambda value, key: string_list(value, key, allow_empty=True)),
    "out": Option("write results.md, records.json (and claims.png) here (null: print only)", None, path),
}


@command(OPTIONS, "python experiments/paper_claims/gather.py", __doc__)
def main(args) -> int:
    if args.study is None and not args.records:
        print("error: give a study folder (study=DIR), records=[FILE,...], or both", file=sys.stderr)
        return 2
    study, records = (None if args.study is None else Path(args.study)), [Path(r) for r in args.records]
    out = None if args.out is None else Path(args.out)
    runs, unfinished, prompts = [], [], []
    if study is not None:
        if not study.is_dir():
            print(f"no such study folder: {study}", file=sys.stderr)
            return 2
        runs, unfinished, prompts = collect(study)
    for record_file in records:
        runs, prompts = merge(read_records(record_file), runs, prompts)
    if not runs and not unfinished:
        print(f"no training runs under {study}" + (f" or in {', '.join(map(str, records))}" if records else ""),
              file=sys.stderr)
        return 2
    text = markdown(runs, unfinished, prompts)
    print(text)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(text)
        (out / "records.json").write_text(json.dumps(to_records(runs, prompts), indent=1) + "\n")
        if not plot(runs, prompts, out / "claims.png"):
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
