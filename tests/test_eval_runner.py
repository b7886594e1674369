"""Evaluating on converted data sets: oracle predictions built from the ground truth score perfectly."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from openseed.core.boxes import targets_to_model_boxes
from openseed.core.outputs import Outputs, Prediction
from openseed.data.datamodule import EvalDataset
from openseed.data.shards import ShardSet
from openseed.data.transforms import EvalResize
from openseed.evaluation.runner import DatasetEvaluator, evaluate_shards, main
from openseed.modeling.checkpoint import save_model
from openseed.modeling.openseed import build_openseed


def _batches(path):
    shards = ShardSet.open(path)
    dataset = EvalDataset(shards, 2, EvalResize(None, 160), 0, 1, pad_to=(160, 160))
    return shards, list(DataLoader(dataset, batch_size=None))


def _oracle(batch, drop_every=0):
    """Outputs with one confident query per ground truth (full-resolution masks), plus empty queries."""
    size = tuple(batch.images.shape[-2:])
    queries = max(len(t) for t in batch.targets) + 2
    vocab_size = len(batch.vocabulary)
    logits = torch.full((len(batch), queries, vocab_size), -20.0)
    boxes = torch.full((len(batch), queries, 4), 0.5)
    masks = torch.full((len(batch), queries, *size), -20.0)
    for i, target in enumerate(batch.targets):
        for j in range(len(target)):
            if drop_every and j % drop_every == 0:
                continue
            logits[i, j, target.labels[j]] = 20.0
            boxes[i, j] = targets_to_model_boxes(target.boxes[j: j + 1], size)[0]
            if target.masks is not None:
                masks[i, j][target.masks[j]] = 20.0
            else:
                x0, y0, x1, y1 = target.boxes[j].round().long().tolist()
                masks[i, j, y0:y1, x0:x1] = 20.0
    final = Prediction(logits, boxes, masks)
    return Outputs(final=final, aux=[], proposals=final, conditioned=None, num_fg=queries, num_bg=0)


@pytest.mark.parametrize("split", ["seg_val", "det_val"])
def test_oracle_predictions_score_perfectly(synth_shards, split):
    shards, batches = _batches(synth_shards[split])
    evaluator = DatasetEvaluator.for_shards(shards)
    for batch in batches:
        evaluator.update(_oracle(batch), batch)
    metrics = evaluator.compute()
    assert metrics["box_AP"] == pytest.approx(1.0) and metrics["mask_AP"] == pytest.approx(1.0)
    if split == "seg_val":
        assert metrics["PQ"] == pytest.approx(1.0) and metrics["PQ_stuff"] == pytest.approx(1.0)
        assert metrics["mIoU"] == pytest.approx(1.0)
        assert set(metrics["per_class"]["PQ"]) == set(shards.vocabulary.names)


def test_missing_predictions_lower_every_metric(synth_shards):
    shards, batches = _batches(synth_shards["seg_val"])
    evaluator = DatasetEvaluator.for_shards(shards)
    for batch in batches:
        evaluator.update(_oracle(batch, drop_every=2), batch)
    metrics = evaluator.compute()
    assert 0.2 < metrics["PQ"] < 0.9 and 0.2 < metrics["box_AP"] < 0.9 and metrics["mIoU"] < 0.95


def test_evaluate_a_model_on_shards_and_the_command_line(synth_shards, tmp_path, capsys):
    torch.manual_seed(0)
    model = build_openseed("tiny")
    metrics = evaluate_shards(model, synth_shards["seg_val"], image_size=160, batch_size=4)
    assert {"PQ", "SQ", "RQ", "PQ_things", "PQ_stuff", "mIoU", "box_AP", "mask_AP"} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k != "per_class")
    save_model(model, tmp_path / "m.pt")
    assert main([f"ckpt={tmp_path / 'm.pt'}", f"shards=[{synth_shards['det_val']}]", "image_size=160",
                 "json=true"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result[str(synth_shards["det_val"])]) >= {"box_AP", "mask_AP"}
    assert main(["shards=[x]"]) == 2


def test_instances_drop_stuff_after_the_topk(synth_shards):
    """As the reference on panoptic data: the top-k runs over every class, the stuff pairs go afterwards, so an image
    keeps only the thing pairs among its top k (fewer than k when stuff is among them)."""
    from openseed.modeling.postprocess import InferenceConfig

    shards, batches = _batches(synth_shards["seg_val"])
    top_k = 3
    evaluator = DatasetEvaluator.for_shards(shards, InferenceConfig(top_k=top_k))
    thing = torch.tensor(shards.vocabulary.is_thing)
    expected, fewer = {}, 0
    for batch in batches:
        outputs = _oracle(batch)
        evaluator.update(outputs, batch)
        for target, logits in zip(batch.targets, outputs.final.logits):
            order = torch.sort(logits.sigmoid().flatten(), descending=True, stable=True).indices[:top_k]
            labels = order % logits.shape[1]
            expected[target.image_id] = sorted(shards.vocabulary.ids[int(c)] for c in labels[thing[labels]])
            fewer += len(expected[target.image_id]) < top_k
    got = {}
    for record in evaluator.detections:
        got.setdefault(record["image_id"], []).append(record["category_id"])
    assert {k: sorted(v) for k, v in got.items()} == {k: v for k, v in expected.items() if v}
    assert fewer > 0  # stuff was among some image's top k: those images have fewer than k detections
