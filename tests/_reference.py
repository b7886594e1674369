"""Access to the reference fixtures (../shared/reference): what the authors' OpenSeeD code computes, read in place.

A missing fixture fails the test (never a skip): the parity tests are the tie between openseed and the reference.
``OPENSEED_REFERENCE`` points elsewhere when the shared folder is not beside the checkout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("OPENSEED_REFERENCE", ROOT.parent / "shared" / "reference"))
ARCHITECTURES = ("swint_nodecouple", "swint_decouple", "swinl_decouple")
REALDATA = Path(os.environ.get("OPENSEED_REALDATA", ROOT.parent / "shared" / "realdata"))
IMAGE = REALDATA / "coco_panoptic_sample" / "input_images" / "000000142238.jpg"


def reference_path(*parts: str) -> Path:
    path = REFERENCE.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"reference fixture missing: {path} (set OPENSEED_REFERENCE to the shared/reference folder)")
    return path


def load_npz(arch: str, name: str = "expected.npz") -> dict[str, np.ndarray]:
    with np.load(reference_path(arch, name)) as data:
        return {key: data[key] for key in data.files}


def meta(expected: dict[str, np.ndarray]) -> dict:
    return json.loads(str(expected["meta_json"]))


def centre_crop(array: np.ndarray, size: int = 24) -> np.ndarray:
    """The fixtures' "centre" crop of a [C, H, W] map: rows/cols ``n // 2 - 12 : n // 2 + 12`` with Python's slice
    rules (a negative start on maps under 24 cells counts from the end, as in the recording script)."""
    height, width = array.shape[-2:]
    half = size // 2
    return array[..., height // 2 - half: height // 2 + half, width // 2 - half: width // 2 + half]


# ------------------------------------------------------------------------------------------ post-processed results
def assert_panoptic_matches(result: dict, expected: dict[str, np.ndarray], near_ties=None) -> None:
    """``panoptic_seg`` exactly, and the segments (id, category, thing flag) in order.

    ``near_ties``: for results of our own forward pass (not the recorded outputs), a function that takes the
    differing pixels [N, 2] and returns which of them are near-ties (README "Tolerances": a discrete result may flip
    where two candidates are within the tolerance); every differing pixel must be one.
    """
    seg, segments = result.panoptic_seg.cpu().numpy(), result.segments_info
    assert seg.dtype == np.int32
    differing = np.argwhere(seg != expected["panoptic_seg"])
    if len(differing) and near_ties is not None:
        ties = np.asarray(near_ties(differing))
        assert ties.all(), f"pixels {differing[~ties].tolist()} differ without a near-tie"
    else:
        assert len(differing) == 0, f"{len(differing)} panoptic pixels differ"
    assert [s["id"] for s in segments] == expected["panoptic_segment_ids"].tolist()
    assert [s["category_id"] for s in segments] == expected["panoptic_segment_category"].tolist()
    assert [s["isthing"] for s in segments] == expected["panoptic_segment_isthing"].tolist()
    recorded = json.loads(str(expected["panoptic_segments_json"]))
    assert [(s["id"], s["category_id"], s["isthing"]) for s in recorded] == [
        (s["id"], s["category_id"], s["isthing"]) for s in segments]


def assert_semantic_matches(scores: torch.Tensor, expected: dict[str, np.ndarray]) -> None:
    """Semantic scores [K, H0, W0] against the recorded float16 ``sem_seg``: ours rounded the same way (values below
    float16's range flush to 0 in both), rtol 2e-3, and one float16 subnormal step (2**-24) absolute: below
    float16's normal range (6e-5) a score has only a few significant bits, so a last-bit difference of the float32
    sum (which the CPU's vector width orders: AVX2 and AVX-512 machines differ there) moves it by a whole step,
    a relative change of up to a few percent."""
    reference = torch.from_numpy(expected["sem_seg"])
    assert scores.shape == reference.shape
    torch.testing.assert_close(scores.cpu().half().float(), reference.float(), rtol=2e-3, atol=2.0 ** -24)


def assert_instances_match(result: dict, expected: dict[str, np.ndarray], top_k: int, fg_logits: torch.Tensor,
                           tolerance: float = 1e-4, mask_logits=None) -> None:
    """Instances as sets (the reference's top-k is unsorted): the same count (fewer than k once stuff is dropped),
    thing classes only; each recorded instance paired with exactly one of ours of its class whose score and box
    agree to ``tolerance``, with the same mask.

    ``mask_logits``: for results of our own forward pass, a function query -> our mask logits [H0, W0] at the output
    size; a mask pixel may then differ where that logit is within ``tolerance`` of the threshold 0 (a near-tie).
    """
    classes, scores = result.labels.cpu().numpy(), result.scores.cpu().numpy()
    boxes, masks = result.boxes.cpu().numpy(), result.masks.cpu().numpy()
    ref_classes, ref_scores = expected["instances_classes"], expected["instances_scores"]
    ref_boxes, ref_masks = expected["instances_boxes"], expected["instances_masks"].astype(bool)
    ranked = fg_logits.sigmoid().flatten().sort(descending=True).values
    boundary = (float(ranked[top_k - 1]), float(ranked[top_k])) if ranked.numel() > top_k else None
    assert len(classes) == len(ref_classes) < top_k, f"top-k boundary (k-th, k+1-th sigmoid): {boundary}"
    assert set(classes.tolist()) <= set(range(5))  # the fixtures' things are labels 0-4
    used: set[int] = set()
    for j in range(len(ref_classes)):
        close = [i for i in np.flatnonzero(classes == ref_classes[j])
                 if np.isclose(scores[i], ref_scores[j], rtol=tolerance, atol=tolerance)
                 and np.allclose(boxes[i], ref_boxes[j], rtol=tolerance, atol=tolerance)]
        assert len(close) == 1, f"reference instance {j} (class {ref_classes[j]}, score {ref_scores[j]:.6f}): " \
                                f"{len(close)} of ours agree"
        assert close[0] not in used
        used.add(close[0])
        differing = np.argwhere(masks[close[0]] != ref_masks[j])
        if len(differing) and mask_logits is not None:
            logits = mask_logits(int(result.queries[close[0]]))[differing[:, 0], differing[:, 1]]
            assert bool((logits.abs() <= tolerance).all()), \
                f"mask of reference instance {j}: pixels {differing.tolist()[:5]} differ, logits {logits.tolist()[:5]}"
        else:
            assert len(differing) == 0, f"mask of reference instance {j}: {len(differing)} pixels differ"
    assert len(used) == len(classes)
