"""The paper-claims study's driver and gather script (experiments/paper_claims) on made-up runs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"paper_claims_{name}", ROOT / "experiments" / "paper_claims" /
                                                  f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gather = _load("gather")
study = _load("run")


def _fake_run(folder: Path, overrides: list[str], seg: dict, det: dict, step: int = 500) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    metrics = {"synthshapes_seg_val": seg, "synthshapes_det_val": det}
    (folder / "metrics.json").write_text(json.dumps({"step": step, "metrics": metrics}))


@pytest.fixture()
def fake_study(tmp_path):
    runs = tmp_path / "runs"
    for seed, pq, unseen in ((0, 0.40, 0.10), (1, 0.44, 0.12), (2, 0.48, 0.14)):
        _fake_run(runs / f"baseline-s{seed}", ["ablation=baseline", f"seed={seed}"], {"PQ": pq},
                  {"mask_AP": 0.2, "mask_AP_unseen": unseen})
    for seed, pq in ((0, 0.30), (1, 0.50)):
        _fake_run(runs / f"no_decoupled-s{seed}", ["ablation=no_decoupled", f"seed={seed}"], {"PQ": pq},
                  {"mask_AP": 0.1})
    for seed, unseen in ((0, 0.13), (1, 0.13)):  # paired with baseline seeds 0 and 1: +3.0 and +1.0
        _fake_run(runs / f"offline-s{seed}", ["ablation=baseline", f"seed={seed}", "data.det_masks=true"],
                  {"PQ": 0.4}, {"mask_AP": 0.2, "mask_AP_unseen": unseen})
    (runs / "no_conditioned-s0" / ".hydra").mkdir(parents=True)  # started, never finished
    (tmp_path / "box_prompts").mkdir()
    for seed, unseen, ap in ((0, 0.50, 0.6), (1, 0.60, 0.6)):
        (tmp_path / "box_prompts" / f"baseline-s{seed}.json").write_text(json.dumps(
            {"run": f"baseline-s{seed}", "mask_AP": ap, "mask_AP50": 0.9, "mIoU": 0.7, "mask_AP_unseen": unseen}))
    return tmp_path


def _section(text: str, title: str) -> list[list[str]]:
    body = text.split(f"## {title}")[1].split("\n## ")[0]
    return [[c.strip() for c in line.strip("|").split("|")] for line in body.splitlines() if line.startswith("|")]


def test_tables_give_mean_and_sample_std_over_seeds(fake_study, tmp_path):
    assert gather.main([f"study={fake_study}", f"out={tmp_path / 'out'}"]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    table9 = {row[0]: row for row in _section(text, "Table 9")[2:]}
    assert list(table9) == ["baseline", "no_decoupled"]  # offline is Table 7's; the unfinished run is listed below
    assert table9["baseline"][1:4] == ["0,1,2", "500", "44.0 ± 4.0"]
    assert table9["no_decoupled"][3] == "40.0 ± 14.1"
    table7 = {row[0]: row for row in _section(text, "Table 7")[2:]}
    mask_unseen = -1  # the last column
    assert table7["offline"][mask_unseen] == "13.0 ± 0.0"
    assert table7["offline - baseline (paired)"][mask_unseen] == "2.0 ± 1.4"
    table1 = _section(text, "Table 1")[2:]
    assert table1[0] == ["0", "20.0", "60.0", "10.0", "50.0", "5.0x", "70.0"]
    assert table1[1][5] == "5.0x" and table1[2][0] == "mean ± std" and table1[2][5] == "5.0 ± 0.0x"
    assert "unfinished or crashed): no_conditioned-s0" in text
    assert (tmp_path / "out" / "claims.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_records_carry_a_study_across_machines(fake_study, tmp_path, capsys):
    first = tmp_path / "first"
    assert gather.main([f"study={fake_study}", f"out={first}"]) == 0
    records = json.loads((first / "records.json").read_text())
    assert {r["name"] for r in records["runs"]} == {"baseline-s0", "baseline-s1", "baseline-s2", "no_decoupled-s0",
                                                    "no_decoupled-s1", "offline-s0", "offline-s1"}
    # the records alone give the same tables (the run folders are gone)
    capsys.readouterr()
    assert gather.main([f"records=[{first / 'records.json'}]", f"out={tmp_path / 'again'}"]) == 0
    again = (tmp_path / "again" / "results.md").read_text()
    assert again.split("## Every run")[0] == (first / "results.md").read_text().split("## Every run")[0]
    assert "From records, not run folders here" in again and "box prompts of baseline-s1" in again
    # a new machine reruns one seed: its run folder replaces the record, and a changed figure is printed
    later = tmp_path / "later"
    _fake_run(later / "runs" / "baseline-s2", ["ablation=baseline", "seed=2"], {"PQ": 0.47},
              {"mask_AP": 0.2, "mask_AP_unseen": 0.14})
    _fake_run(later / "runs" / "no_conditioned-s0", ["ablation=no_conditioned", "seed=0"], {"PQ": 0.41}, {})
    capsys.readouterr()
    assert gather.main([f"study={later}", f"records=[{first / 'records.json'}]", f"out={tmp_path / 'all'}"]) == 0
    err = capsys.readouterr().err
    assert "baseline-s2: run folder replaces the record" in err and "seg_val/PQ 48.00 -> 47.00" in err
    merged = json.loads((tmp_path / "all" / "records.json").read_text())
    by_name = {r["name"]: r for r in merged["runs"]}
    assert len(by_name) == 8 and by_name["baseline-s2"]["metrics"]["seg_val"]["PQ"] == 0.47
    assert str(later / "runs" / "no_conditioned-s0") in by_name["no_conditioned-s0"]["source"]
    table9 = {row[0]: row for row in _section((tmp_path / "all" / "results.md").read_text(), "Table 9")[2:]}
    assert table9["baseline"][3] == "43.7 ± 3.5" and table9["no_conditioned"][1:4] == ["0", "500", "41.0"]


def test_an_offline_run_pairs_with_its_teacher_when_it_is_not_the_recorded_baseline(fake_study, tmp_path):
    # seed 1's pseudo masks came from a baseline trained again on another machine (unseen mask AP 0.115, not 0.12)
    _fake_run(fake_study / "runs" / "teacher-s1", ["ablation=baseline", "seed=1"], {"PQ": 0.43},
              {"mask_AP": 0.2, "mask_AP_unseen": 0.115})
    assert gather.describe(fake_study / "runs" / "teacher-s1") == ("teacher", 1)
    assert gather.main([f"study={fake_study}", f"out={tmp_path / 'out'}"]) == 0
    text = (tmp_path / "out" / "results.md").read_text()
    table9 = {row[0]: row for row in _section(text, "Table 9")[2:]}
    assert table9["baseline"][1:4] == ["0,1,2", "500", "44.0 ± 4.0"]  # the teacher is not a Table 9 baseline
    table7 = {row[0]: row for row in _section(text, "Table 7")[2:]}
    assert table7["teacher"][1:4] == ["1", "500", "43.0"]
    assert table7["offline - its teacher (paired)"][-1] == "2.2 ± 1.1"  # +3.0 (seed 0), +1.5 (seed 1)


def test_records_rounded_in_a_table_compare_within_their_rounding(capsys):
    record = {"resolution": 0.001, ("seg_val", "PQ"): 0.458}
    assert gather.differences(record, {("seg_val", "PQ"): 0.45812}, [("seg_val", "PQ")]) == []
    assert gather.differences(record, {("seg_val", "PQ"): 0.4592}, [("seg_val", "PQ")]) == ["seg_val/PQ 45.80 -> 45.92"]


def test_a_broken_records_file_is_an_error_naming_it(tmp_path):
    bad = tmp_path / "records.json"
    bad.write_text(json.dumps({"runs": [{"name": "baseline-s0"}]}))
    with pytest.raises(SystemExit, match=f"{bad}: not a records file"):
        gather.main([f"records=[{bad}]"])


def test_the_variant_comes_from_the_overrides_not_the_folder_name(tmp_path):
    _fake_run(tmp_path / "7", ["ablation=no_mask_assistance", "seed=4"], {}, {})
    _fake_run(tmp_path / "8", [], {}, {})
    assert gather.describe(tmp_path / "7") == ("no_mask_assistance", 4)
    assert gather.describe(tmp_path / "8") == ("baseline", 0)


def test_driver_keeps_finished_runs_and_stops_on_a_failed_one(tmp_path, capsys):
    _fake_run(tmp_path / "runs" / "baseline-s0", ["ablation=baseline", "seed=0"], {}, {})
    assert study.main([f"out={tmp_path}", "stages=[ablations]", "only=[baseline]", "seeds=[0]"]) == 0
    assert "baseline-s0: finished before, kept" in capsys.readouterr().out
    # a run that cannot start (a bad value: openseed.train exits 2 before any data or model) stops the study
    code = study.main([f"out={tmp_path}", "stages=[ablations]", "only=[no_decoupled]", "seeds=[0]",
                       "overrides=[trainer.max_epochs=two]"])
    assert code == 1
    err = capsys.readouterr().err
    log = tmp_path / "runs" / "no_decoupled-s0" / "driver.log"
    assert f"(log: {log})" in err and "max_epochs" in log.read_text()
    assert not (tmp_path / "runs" / "no_decoupled-s0" / "metrics.json").exists()
    # the next attempt moves the stopped run's folder aside before it starts afresh
    assert study.main([f"out={tmp_path}", "stages=[ablations]", "only=[no_decoupled]", "seeds=[0]",
                       "overrides=[trainer.max_epochs=two]"]) == 1
    (aside,) = (tmp_path / "aborted").iterdir()
    assert aside.name.startswith("no_decoupled-s0-") and (aside / "driver.log").is_file()


def test_crowded_study_trains_the_crowded_experiment_on_its_own_shards(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(study, "_run", lambda command, log_file: commands.append(command))
    monkeypatch.setattr(study, "eval_size", lambda run: 160)
    teacher = tmp_path / "runs" / "baseline-s0"
    _fake_run(teacher, ["ablation=baseline", "seed=0"], {}, {})
    assert study.main(["variant=crowded", f"out={tmp_path}", "stages=[ablations,offline]", "only=[no_decoupled]",
                       "seeds=[0]", "overrides=[trainer.max_epochs=1]"]) == 0
    ablation, pseudo, offline = commands
    assert "experiment=synthshapes_crowded" in ablation and "ablation=no_decoupled" in ablation
    assert ablation.index("experiment=synthshapes_crowded") < ablation.index("trainer.max_epochs=1")
    shards = ROOT / "data" / "synthshapes_crowded" / "shards"
    assert f"shards={shards / 'det_train'}" in pseudo and "device=cpu" in pseudo
    assert "experiment=synthshapes_crowded" in offline and "data.det_masks=true" in offline
    # the standard study names no experiment (the default, synthshapes_joint) and reads data/synthshapes
    commands.clear()
    assert study.main([f"out={tmp_path / 'std'}", "stages=[ablations]", "only=[baseline]", "seeds=[0]"]) == 0
    assert not [c for c in commands[0] if c.startswith("experiment=")]
    assert study.data_folder("standard") == ROOT / "data" / "synthshapes" / "shards"


def test_offline_stage_needs_the_baseline_first(tmp_path, capsys):
    assert study.main([f"out={tmp_path}", "stages=[offline]", "seeds=[3]"]) == 1
    assert "baseline-s3 has not finished" in capsys.readouterr().err
    assert study.main(["stages=[everything]"]) == 2
    assert "stages[0] must be one of ['ablations', 'box_prompts', 'offline']" in capsys.readouterr().err
    assert study.main(["only=[no_decoupled,typo]"]) == 2 and "only[1] must be one of" in capsys.readouterr().err
    assert study.main(["seeds=[0,-1]"]) == 2 and "seeds[1] must be an integer >= 0" in capsys.readouterr().err
    assert gather.main([]) == 2 and "give a study folder" in capsys.readouterr().err


def test_documented_commands_exist():
    readme = (ROOT / "experiments" / "paper_claims" / "README.md").read_text()
    assert "python experiments/paper_claims/run.py" in readme and "python experiments/paper_claims/gather.py" in readme
    done = subprocess.run([sys.executable, "experiments/paper_claims/run.py", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "  stages " in done.stdout and "(default ['ablations', 'box_prompts'" in done.stdout
