"""The paper's zero-shot benchmarks (Tables 2, 4, 5): one protocol per data set, one command for all of them.

A protocol (``conf/benchmark/<name>.yaml``) says which converted shard sets (folders under a data root, as
``data_prep``'s converters name them) a benchmark reads, at what image size, which of our metrics fill which of the
paper's columns, and the paper's numbers::

    name: ade20k                      # the file's stem
    title: ADE20K-150
    table: 2                          # the paper's table
    resize: {short_edge: 640, max_size: 2560}
    columns:                          # paper column -> [shard folder under the root, our metric]
      PQ: [ade20k_panoptic_val, PQ]
      mask AP: [ade20k_instance_val, mask_AP]
    suite: null                       # or {sets: "seginw_*_valid", metric: mask_AP} for a suite of many sets:
                                      # columns are then aggregates (average, median) over its sets, each set
                                      # also reported on its own
    inference: {top_k: 300}           # optional: post-processing settings of this protocol (InferenceConfig
                                      # fields) over the model's recorded ones
    prompt_with: {ade20k_instance_val: ade20k_panoptic_val}  # optional: score a detection set prompting with
                                      # another set's (larger) vocabulary, detections of its other classes dropped
    paper: {swint: {PQ: 19.8, ...}, swinl: {...}}   # the paper's figures (x100); a missing one prints as "-"

``run_benchmarks(model, root, names)`` evaluates every protocol whose sets exist under ``root`` (a missing set makes
the benchmark "skipped", listed with what is missing; a suite runs on the sets it finds), each shard set once, and
returns a ``Report``: its ``markdown()`` has one table per paper table with the paper's numbers beside ours, its
``as_dict()`` is the JSON. Command line::

    python -m openseed.evaluation.benchmark ckpt=model.safetensors root=data/benchmarks out=runs/benchmarks \
        [benchmarks=[ade20k,cityscapes]] [paper_model=swint] [batch_size=4] [device=cpu] [limit=N]

``python -m openseed.evaluate benchmark=ade20k benchmark_root=data/benchmarks ckpt_path=...`` runs one protocol
(conf/benchmark is a Hydra group there: ``benchmark.resize.short_edge=800`` changes a protocol for one run).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from omegaconf import OmegaConf

from openseed.cli import Option, choice, command, integer, path, string_list
from openseed.config import CONF
from openseed.data.shards import MANIFEST
from openseed.modeling.postprocess import InferenceConfig

log = logging.getLogger(__name__)

BENCHMARKS = Path(CONF) / "benchmark"
AGGREGATES = {"average": statistics.fmean, "median": statistics.median}
PAPER_MODELS = ("swint", "swinl")


@dataclass(frozen=True)
class Protocol:
    """One benchmark as the paper evaluates it (see the module docstring for the file format)."""

    name: str
    title: str
    table: int
    short_edge: int
    max_size: int
    columns: dict[str, tuple[str, str]]  # paper column -> (shard folder, our metric); suites: aggregate -> metric
    paper: dict[str, dict[str, float]]
    suite_sets: str | None = None  # a glob of shard folder names (suites)
    suite_metric: str | None = None
    inference: dict = field(default_factory=dict)  # InferenceConfig fields over the model's recorded ones
    prompt_with: dict = field(default_factory=dict)  # shard folder -> the folder whose vocabulary prompts it

    @classmethod
    def from_dict(cls, name: str, data: dict, source: str = "") -> Protocol:
        where = source or name
        for key in ("title", "table", "resize", "paper"):
            if key not in data:
                raise ValueError(f"{where}: missing key {key!r}")
        resize = data["resize"]
        suite = data.get("suite")
        if suite:
            columns = {aggregate: ("", suite["metric"]) for aggregate in suite.get("aggregates", AGGREGATES)}
            unknown = set(columns) - set(AGGREGATES)
            if unknown:
                raise ValueError(f"{where}: unknown aggregates {sorted(unknown)} (known: {sorted(AGGREGATES)})")
        else:
            columns = {str(k): (str(v[0]), str(v[1])) for k, v in (data.get("columns") or {}).items()}
            if not columns:
                raise ValueError(f"{where}: a protocol needs columns (or a suite)")
        paper = {str(model): {str(k): float(v) for k, v in (figures or {}).items()}
                 for model, figures in data["paper"].items()}
        for model, figures in paper.items():
            extra = set(figures) - set(columns)
            if extra:
                raise ValueError(f"{where}: paper figures for {model} name columns it does not have: {sorted(extra)}")
        inference = dict(data.get("inference") or {})
        known = {f.name for f in fields(InferenceConfig)}
        unknown = sorted(set(inference) - known)
        if unknown:
            raise ValueError(f"{where}: unknown inference settings {unknown} (known: {sorted(known)})")
        InferenceConfig(**inference)  # a bad value fails here, before any model is read
        prompt_with = {str(k): str(v) for k, v in (data.get("prompt_with") or {}).items()}
        used = {folder for folder, _ in columns.values()}
        stray = sorted(set(prompt_with) - used) if not suite else sorted(prompt_with)
        if stray:
            raise ValueError(f"{where}: prompt_with names sets that no column reads: {stray}")
        return cls(name, str(data["title"]), int(data["table"]), int(resize["short_edge"]), int(resize["max_size"]),
                   columns, paper, suite["sets"] if suite else None, suite["metric"] if suite else None, inference,
                   prompt_with)

    @classmethod
    def load(cls, name: str) -> Protocol:
        file = BENCHMARKS / f"{name}.yaml"
        if not file.is_file():
            raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(available())}")
        data = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
        if data.get("name") != name:
            raise ValueError(f"{file}: name must be the file's stem, {name!r}")
        return cls.from_dict(name, data, str(file))

    def shard_sets(self, root: Path) -> tuple[list[str], list[str]]:
        """(found, missing) shard folder names under ``root``: the sets the columns score that are there, and every
        needed set (scored or prompting another) that is not; a suite's matching folders (missing: none found)."""
        if self.suite_sets is not None:
            found = sorted(p.name for p in root.glob(self.suite_sets) if (p / MANIFEST).is_file()) \
                if root.is_dir() else []
            return found, ([] if found else [self.suite_sets])
        scored = {folder for folder, _ in self.columns.values()}
        wanted = sorted(scored | set(self.prompt_with.values()))  # a prompting set is needed, not scored itself
        present = [f for f in wanted if (root / f / MANIFEST).is_file()]
        return [f for f in present if f in scored], [f for f in wanted if f not in present]


def available() -> list[str]:
    return sorted(p.stem for p in BENCHMARKS.glob("*.yaml"))


@dataclass
class Report:
    """The metrics of every evaluated shard set and the benchmarks they fill (or why not)."""

    paper_model: str = "swint"
    protocols: list[Protocol] = field(default_factory=list)
    metrics: dict[str, dict] = field(default_factory=dict)  # shard folder -> metrics (fractions)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # benchmark -> missing shard folders

    def ours(self, protocol: Protocol) -> dict[str, float | None]:
        """Our figure (x100) for each of the protocol's columns; None where it could not be computed."""
        if protocol.suite_sets is not None:
            values = [100 * self.metrics[s][protocol.suite_metric] for s in self.suite_members(protocol)
                      if protocol.suite_metric in self.metrics[s]]
            return {column: (AGGREGATES[column](values) if values else None) for column in protocol.columns}
        return {column: (100 * self.metrics[folder][metric] if metric in self.metrics.get(folder, {}) else None)
                for column, (folder, metric) in protocol.columns.items()}

    def suite_members(self, protocol: Protocol) -> list[str]:
        return sorted(s for s in self.metrics if fnmatch.fnmatch(s, protocol.suite_sets))

    def as_dict(self) -> dict:
        return {"paper_model": self.paper_model,
                "benchmarks": {p.name: {"title": p.title, "table": p.table, "ours": self.ours(p),
                                        "paper": p.paper.get(self.paper_model, {}),
                                        "sets": (self.suite_members(p) if p.suite_sets else
                                                 sorted({f for f, _ in p.columns.values()}))}
                               for p in self.protocols if p.name not in self.skipped},
                "skipped": self.skipped,
                "metrics": {name: {k: v for k, v in m.items() if k != "per_class"} for name, m in self.metrics.items()}}

    def markdown(self) -> str:
        lines = [f"Ours against the paper's {self.paper_model} figures (x100; \"-\": not reported or not computed)."]
        for table in sorted({p.table for p in self.protocols}):
            done = [p for p in self.protocols if p.table == table and p.name not in self.skipped]
            if not done:
                continue
            lines += ["", f"## Table {table}", "", "| benchmark | metric | ours | paper |", "|---|---|---|---|"]
            for protocol in done:
                ours, paper = self.ours(protocol), protocol.paper.get(self.paper_model, {})
                lines += [f"| {protocol.title} | {column} | {_cell(ours[column])} | {_cell(paper.get(column))} |"
                          for column in protocol.columns]
            for protocol in (p for p in done if p.suite_sets):
                lines += ["", f"{protocol.title}, per set ({protocol.suite_metric}, x100):", "",
                          "| set | ours |", "|---|---|"]
                lines += [f"| {s} | {_cell(100 * self.metrics[s][protocol.suite_metric])} |"
                          for s in self.suite_members(protocol) if protocol.suite_metric in self.metrics[s]]
        if self.skipped:
            lines += ["", "Skipped (not found under the data root):"]
            lines += [f"- {name}: {', '.join(missing)}" for name, missing in sorted(self.skipped.items())]
        return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


EvaluateSet = Callable[[Path, Protocol], dict]


def run_benchmarks(evaluate_set: EvaluateSet, root: str | Path, protocols: Sequence[Protocol],
                   paper_model: str = "swint") -> Report:
    """Evaluate every protocol whose shard sets are under ``root``; ``evaluate_set(dir, protocol)`` scores one shard
    set (the model, its resize and batch size are the caller's). A shard set used by several columns or benchmarks
    is evaluated once."""
    root = Path(root)
    report = Report(paper_model=paper_model, protocols=list(protocols))
    for protocol in report.protocols:
        found, missing = protocol.shard_sets(root)
        if missing:
            report.skipped[protocol.name] = missing
            log.warning("benchmark %s skipped: %s not found under %s", protocol.name, ", ".join(missing), root)
            continue
        for folder in found:
            if folder not in report.metrics:
                log.info("benchmark %s: evaluating %s", protocol.name, root / folder)
                report.metrics[folder] = evaluate_set(root / folder, protocol)
    return report


def model_evaluator(model, batch_size: int = 4, device: str = "cpu", num_workers: int = 0,
                    limit: int | None = None) -> EvaluateSet:
    """``evaluate_set`` for ``run_benchmarks``: ``model`` on one shard set at the protocol's resize (shortest edge,
    longest at most, padding to a multiple of 32) and post-processing (the model's recorded settings, then the
    protocol's ``inference``), its own vocabulary with the prompt ensemble (or, where the protocol's
    ``prompt_with`` says so, the vocabulary of another set beside it)."""
    from openseed.data.shards import ShardSet
    from openseed.evaluation.runner import evaluate_shards

    def evaluate_set(shards_dir: Path, protocol: Protocol) -> dict:
        inference = InferenceConfig.for_model(model.config, **protocol.inference)
        prompt = protocol.prompt_with.get(shards_dir.name)
        prompt_vocabulary = ShardSet.open(shards_dir.parent / prompt).vocabulary if prompt else None
        return evaluate_shards(model, shards_dir, batch_size=batch_size, device=device, num_workers=num_workers,
                               inference=inference, short_edge=protocol.short_edge, max_size=protocol.max_size,
                               limit=limit, prompt_vocabulary=prompt_vocabulary)
    return evaluate_set


def write_report(report: Report, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.json").write_text(json.dumps(report.as_dict(), indent=1))
    (out / "benchmarks.md").write_text(report.markdown())
    return out / "benchmarks.json", out / "benchmarks.md"


OPTIONS = {
    "ckpt": Option("a model file or training checkpoint", required=True, check=path),
    "root": Option("the data root holding the converted shard sets (data_prep's converters)", required=True,
                   check=path),
    "out": Option("write benchmarks.json and benchmarks.md here", required=True, check=path),
    "benchmarks": Option("protocols to run, [a,b] (default: every one in conf/benchmark)", None,
                         check=lambda value, key: string_list(value, key)),
    "paper_model": Option(f"whose paper figures to print beside ours: {', '.join(PAPER_MODELS)}", "swint",
                          check=lambda value, key: choice(value, key, PAPER_MODELS)),
    "batch_size": Option("images per forward pass", 4, integer(1)),
    "device": Option("torch device", "cpu", path),
    "num_workers": Option("loader worker processes", 0, integer(0)),
    "limit": Option("evaluate only the first N images of each set (a smoke run; null: all)", None, integer(1)),
}


@command(OPTIONS, "python -m openseed.evaluation.benchmark", __doc__)
def main(args) -> int:
    from openseed.modeling.openseed import load_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        protocols = [Protocol.load(name) for name in args.benchmarks or available()]  # before the model is read
        model = load_model(args.ckpt)
        report = run_benchmarks(model_evaluator(model, args.batch_size, args.device, args.num_workers, args.limit),
                                args.root, protocols, args.paper_model)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    json_path, md_path = write_report(report, args.out)
    print(report.markdown())
    print(f"written: {json_path}, {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
