"""Converted reference weights compute what the authors' OpenSeeD code computes (../shared/reference).

For each of the three released architectures, the small model of the same module tree (``weights.pt``) is converted
with ``python -m openseed.convert_checkpoint config=config.yaml`` and run on the fixture's photo and vocabulary: text
embeddings, every stage, the proposals, each layer's logits and boxes, the final masks and the box-conditioned path
must match the recorded outputs to atol = rtol = 1e-4 (README "Tolerances"); from the photo file, ``Predictor``'s
default preprocessing (the converted model's recorded 800 / 1333 resize) gives the recorded input exactly and its
panoptic, instance and semantic results equal the reference's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openseed.convert_checkpoint import convert
from openseed.core.boxes import model_boxes_to_pixels, targets_to_model_boxes
from openseed.core.vocabulary import Vocabulary
from openseed.modeling.openseed import load_model
from openseed.modeling.postprocess import postprocess_batch, resize_masks_to_original
from openseed.predict import Predictor, load_image
from tests._reference import (
    ARCHITECTURES,
    IMAGE,
    assert_instances_match,
    assert_panoptic_matches,
    assert_semantic_matches,
    centre_crop,
    load_npz,
    meta,
    reference_path,
)

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


def close(name: str, ours, expected) -> None:
    ours = ours.detach().cpu().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert ours.shape == expected.shape, f"{name}: shape {ours.shape} vs {expected.shape}"
    worst = float(np.abs(ours - expected).max())
    assert np.allclose(ours, expected, **TOLERANCE), f"{name}: max abs difference {worst:.3g}"


def fixture_vocabulary(expected: dict) -> Vocabulary:
    info = meta(expected)
    return Vocabulary.from_names(info["names"], [name in info["things"] for name in info["names"]])


def fixture_batch(expected: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The recorded resized image (800 x 1199), zero-padded at the right to 800 x 1216, and its padding mask."""
    image = torch.from_numpy(expected["input_image_uint8"])
    height, width = meta(expected)["padded_hw"]
    images = torch.zeros((1, 3, height, width), dtype=torch.uint8)
    images[0, :, : image.shape[1], : image.shape[2]] = image
    padding = torch.ones((1, height, width), dtype=torch.bool)
    padding[0, : image.shape[1], : image.shape[2]] = False
    return images, padding


class Run:
    """One converted small model, its inputs and its raw outputs (computed once per architecture)."""

    def __init__(self, arch: str, work_dir: Path):
        self.arch = arch
        self.expected = load_npz(arch)
        path = work_dir / "converted.pt"
        convert(reference_path(arch, "weights.pt"), path, config_file=reference_path(arch, "config.yaml"),
                log=lambda message: None)
        self.model = load_model(path).eval()
        self.vocabulary = fixture_vocabulary(self.expected)
        self.images, self.padding = fixture_batch(self.expected)
        with torch.no_grad():
            self.text = self.model.embed_vocabulary(self.vocabulary)
            self.features = self.model.backbone(self.model.normalise(self.images, self.padding))
            self.memory = self.model.pixel_decoder(self.features, self.padding)
            self.outputs = self.model.decoder(self.memory, self.text)


_RUNS: dict[str, Run] = {}


def _run(arch: str, tmp_path_factory) -> Run:
    if arch not in _RUNS:
        torch.set_num_threads(2)
        _RUNS[arch] = Run(arch, tmp_path_factory.mktemp(arch))
    return _RUNS[arch]


@pytest.fixture(scope="module", params=ARCHITECTURES)
def run(request, tmp_path_factory) -> Run:
    return _run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def swint_decouple(tmp_path_factory) -> Run:
    """The architecture whose stage summaries and conditioned path are recorded."""
    return _run("swint_decouple", tmp_path_factory)


def test_converted_config_is_the_architecture(run):
    config = run.model.config
    assert config.num_bg == meta(run.expected)["num_queries_stuff_bg"] and config.num_fg == 20
    assert config.text_context == run.expected["text_token_ids"].shape[-1]
    assert config.num_levels == (5 if run.arch == "swinl_decouple" else 4)


def test_text_embeddings(run):
    close("logit_scale", run.model.decoder.class_head.logit_scale.exp().log(), run.expected["logit_scale"])
    close("text_embeddings", run.text, run.expected["text_embeddings"])


def test_stage_features(swint_decouple):
    """Backbone outputs, the encoder's levels (finest first), the mask features and the proposals' masks: per-channel
    means and stds, and the two recorded 24 x 24 crops of each map (``expected_features_summary.npz``)."""
    run = swint_decouple
    summary = load_npz("swint_decouple", "expected_features_summary.npz")
    maps = {f"backbone_{key}": value[0] for key, value in run.features.items()}
    memory = run.memory
    for level, ((height, width), start) in enumerate(zip(memory.spatial_shapes.tolist(),
                                                         memory.level_start_index.tolist())):
        tokens = memory.memory[0, start: start + height * width]
        maps[f"multi_scale_features_{level}"] = tokens.t().reshape(-1, height, width)
    maps["mask_features"] = memory.mask_features[0]
    maps["interm_pred_masks"] = run.outputs.proposals.masks[0]
    for name, value in maps.items():
        array = value.numpy()
        if name == "interm_pred_masks" and run.outputs.num_bg:  # the reference's proposals include the bg queries
            array = np.concatenate([array, run.outputs.aux[0].masks[0, run.outputs.num_fg:].numpy()])
        close(f"{name} mean", array.mean((1, 2)), summary[f"{name}__mean_per_channel"])
        close(f"{name} std", array.std((1, 2)), summary[f"{name}__std_per_channel"])
        close(f"{name} top-left", array[:, :24, :24], summary[f"{name}__crop_topleft"])
        close(f"{name} centre", centre_crop(array), summary[f"{name}__crop_centre"])


def test_proposals_layers_and_final_outputs(run):
    expected, outputs = run.expected, run.outputs
    num_fg = outputs.num_fg
    # the proposals: the selected encoder tokens in top-k order (the reference appends the bg queries' initial
    # prediction, which is our first prediction's bg rows)
    close("interm_pred_logits", outputs.proposals.logits[0], expected["interm_pred_logits"][:num_fg])
    close("interm_pred_boxes", outputs.proposals.boxes[0], expected["interm_pred_boxes"][:num_fg])
    if outputs.num_bg:
        close("interm bg logits", outputs.aux[0].logits[0, num_fg:], expected["interm_pred_logits"][num_fg:])
        close("interm bg boxes", outputs.aux[0].boxes[0, num_fg:], expected["interm_pred_boxes"][num_fg:])
    assert len(outputs.aux) == 3
    for layer, prediction in enumerate(outputs.aux):
        close(f"aux{layer}_pred_logits", prediction.logits[0], expected[f"aux{layer}_pred_logits"])
        close(f"aux{layer}_pred_boxes", prediction.boxes[0], expected[f"aux{layer}_pred_boxes"])
    close("pred_logits", outputs.final.logits[0], expected["pred_logits"])
    close("pred_boxes", outputs.final.boxes[0], expected["pred_boxes"])
    close("pred_masks", outputs.final.masks[0], expected["pred_masks"])


def test_box_prompted_path_matches_the_conditioned_recording(swint_decouple):
    """``decode_boxes`` with the image's ground-truth boxes and labels, no noise, one group: the conditioned
    queries' logits, boxes and masks of every layer, and the matching queries' outputs of the same pass."""
    run = swint_decouple
    conditioned = load_npz("swint_decouple", "expected_conditioned.npz")
    padded = tuple(meta(run.expected)["padded_hw"])
    boxes = model_boxes_to_pixels(torch.from_numpy(conditioned["gt_boxes_cxcywh_norm"]), padded)
    assert torch.allclose(targets_to_model_boxes(boxes, padded),
                          torch.from_numpy(conditioned["gt_boxes_cxcywh_norm"]), atol=1e-6)
    labels = torch.from_numpy(conditioned["gt_labels"])
    outputs = run.model.decode_boxes(run.images, run.padding, run.vocabulary, [boxes], [labels])
    predictions = outputs.conditioned.predictions
    assert outputs.conditioned.num_groups == 1 and len(predictions) == 4
    for layer in range(3):
        close(f"dn_aux{layer}_pred_logits", predictions[layer].logits[0], conditioned[f"dn_aux{layer}_pred_logits"])
        close(f"dn_aux{layer}_pred_boxes", predictions[layer].boxes[0], conditioned[f"dn_aux{layer}_pred_boxes"])
    close("dn_pred_logits", predictions[-1].logits[0], conditioned["dn_pred_logits"])
    close("dn_pred_boxes", predictions[-1].boxes[0], conditioned["dn_pred_boxes"])
    close("dn_pred_masks", predictions[-1].masks[0], conditioned["dn_pred_masks"])
    close("match_pred_logits", outputs.final.logits[0], conditioned["match_pred_logits"])
    close("match_pred_boxes", outputs.final.boxes[0], conditioned["match_pred_boxes"])
    close("match_pred_masks", outputs.final.masks[0], conditioned["match_pred_masks"])


def _panoptic_near_ties(expected: dict, pixels: np.ndarray, tolerance: float = 1e-4) -> np.ndarray:
    """Which pixels the panoptic rule decides on a near-tie, from the recorded outputs: the two best kept queries'
    score x mask probability within ``tolerance`` (relative), or the winner's mask probability within it of 0.5."""
    logits = torch.from_numpy(expected["pred_logits"])
    keep = logits.sigmoid().max(-1).values > 0.25
    scores = torch.softmax(logits.sigmoid() / 0.06, -1).max(-1).values[keep]
    masks = torch.from_numpy(expected["pred_masks"])[keep]
    info = meta(expected)
    probs = resize_masks_to_original(masks, tuple(info["padded_hw"]), tuple(info["input_hw"]),
                                     tuple(info["orig_hw"]))[:, pixels[:, 0], pixels[:, 1]].sigmoid()
    ranked = (scores[:, None] * probs).sort(dim=0, descending=True)
    best, second = ranked.values[0], ranked.values[1]
    winner = probs.gather(0, ranked.indices[:1])[0]
    return ((best - second <= tolerance * best) | ((winner - 0.5).abs() <= tolerance)).numpy()


def test_predictor_on_the_photo_gives_the_reference_results(run):
    """The whole chain from the JPEG: EXIF-aware reading, the model's recorded resize (PIL bilinear, 800 / 1333,
    padding to 32), the forward pass, and the reference's post-processing with the model's recorded top-k and
    unclipped boxes."""
    expected = run.expected
    predictor = Predictor(run.model, device="cpu")
    assert (predictor.inference.top_k, predictor.inference.clip_boxes) == (100, False)
    array, _ = load_image(IMAGE)
    images, padding, size, orig = predictor._prepare(array)
    assert tuple(images.shape[-2:]) == tuple(meta(expected)["padded_hw"]) and size == (800, 1199)
    assert torch.equal(images[0, :, :800, :1199], torch.from_numpy(expected["input_image_uint8"]))
    panoptic = predictor(IMAGE, run.vocabulary, task="panoptic")
    assert_panoptic_matches(panoptic, expected, lambda pixels: _panoptic_near_ties(expected, pixels))
    instances = predictor(IMAGE, run.vocabulary, task="instance")
    info = meta(expected)
    sizes = tuple(info["padded_hw"]), tuple(info["input_hw"]), tuple(info["orig_hw"])
    assert_instances_match(instances, expected, 100, run.outputs.final.logits[0, : run.outputs.num_fg],
                           mask_logits=lambda q: resize_masks_to_original(run.outputs.final.masks[0, q: q + 1],
                                                                          *sizes)[0])
    with torch.no_grad():
        outputs = run.model.forward_images(images, padding, run.vocabulary)
    (semantic,) = postprocess_batch(outputs, [(size, orig)], run.vocabulary, tuple(images.shape[-2:]), "semantic",
                                    predictor.inference, return_semantic_scores=True)
    assert_semantic_matches(semantic.scores, expected)
