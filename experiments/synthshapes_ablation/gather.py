"""Gather the metrics of a Hydra multirun of the synthshapes ablations into a markdown table.

    python experiments/synthshapes_ablation/gather.py multirun/synthshapes_ablation [--out table.md]

Reads every ``<sweep dir>/*/metrics.json`` (written by ``openseed.train`` at the end of a run) with the run's
``.hydra/overrides.yaml`` for its ablation name; one row per run, baseline first, metrics x100. A run without
``metrics.json`` (still running, or crashed) is listed as missing rather than skipped silently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

COLUMNS = (("synthshapes_seg_val", "PQ"), ("synthshapes_seg_val", "PQ_things"), ("synthshapes_seg_val", "PQ_stuff"),
           ("synthshapes_seg_val", "mask_AP"), ("synthshapes_seg_val", "mIoU"), ("synthshapes_det_val", "box_AP"),
           ("synthshapes_det_val", "mask_AP"), ("synthshapes_det_val", "box_AP_unseen"),
           ("synthshapes_det_val", "mask_AP_unseen"))
ORDER = ("baseline", "no_decoupled", "no_mask_assistance", "no_conditioned")


def ablation_of(run: Path) -> str:
    """The run's ``ablation=`` override (``baseline`` when it has none)."""
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    for item in overrides or []:
        if item.startswith("ablation="):
            return item.split("=", 1)[1]
    return "baseline"


def gather(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """(rows, missing): one row per finished run ({"ablation", "step", metric columns}), and unfinished run dirs."""
    rows, missing = [], []
    for run in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()):
        metrics_file = run / "metrics.json"
        if not metrics_file.is_file():
            missing.append(run.name)
            continue
        data = json.loads(metrics_file.read_text())
        row = {"ablation": ablation_of(run), "step": data["step"]}
        for dataset, key in COLUMNS:
            row[f"{dataset}/{key}"] = data["metrics"].get(dataset, {}).get(key)
        rows.append(row)
    rows.sort(key=lambda r: (ORDER.index(r["ablation"]) if r["ablation"] in ORDER else len(ORDER), r["ablation"]))
    return rows, missing


def markdown(rows: list[dict], missing: list[str]) -> str:
    header = ["ablation", "steps"] + [f"{d.removeprefix('synthshapes_')} {k}" for d, k in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        cells = [row["ablation"], str(row["step"])]
        for dataset, key in COLUMNS:
            value = row[f"{dataset}/{key}"]
            cells.append("" if value is None else f"{100 * value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    if missing:
        lines.append("")
        lines.append("Runs without metrics.json (unfinished or crashed): " + ", ".join(missing))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"no such sweep directory: {args.sweep_dir}", file=sys.stderr)
        return 2
    rows, missing = gather(args.sweep_dir)
    if not rows and not missing:
        print(f"no Hydra runs under {args.sweep_dir}", file=sys.stderr)
        return 2
    table = markdown(rows, missing)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
