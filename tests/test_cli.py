"""openseed.cli: declared key=value command lines (parse_options) and the --help of every tool that declares them."""

import importlib.util
import sys
from pathlib import Path

import pytest

from openseed.cli import Option, UsageError, integer, one_of, parse_options, path, usage

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "src": Option("input file", required=True, check=path),
    "count": Option("how many", 8, integer(1)),
    "mode": Option("fast or exact", "fast", one_of(["fast", "exact"])),
    "limit": Option("at most this many (null: all)", None, integer(1)),
    "progress": Option("show a bar", True),
}


def test_values_are_checked_and_defaults_filled():
    args = parse_options(["src=2024", "count=3", "progress=false"], OPTIONS, "tool", "Does a thing.")
    assert vars(args) == {"src": "2024", "count": 3, "mode": "fast", "limit": None, "progress": False}
    assert parse_options(["src=a", "limit=null"], OPTIONS, "tool", "").limit is None  # a None default stays None


@pytest.mark.parametrize(("argv", "message"), [
    (["count=3"], "missing ['src']"),
    (["src=a", "count=0"], "count must be an integer >= 1, got 0"),
    (["src=a", "count=2.5"], "count must be an integer >= 1, got 2.5"),
    (["src=a", "mode=slow"], "mode must be one of ['fast', 'exact'], got 'slow'"),
    (["src=a", "progress=1"], "progress must be true or false, got 1"),
    (["src=a", "--count", "3"], "'--count' is not a key=value word"),
    (["src=a", "count"], "'count' is not a key=value word"),
    (["src=a", "count=null"], "count must be an integer >= 1, got None"),
    (["src=[a,b]"], "src must be a path"),
])
def test_mistakes_name_the_key(argv, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        parse_options(argv, OPTIONS, "tool", "")


@pytest.mark.parametrize("word", ["--help", "-h", "help"])
def test_help_lists_every_key_and_exits_0(word, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_options(["count=oops", word], OPTIONS, "python -m tool", "Does a thing.")
    assert stopped.value.code == 0
    assert capsys.readouterr().out == usage("python -m tool", "Does a thing.", OPTIONS) + "\n"
    lines = usage("python -m tool", "Does a thing.", OPTIONS).splitlines()
    assert lines[0] == "usage: python -m tool src=... [key=value ...]" and lines[2] == "Does a thing."
    assert lines[5:] == ["  src       input file (required)", "  count     how many (default 8)",
                         "  mode      fast or exact (default fast)",
                         "  limit     at most this many (null: all) (default null)",
                         "  progress  show a bar (default true)"]


TOOLS = ["openseed/predict.py", "openseed/convert_checkpoint.py", "openseed/annotate/__main__.py",
         "openseed/evaluation/instances.py",
         "openseed/evaluation/panoptic.py", "openseed/evaluation/runner.py", "openseed/evaluation/box_prompts.py",
         "openseed/evaluation/benchmark.py", "openseed/evaluation/oracle.py",
         "openseed/ops/benchmark.py", "data_prep/coco_detection_to_shards.py", "data_prep/coco_panoptic_to_shards.py",
         "data_prep/inspect_shards.py", "data_prep/ade20k.py", "data_prep/cityscapes.py", "data_prep/lvis.py",
         "data_prep/roboflow_sets.py",
         "data_prep/bdd100k.py", "data_prep/sunrgbd.py", "data_prep/scannet.py",
         "data_prep/prepare_synthshapes.py", "data_prep/pseudo_masks.py", "data_prep/synthetic.py",
         "data_prep/benchmark.py", "experiments/paper_claims/run.py", "experiments/paper_claims/gather.py",
         "experiments/model_profile/measure.py", "experiments/model_profile/predictor_latency.py",
         "experiments/model_profile/annotate_latency.py",
         "experiments/reference_weights/latency.py", "experiments/reference_weights/layout_checkpoint.py",
         "experiments/reference_weights/parity_table.py", "experiments/reliability/kill_during_save.py"]


def _load(relative: str):
    if relative.startswith(("data_prep/", "openseed/")):
        return importlib.import_module(relative[:-3].replace("/", "."))
    spec = importlib.util.spec_from_file_location(f"_tool_{Path(relative).stem}", ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str((ROOT / relative).parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str((ROOT / relative).parent))
    return module


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_answers_help_and_names_a_wrong_key(tool, capsys):
    main = _load(tool).main
    with pytest.raises(SystemExit) as stopped:
        main(["--help"])
    out = capsys.readouterr().out
    assert stopped.value.code == 0 and out.startswith("usage: ") and "\nkeys:\n" in out
    assert main(["no_such_key=1"]) == 2
    assert "unknown keys ['no_such_key']" in capsys.readouterr().err
