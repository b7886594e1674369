"""Inference and evaluation input defects, each reproduced: memory of mask post-processing on large photos, box
prompts, detection results fed to the COCO evaluator, and the predict command line."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from openseed import Predictor
from openseed.core.coco import box_prompt_to_coco
from openseed.core.outputs import Outputs, Prediction
from openseed.core.vocabulary import Vocabulary
from openseed.evaluation.instances import EvaluationInputError, InstanceEvaluator, evaluate_coco
from openseed.evaluation.instances import main as instances_main
from openseed.evaluation.runner import DatasetEvaluator
from openseed.modeling.openseed import build_openseed
from openseed.modeling.postprocess import (
    MASK_MEMORY_BYTES,
    InferenceConfig,
    instance_inference,
    panoptic_inference,
    postprocess_batch,
    queries_per_chunk,
    resize_masks_to_original,
)
from openseed.predict import box_prompts, make_vocabulary
from openseed.predict import main as predict_main
from tests.test_eval_runner import _batches, _oracle

MiB = 2**20


# ---------------------------------------------------------------------------------------------------------- memory
class LargestFloatAllocation(TorchDispatchMode):
    """Records the largest floating-point tensor any torch op creates (views of an input do not count)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
                    and tensor.untyped_storage().data_ptr() not in inputs
                    and tensor.untyped_storage().nbytes() > self.bytes):
                self.bytes, self.op = tensor.untyped_storage().nbytes(), str(func)
        return out


def _outputs(num_queries: int, num_classes: int, mask_size: tuple[int, int], seed: int = 0) -> Outputs:
    """Blocky masks and one confident-ish class per query: panoptic segments, instances and ties all occur."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.full((1, num_queries, num_classes), -8.0)
    labels = torch.randint(0, num_classes, (num_queries,), generator=generator)
    logits[0, torch.arange(num_queries), labels] = torch.rand(num_queries, generator=generator) * 6
    coarse = torch.randn(1, num_queries, 4, 4, generator=generator) * 6
    masks = torch.nn.functional.interpolate(coarse, size=mask_size, mode="nearest")
    boxes = torch.rand(1, num_queries, 4, generator=generator) * 0.5 + 0.25
    final = Prediction(logits=logits, boxes=boxes, masks=masks)
    return Outputs(final=final, aux=[], proposals=final, conditioned=None, num_fg=num_queries, num_bg=0)


def _vocabulary(num_classes: int) -> Vocabulary:
    return Vocabulary.from_names([f"class {k}" for k in range(num_classes)], [k % 2 == 0 for k in range(num_classes)])


@pytest.mark.parametrize("orig", [(96, 128), (211, 297)])  # at the padded size; a bicubic upsampling
def test_chunked_postprocessing_equals_unchunked(orig):
    """A 1-byte budget (one query per chunk, two passes for panoptic) gives the same results as one chunk."""
    outputs, vocabulary = _outputs(12, 6, (24, 32), seed=4), _vocabulary(6)
    sizes = [((90, 120) if orig != (96, 128) else orig, orig)]
    common = dict(top_k=30, overlap_threshold=0.3)
    chunked = InferenceConfig(mask_memory_bytes=1, **common)
    whole = InferenceConfig(mask_memory_bytes=10**12, chunk_size=10**6, **common)
    (a,) = postprocess_batch(outputs, sizes, vocabulary, (96, 128), "instance", chunked)
    (b,) = postprocess_batch(outputs, sizes, vocabulary, (96, 128), "instance", whole)
    assert a.masks.dtype == torch.bool and a.masks.shape == (30, *orig)
    for key in ("scores", "labels", "queries", "boxes", "masks"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    (a,) = postprocess_batch(outputs, sizes, vocabulary, (96, 128), "panoptic", chunked)
    (b,) = postprocess_batch(outputs, sizes, vocabulary, (96, 128), "panoptic", whole)
    assert torch.equal(a.panoptic_seg, b.panoptic_seg) and a.segments_info == b.segments_info
    assert len(a.segments_info) == 4  # things and stuff: the overlap rule had something to decide
    # semantic scores are sums over the chunks: equal to float rounding, the argmax equal here
    (a,) = postprocess_batch(outputs, sizes, vocabulary, (96, 128), "semantic", chunked, return_semantic_scores=True)
    (b,) = postprocess_batch(outputs, sizes, vocabulary, (96, 128), "semantic", whole, return_semantic_scores=True)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-5)
    assert torch.equal(a.sem_seg, b.sem_seg)
    # the functions that take masks already at the output size chunk the same way
    full = resize_masks_to_original(outputs.final.masks[0], (96, 128), *sizes[0])
    logits, boxes = outputs.final.logits[0], torch.rand(12, 4) * 50
    one, all_ = instance_inference(logits, full, boxes, chunked), instance_inference(logits, full, boxes, whole)
    assert all(torch.equal(getattr(one, key), getattr(all_, key)) for key in ("scores", "labels", "boxes", "masks"))
    seg_one, info_one = panoptic_inference(logits, full, vocabulary.is_thing, vocabulary.ids, chunked)
    seg_all, info_all = panoptic_inference(logits, full, vocabulary.is_thing, vocabulary.ids, whole)
    assert torch.equal(seg_one, seg_all) and info_one == info_all


def test_largest_float_allocation_stays_within_the_budget():
    """A 3000 x 2000 photo with 8 queries under a 64 MiB budget: no op creates a float tensor over the budget (the old
    code allocated queries x H x W float32 = 183 MiB at once, 5.76 GB for 60 queries of a 6000 x 4000 photo)."""
    budget, orig, padded = 64 * MiB, (3000, 2000), (768, 512)
    outputs = _outputs(8, 2, (192, 128))
    outputs.final.logits[0, :, 0] = 8.0  # every query kept by panoptic, each the owner of one band of rows
    outputs.final.masks.fill_(-10.0)
    for query in range(8):
        outputs.final.masks[0, query, 24 * query: 24 * (query + 1)] = 10.0
    vocabulary = _vocabulary(2)
    cfg = InferenceConfig(mask_memory_bytes=budget, top_k=8)
    per_query = 4 * orig[0] * orig[1]
    assert 8 * per_query > 2 * budget  # one chunk of all queries would not fit
    for task in ("instance", "panoptic", "semantic"):
        with LargestFloatAllocation() as largest:
            (result,) = postprocess_batch(outputs, [(padded, orig)], vocabulary, padded, task, cfg)
        assert 0 < largest.bytes <= budget, (task, largest.bytes / MiB, largest.op)
        if task == "instance":
            assert result.masks.dtype == torch.bool and result.masks.shape == (8, *orig)
        elif task == "panoptic":
            assert result.panoptic_seg.shape == orig and len(result.segments_info) == 8
        else:
            assert result.sem_seg.shape == orig


def test_queries_per_chunk_for_a_6000_x_4000_photo():
    # 96 MB per float32 map: 2 per chunk for instances and semantic, 1 for panoptic (two maps per query)
    assert queries_per_chunk([(800, 1216), (4000, 6000)], MASK_MEMORY_BYTES, 1, cap=32) == 2
    assert queries_per_chunk([(800, 1216), (4000, 6000)], MASK_MEMORY_BYTES, 2, cap=32) == 1
    assert queries_per_chunk([(800, 1216), (427, 640)], MASK_MEMORY_BYTES, 1, cap=32) == 32  # as before
    with pytest.raises(ValueError, match="mask_memory_bytes must be positive"):
        InferenceConfig(mask_memory_bytes=0)


# ------------------------------------------------------------------------------------------------------- box prompts
@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(build_openseed("tiny"), device="cpu", image_size=64)


IMAGE = np.zeros((30, 50, 3), dtype=np.uint8)  # 50 wide, 30 high


@pytest.mark.parametrize(("box", "message"), [
    ([20, 5, 5, 20], r"box 1 \[20, 5, 5, 20\] is empty or inverted.*image 50 x 30"),
    ([5, 5, 5, 20], r"box 1 \[5, 5, 5, 20\] is empty or inverted"),
    ([5, 20, 30, 20], r"box 1 \[5, 20, 30, 20\] is empty or inverted"),
    ([5, 5, math.nan, 20], r"box 1 \[5, 5, nan, 20\] has a non-finite coordinate"),
    ([5, 5, math.inf, 20], r"box 1 \[5, 5, inf, 20\] has a non-finite coordinate"),
    ([60, 5, 80, 20], r"box 1 \[60, 5, 80, 20\] lies entirely outside the image \(image 50 x 30"),
    ([-20, -20, 0, 10], r"box 1 \[-20, -20, 0, 10\] lies entirely outside"),
    ([5, 5, 20], r"box 1 must be 4 numbers \[x0, y0, x1, y1\], got \[5, 5, 20\]"),
    ([5, "5", 20, 20], r"box 1 must be 4 numbers"),
])
def test_bad_box_prompts_are_errors(predictor, box, message):
    with pytest.raises(ValueError, match=message):
        predictor.segment_boxes(IMAGE, [[0, 0, 10, 10], box], ["a", "b"])


def test_boxes_partly_outside_are_clipped(predictor):
    result = predictor.segment_boxes(IMAGE, [[-10, 5, 60, 20], [40, 25, 55, 40]], ["a", "a"])
    assert result.boxes.tolist() == [[0, 5, 50, 20], [40, 25, 50, 30]]
    assert result.masks.shape == (2, 30, 50)
    records = box_prompt_to_coco(result, image_id=0)
    assert [r["bbox"] for r in records] == [[0, 5, 50, 15], [40, 25, 10, 5]]
    # the same checks without an image (the command line checks before loading anything)
    assert box_prompts([1, 2, 3, 4]).tolist() == [[1, 2, 3, 4]]
    with pytest.raises(ValueError, match=r"box 0 must be 4 numbers .*got \[1, 2\]"):
        box_prompts([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="boxes is empty"):
        box_prompts([])


# ------------------------------------------------------------------------------------------------------ COCO results
GT = {"images": [{"id": 1, "height": 20, "width": 20}], "categories": [{"id": 1, "name": "a"}],
      "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "area": 64, "iscrowd": 0}]}
GOOD = {"image_id": 1, "category_id": 1, "bbox": [2, 2, 8, 8], "score": 0.9}


@pytest.mark.parametrize(("change", "field"), [
    ({"score": math.inf}, "score"), ({"score": math.nan}, "score"), ({"score": "0.9"}, "score"),
    ({"score": None}, "score"), ({"score": True}, "score"),
    ({"bbox": [2, 2, math.nan, 8]}, "bbox"), ({"bbox": [2, 2, -8, 8]}, "bbox"), ({"bbox": [2, 2, 8, -1]}, "bbox"),
    ({"bbox": [2, 2, "8", 8]}, "bbox"), ({"bbox": [2, 2, 8]}, "bbox"),
])
def test_invalid_detections_are_errors_naming_file_record_and_field(tmp_path, change, field):
    bad = {**GOOD, **change}
    path = tmp_path / "results.json"
    path.write_text(json.dumps([GOOD, bad]))  # json writes inf / nan as Infinity / NaN, which json.load reads back
    with pytest.raises(EvaluationInputError, match=rf"results\.json: detection 1: field '{field}'"):
        evaluate_coco(GT, path, "bbox")
    with pytest.raises(EvaluationInputError, match=rf"^detection 1: field '{field}'"):
        evaluate_coco(GT, [GOOD, bad], "bbox")
    evaluator = InstanceEvaluator(GT, ("bbox",))
    evaluator.update([GOOD, bad])
    with pytest.raises(EvaluationInputError, match=rf"detection 1: field '{field}'"):
        evaluator.compute()


def test_detection_file_errors_on_the_command_line(tmp_path, capsys):
    (tmp_path / "gt.json").write_text(json.dumps(GT))
    (tmp_path / "dt.json").write_text(json.dumps([GOOD, {**GOOD, "score": math.inf}]))
    assert instances_main([f"gt={tmp_path / 'gt.json'}", f"dt={tmp_path / 'dt.json'}", "iou_type=bbox"]) == 2
    err = capsys.readouterr().err
    assert "dt.json: detection 1: field 'score' must be a finite number, got inf" in err
    # valid results still score: a perfect box, and a zero-size box is allowed (it matches nothing)
    result = evaluate_coco(GT, [GOOD, {**GOOD, "bbox": [0, 0, 0, 0], "score": 0.1}], "bbox")
    assert result["AP"] == pytest.approx(1.0)


def test_runner_leaves_out_non_finite_model_detections_with_a_warning(synth_shards):
    shards, batches = _batches(synth_shards["det_val"])
    evaluator = DatasetEvaluator.for_shards(shards)
    for batch in batches:
        outputs = _oracle(batch)
        outputs.final.boxes[0, 0] = math.nan  # one ground truth predicted with a NaN box
        evaluator.update(outputs, batch)
    assert evaluator.non_finite >= 1
    with pytest.warns(UserWarning, match=r"detections with a NaN or infinite score or box were left out"):
        metrics = evaluator.compute()
    assert 0 < metrics["box_AP"] < 1


# ---------------------------------------------------------------------------------------------------------- vocabulary
def test_user_vocabularies_refuse_non_strings_and_duplicates():
    with pytest.raises(ValueError, match=r"vocabulary\[0\] must be a non-empty string, got None"):
        make_vocabulary([None, "dog"])
    with pytest.raises(ValueError, match=r"vocabulary\[1\] must be a non-empty string, got True"):
        make_vocabulary(["dog", True])
    with pytest.raises(ValueError, match=r"vocabulary: duplicate class names: 'dog' \(entries 0 and 2\)"):
        make_vocabulary(["dog", "cat", " dog"])
    with pytest.raises(ValueError, match=r"'Dog' and 'dog' are the same class to the text encoder \('dog'\)"):
        make_vocabulary(["Dog", "dog"])
    with pytest.raises(ValueError, match=r"duplicate class names: 'a' \(entries 0 and 1\)"):
        Vocabulary.from_names(["a", "a"])
    with pytest.raises(ValueError, match=r"class name 1 must be a non-empty string, got None"):
        Vocabulary.from_names(["a", None])
    assert make_vocabulary(["dog", "grass"], ["grass"]).is_thing == [True, False]
    # a data set's categories may share a name under different ids: still read as before
    data = Vocabulary.from_coco_categories([{"id": 1, "name": "bank"}, {"id": 2, "name": "bank"}])
    assert data.ids == [1, 2] and data.prompt_names() == ["bank", "bank"]


# ------------------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize(("args", "message"), [
    (["images=[]", "vocabulary=[dog]"], r"images=\[\]: empty"),
    (["images=[a.jpg]", "vocabulary=[null,true]"], r"vocabulary\[0\] must be a non-empty string, got None"),
    (["images=[a.jpg]", "vocabulary=[dog,true]"], r"vocabulary\[1\] must be a non-empty string, got True"),
    (["images=[a.jpg]", "vocabulary=[dog,'']"], r"vocabulary\[1\] must be a non-empty string, got ''"),
    (["images=[a.jpg]", "vocabulary=[dog,cat,dog]"], r"duplicate class names: 'dog' \(entries 0 and 2\)"),
    (["images=[a.jpg]", "vocabulary=[dog]", "stuff=[null]"], r"stuff\[0\] must be a non-empty string"),
    (["images=[null]", "vocabulary=[dog]"], r"images\[0\] must be a non-empty string, got None"),
    (["images=[a.jpg]", "vocabulary=[dog]", "task=bogus"], r"task must be one of"),
    (["images=[a.jpg]", "vocabulary=[dog]", "image_size=big"], r"image_size must be an integer"),
    (["images=[a.jpg]", "vocabulary=[dog]", "boxes=[[1,2,3]]"], r"boxes: box 0 must be 4 numbers"),
    (["images=[a.jpg]", "vocabulary=[dog]", "boxes=[[1,2],[3,4]]"], r"boxes: box 0 must be 4 numbers"),
    (["images=[a.jpg]", "vocabulary=[dog]", "boxes=[[10,10,5,5]]"], r"boxes: box 0 \[10, 10, 5, 5\] is empty"),
    (["images=[a.jpg]", "vocabulary=[dog]", "boxes=[[1,2,3,inf]]"], r"boxes: box 0 must be 4 numbers"),
    (["images=[a.jpg]", "vocabulary=[dog]", "boxes=[[0,0,5,5],[1,1,4,4]]"], r"2 boxes, 1 names"),
])
def test_predict_command_line_checks_arguments_before_loading_the_model(tmp_path, capsys, args, message):
    code = predict_main([f"ckpt={tmp_path / 'no_model.pt'}", *args, f"out={tmp_path / 'out'}", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert "no_model.pt" not in err  # refused before the model file is looked at
    assert not (tmp_path / "out").exists()


def test_predict_command_line_with_valid_arguments_reaches_the_model(tmp_path, capsys):
    code = predict_main([f"ckpt={tmp_path / 'no_model.pt'}", "images=[a.jpg]", "vocabulary=[dog,'1984']",
                         "boxes=[[0,0,5,5],[1,1,4,4]]", "device=cpu"])
    assert code == 2 and "no_model.pt" in capsys.readouterr().err


def test_evaluation_runner_refuses_an_empty_shard_list(tmp_path, capsys):
    from openseed.evaluation.runner import main as runner_main

    assert runner_main([f"ckpt={tmp_path / 'no_model.pt'}", "shards=[]"]) == 2
    err = capsys.readouterr().err
    assert "shards=[]: empty" in err and "no_model.pt" not in err
