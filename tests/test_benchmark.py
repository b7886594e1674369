"""The benchmark protocols (conf/benchmark) and the suite command: which sets fill which of the paper's columns, the
paper's figures beside ours, missing sets skipped, every set scored at its protocol's size."""

import json
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from data_prep.shard_writer import encode_semantic, write_shards
from openseed.config import CONF
from openseed.core.vocabulary import Vocabulary
from openseed.data.coco import ImageRecord
from openseed.evaluation import benchmark as B
from openseed.evaluation.runner import DatasetEvaluator, evaluate_shards
from openseed.modeling.checkpoint import save_model
from openseed.modeling.openseed import build_openseed, load_model

# The paper's figures as ../shared/SPEC.md section 6 records them: (benchmark, paper model) -> column -> value.
SPEC = {("ade20k", "swint"): {"PQ": 19.8, "mask AP": 14.1, "box AP": 17.0, "mIoU": 22.9},
        ("ade20k", "swinl"): {"PQ": 19.7, "mask AP": 15.0, "box AP": 17.7, "mIoU": 23.4},
        ("cityscapes", "swint"): {"PQ": 37.3, "mask AP": 26.2, "mIoU": 46.1},
        ("cityscapes", "swinl"): {"PQ": 41.4, "mask AP": 33.2, "mIoU": 47.8},
        ("lvis", "swint"): {"mask AP": 19.4, "box AP": 21.8}, ("lvis", "swinl"): {"mask AP": 21.0, "box AP": 23.0},
        ("seginw", "swint"): {"median": 21.5, "average": 33.9}, ("seginw", "swinl"): {"median": 38.7, "average": 36.1},
        ("odinw", "swint"): {"average": 14.2, "median": 3.1}, ("odinw", "swinl"): {"average": 15.2, "median": 5.0}}


def test_every_protocol_loads_with_the_papers_figures():
    names = B.available()
    assert set(names) == {"ade20k", "ade20k_full", "bdd100k", "cityscapes", "lvis", "odinw", "scannet", "seginw",
                          "sunrgbd"}
    protocols = {name: B.Protocol.load(name) for name in names}
    for (name, model), figures in SPEC.items():
        assert protocols[name].paper[model] == figures, (name, model)
    for protocol in protocols.values():  # figures not in the SPEC are not invented
        if not any(key[0] == protocol.name for key in SPEC):
            assert protocol.paper == {"swint": {}, "swinl": {}}, protocol.name
    assert (protocols["ade20k"].short_edge, protocols["ade20k"].max_size) == (640, 2560)
    assert (protocols["cityscapes"].short_edge, protocols["cityscapes"].max_size) == (1024, 2048)
    assert protocols["seginw"].suite_metric == "mask_AP" and protocols["odinw"].suite_metric == "box_AP"
    assert protocols["ade20k"].columns["mask AP"] == ("ade20k_instance_val", "mask_AP")
    # LVIS's protocol scores up to 300 detections per image; the others keep the model's recorded settings
    assert protocols["lvis"].inference == {"top_k": 300}
    assert all(p.inference == {} for name, p in protocols.items() if name != "lvis")
    # ADE20K's instance AP inside the 150-class panoptic run, as the reference scores it; Cityscapes' instance set
    # is prompted with its own 8 thing names, as the reference prompts cityscapes_fine_instance_seg_val
    assert protocols["ade20k"].prompt_with == {"ade20k_instance_val": "ade20k_panoptic_val"}
    assert all(p.prompt_with == {} for name, p in protocols.items() if name != "ade20k")


def test_a_protocol_file_with_a_mistake_is_named():
    with pytest.raises(ValueError, match="x.yaml: missing key 'resize'"):
        B.Protocol.from_dict("x", {"title": "X", "table": 2, "paper": {}}, "x.yaml")
    with pytest.raises(ValueError, match="name columns it does not have: \\['PQ'\\]"):
        B.Protocol.from_dict("x", {"title": "X", "table": 2, "resize": {"short_edge": 1, "max_size": 2},
                                   "columns": {"mIoU": ["s", "mIoU"]}, "paper": {"swint": {"PQ": 1}}})
    with pytest.raises(ValueError, match="unknown benchmark 'ade'; known: ade20k, ade20k_full"):
        B.Protocol.load("ade")
    base = {"title": "X", "table": 2, "resize": {"short_edge": 1, "max_size": 2}, "columns": {"mIoU": ["s", "mIoU"]},
            "paper": {}}
    with pytest.raises(ValueError, match="x.yaml: unknown inference settings \\['topk'\\]"):
        B.Protocol.from_dict("x", {**base, "inference": {"topk": 300}}, "x.yaml")
    with pytest.raises(ValueError, match="x.yaml: prompt_with names sets that no column reads: \\['t'\\]"):
        B.Protocol.from_dict("x", {**base, "prompt_with": {"t": "s"}}, "x.yaml")


def test_the_protocols_inference_settings_reach_the_evaluation(monkeypatch, tmp_path):
    from openseed.evaluation import runner

    seen = []
    monkeypatch.setattr(runner, "evaluate_shards", lambda model, folder, **kw: seen.append(kw) or {})
    model = build_openseed("tiny")
    evaluate_set = B.model_evaluator(model)
    evaluate_set(tmp_path, B.Protocol.load("lvis"))
    evaluate_set(tmp_path, B.Protocol.load("sunrgbd"))
    recorded = model.config.test_top_k or 100
    assert [kw["inference"].top_k for kw in seen] == [300, recorded]
    assert seen[0]["inference"].clip_boxes == seen[1]["inference"].clip_boxes  # the rest as the model records it
    assert seen[0]["prompt_vocabulary"] is None


def test_prompt_with_reads_the_other_sets_vocabulary(sun_root, monkeypatch):
    from openseed.evaluation import runner

    seen = []
    monkeypatch.setattr(runner, "evaluate_shards", lambda model, folder, **kw: seen.append(kw) or {})
    protocol = B.Protocol.from_dict("x", {"title": "X", "table": 2, "resize": {"short_edge": 8, "max_size": 16},
                                          "columns": {"AP": ["things_val", "mask_AP"]}, "paper": {},
                                          "prompt_with": {"things_val": "sunrgbd_val"}})
    assert protocol.shard_sets(sun_root / "data") == ([], ["things_val"])  # the prompting set is not scored itself
    B.model_evaluator(build_openseed("tiny"))(sun_root / "data" / "things_val", protocol)
    assert seen[0]["prompt_vocabulary"].names == ["wall", "floor", "bed"]


def _fake_set(root: Path, name: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "manifest.json").write_text("{}")


def test_run_benchmarks_fills_columns_skips_missing_sets_and_aggregates_suites(tmp_path):
    for name in ("ade20k_panoptic_val", "ade20k_instance_val", "ade20k_semantic_val", "seginw_a_valid",
                 "seginw_b_valid", "seginw_c_valid",
                 "seginw_c_train"):
        _fake_set(tmp_path, name)
    figures = {"ade20k_panoptic_val": {"PQ": 0.2, "mIoU": 0.5, "mask_AP": 0.9}, "ade20k_semantic_val": {"mIoU": 0.3},
               "ade20k_instance_val": {"mask_AP": 0.15, "box_AP": 0.16},
               "seginw_a_valid": {"mask_AP": 0.1}, "seginw_b_valid": {"mask_AP": 0.4},
               "seginw_c_valid": {"mask_AP": 0.7}}
    calls = []

    def evaluate_set(folder, protocol):
        calls.append((folder.name, protocol.short_edge, protocol.max_size))
        return dict(figures[folder.name])

    report = B.run_benchmarks(evaluate_set, tmp_path, [B.Protocol.load(n) for n in ("ade20k", "cityscapes", "seginw")])
    assert sorted(calls) == [("ade20k_instance_val", 640, 2560), ("ade20k_panoptic_val", 640, 2560),
                             ("ade20k_semantic_val", 640, 2560),
                             ("seginw_a_valid", 800, 1333), ("seginw_b_valid", 800, 1333),
                             ("seginw_c_valid", 800, 1333)]  # each set once, at its protocol's size; not c_train
    assert report.skipped == {"cityscapes": ["cityscapes_instance_val", "cityscapes_panoptic_val"]}
    ade = report.ours(B.Protocol.load("ade20k"))
    assert ade == pytest.approx({"PQ": 20.0, "mask AP": 15.0, "box AP": 16.0, "mIoU": 30.0})
    assert report.ours(B.Protocol.load("seginw")) == pytest.approx({"median": 40.0, "average": 40.0})
    written = json.loads(json.dumps(report.as_dict()))
    assert written["benchmarks"]["ade20k"]["paper"] == SPEC["ade20k", "swint"]
    assert written["benchmarks"]["seginw"]["sets"] == ["seginw_a_valid", "seginw_b_valid", "seginw_c_valid"]
    assert "cityscapes" not in written["benchmarks"]
    text = report.markdown()
    assert "| ADE20K-150 | mask AP | 15.0 | 14.1 |" in text and "| SegInW | median | 40.0 | 21.5 |" in text
    assert "| seginw_b_valid | 40.0 |" in text
    assert "- cityscapes: cityscapes_instance_val, cityscapes_panoptic_val" in text
    swinl = B.run_benchmarks(evaluate_set, tmp_path, [B.Protocol.load("ade20k")], paper_model="swinl").markdown()
    assert "| ADE20K-150 | PQ | 20.0 | 19.7 |" in swinl


@pytest.fixture(scope="module")
def sun_root(tmp_path_factory):
    """A tiny semantic set named as the SUN RGB-D protocol reads it, and a tiny model file."""
    root = tmp_path_factory.mktemp("bench")
    vocab = Vocabulary.from_coco_categories([{"id": c, "name": n, "isthing": 0}
                                             for c, n in enumerate(("wall", "floor", "bed"), start=1)])
    records = []
    for k in range(3):
        path = root / f"img{k}.png"
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
        np.save(path.with_suffix(".npy"), np.repeat(np.arange(60) // 20 + 1, 40).reshape(60, 40).T)
        records.append(ImageRecord(k, path, 40, 60, []))
    write_shards(records, partial(encode_semantic, vocab=vocab, dataset="sunrgbd_val", read=_read_npy),
                 root / "data" / "sunrgbd_val", "sunrgbd_val", "sem", "semantic", vocab, progress=False)
    model = root / "tiny.pt"
    save_model(build_openseed("tiny"), model)
    return root


def _read_npy(record):
    path = record.image_path.with_suffix(".npy")
    return np.load(path), path


def test_suite_command_scores_the_sets_found_at_the_protocols_size(sun_root, tmp_path, monkeypatch, capsys):
    sizes = []
    update = DatasetEvaluator.update

    def recording(self, outputs, batch):
        sizes.extend(t.image_size for t in batch.targets)
        return update(self, outputs, batch)

    monkeypatch.setattr(DatasetEvaluator, "update", recording)
    out = tmp_path / "out"
    assert B.main([f"ckpt={sun_root / 'tiny.pt'}", f"root={sun_root / 'data'}", f"out={out}",
                   "benchmarks=[sunrgbd,ade20k]", "batch_size=2"]) == 0
    assert sizes == [(512, 768)] * 3  # 40 x 60 -> shortest edge 512 (the reference's SUN size)
    written = json.loads((out / "benchmarks.json").read_text())
    assert written["skipped"] == {"ade20k": ["ade20k_instance_val", "ade20k_panoptic_val", "ade20k_semantic_val"]}
    ours = written["benchmarks"]["sunrgbd"]["ours"]["mIoU"]
    model = load_model(sun_root / "tiny.pt")
    direct = evaluate_shards(model, sun_root / "data" / "sunrgbd_val", batch_size=2, short_edge=512, max_size=1024)
    assert ours == pytest.approx(100 * direct["mIoU"])
    assert 0 <= ours <= 100 and written["metrics"]["sunrgbd_val"]["mIoU"] == pytest.approx(direct["mIoU"])
    assert "| SUN RGB-D | mIoU |" in (out / "benchmarks.md").read_text()
    assert B.main([f"ckpt={sun_root / 'tiny.pt'}", f"root={sun_root}", f"out={out}", "benchmarks=[nope]"]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err


def test_evaluate_runs_one_benchmark(sun_root, tmp_path):
    from openseed.evaluate import evaluate

    overrides = ["benchmark=sunrgbd", f"benchmark_root={sun_root / 'data'}", f"ckpt_path={sun_root / 'tiny.pt'}",
                 "benchmark_batch_size=3"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path / "eval")
    metrics = evaluate(cfg)
    assert set(metrics) == {"sunrgbd_val"} and 0.0 <= metrics["sunrgbd_val"]["mIoU"] <= 1.0
    assert json.loads((tmp_path / "eval" / "benchmarks.json").read_text())["benchmarks"]["sunrgbd"]["table"] == 2
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides[1:] + ["benchmark=cityscapes"], return_hydra_config=True)
    with pytest.raises(FileNotFoundError, match="cityscapes_instance_val, cityscapes_panoptic_val not found under"):
        evaluate(cfg)
