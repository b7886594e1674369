"""Post-processing parity: the recorded raw outputs of the reference's small models, run through openseed's
post-processing, give the reference's panoptic, semantic and instance results (../shared/reference/README.md,
"Post-processing").

Cases: ``expected.npz`` of each architecture (real forward passes on the fixture photo) and
``expected_postprocess_synthetic_head.npz`` (synthetic head outputs: 16 panoptic segments, stuff merging). Sizes:
padded 800 x 1216, resized 800 x 1199, original 427 x 640; vocabulary: the 10 names, things first, ids 0-9.
Tolerances as the README: panoptic results exactly, ``sem_seg`` (stored as float16) at rtol 2e-3, instance scores and
boxes at atol = rtol = 1e-4, instance masks exactly; instances compared as sets (the reference's top-k is unsorted).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from openseed.core.outputs import Outputs, Prediction
from openseed.core.vocabulary import Vocabulary
from openseed.modeling.postprocess import InferenceConfig, postprocess_batch
from tests._reference import (
    ARCHITECTURES,
    assert_instances_match,
    assert_panoptic_matches,
    assert_semantic_matches,
    load_npz,
    meta,
)

CASES = [(arch, "expected.npz") for arch in ARCHITECTURES] + [("swint_decouple",
                                                                 "expected_postprocess_synthetic_head.npz")]
IDS = [f"{arch}/{name.removesuffix('.npz')}" for arch, name in CASES]


@cache
def _case(arch: str, name: str) -> tuple[dict, dict]:
    expected = load_npz(arch, name)
    return expected, meta(expected)


def _setup(arch: str, name: str):
    """(expected arrays, Outputs of batch 1, vocabulary, padded size, [(image_size, orig_size)], config)."""
    expected, info = _case(arch, name)
    names = list(info["names"])
    assert names == list(info["things"]) + list(info["stuff"])
    vocabulary = Vocabulary.from_names(names, [n in info["things"] for n in names])
    assert vocabulary.ids == list(range(10))
    final = Prediction(logits=torch.from_numpy(expected["pred_logits"])[None],
                       boxes=torch.from_numpy(expected["pred_boxes"])[None],
                       masks=torch.from_numpy(expected["pred_masks"])[None])
    num_fg, num_bg = int(info["num_queries_test_fg"]), int(info.get("num_queries_stuff_bg") or 0)
    assert final.logits.shape[1] == num_fg + num_bg
    outputs = Outputs(final=final, aux=[], proposals=final, conditioned=None, num_fg=num_fg, num_bg=num_bg)
    padded, image_size, orig = (tuple(info[key]) for key in ("padded_hw", "input_hw", "orig_hw"))
    assert padded == (800, 1216) and image_size == (800, 1199) and orig == (427, 640)
    assert padded == (4 * final.masks.shape[-2], 4 * final.masks.shape[-1])
    cfg = InferenceConfig(top_k=int(info.get("test_topk_per_image", 100)), clip_boxes=False)
    return expected, outputs, vocabulary, padded, [(image_size, orig)], cfg


@pytest.mark.parametrize(("arch", "name"), CASES, ids=IDS)
def test_panoptic_matches_the_reference(arch, name):
    expected, outputs, vocabulary, padded, sizes, cfg = _setup(arch, name)
    (result,) = postprocess_batch(outputs, sizes, vocabulary, padded, "panoptic", cfg)
    assert_panoptic_matches(result, expected)
    if name.startswith("expected_postprocess_synthetic_head"):  # the case that exercises the rules
        segments = result.segments_info
        assert len(segments) == 16
        stuff = [s["category_id"] for s in segments if not s["isthing"]]
        kept = outputs.final.logits[0].sigmoid().max(-1).values > cfg.object_mask_threshold
        stuff_queries = (outputs.final.logits[0][kept].argmax(-1) >= 5).sum()
        assert len(stuff) == len(set(stuff)) and int(stuff_queries) > len(stuff)  # stuff queries merged


@pytest.mark.parametrize(("arch", "name"), CASES, ids=IDS)
def test_semantic_matches_the_reference(arch, name):
    expected, outputs, vocabulary, padded, sizes, cfg = _setup(arch, name)
    (result,) = postprocess_batch(outputs, sizes, vocabulary, padded, "semantic", cfg, return_semantic_scores=True)
    assert result.scores.shape == (10, 427, 640)
    assert_semantic_matches(result.scores, expected)
    assert torch.equal(result.sem_seg, result.scores.argmax(0))


@pytest.mark.parametrize(("arch", "name"), CASES, ids=IDS)
def test_instances_match_the_reference_as_sets(arch, name):
    expected, outputs, vocabulary, padded, sizes, cfg = _setup(arch, name)
    (result,) = postprocess_batch(outputs, sizes, vocabulary, padded, "instance", cfg, things_only=True)
    assert_instances_match(result, expected, cfg.top_k, outputs.final.logits[0, : outputs.num_fg])
