"""Conditioned queries in training: online mask assistance matches with masks decoded from the clean ground-truth
boxes (a noise-free group that is not supervised), the reference's box noise, and the reference's rule for images with
more targets than the budget."""

import pytest
import torch

from openseed.core.conditions import Conditions
from openseed.losses.criterion import SetCriterion
from openseed.modeling import decoder as decoder_module
from openseed.modeling.decoder import noisy_boxes
from openseed.modeling.openseed import MODEL_SIZES, build_openseed


def test_assistance_masks_come_from_the_clean_boxes(det_batch, monkeypatch):
    """Before: the assistance masks were the first group's, decoded from jittered boxes. Now the model adds a group
    whose boxes are the ground truth as it is, and the criterion's assistance masks are that group's."""
    torch.manual_seed(0)
    model = build_openseed("tiny").eval()
    seen = []
    real = decoder_module.jitter_boxes

    def recording(boxes, scale):
        seen.append(boxes.clone())
        return real(boxes, scale)

    monkeypatch.setattr(decoder_module, "jitter_boxes", recording)
    clean = det_batch.model_boxes()
    conditions = Conditions(labels=[t.labels for t in det_batch.targets], boxes=clean, num_groups=2,
                            clean_group=True)
    with torch.no_grad():
        outputs = model(det_batch, conditions=conditions)
    cond = outputs.conditioned
    assert cond.clean_group and cond.num_groups == 3  # one clean + two noisy groups
    for image, boxes in zip(seen, clean):  # only the noisy groups' boxes were jittered
        assert image.shape == (2 * len(boxes), 4)
    # the clean group decodes exactly what box-prompted decoding (one group, no noise) decodes from the same boxes
    prompt = Conditions(labels=conditions.labels, boxes=clean, add_noise=False, num_groups=1)
    with torch.no_grad():
        prompted = model(det_batch, conditions=prompt)
    slots = cond.slots_per_group
    torch.testing.assert_close(cond.predictions[-1].masks[:, :slots], prompted.conditioned.predictions[-1].masks,
                               rtol=1e-4, atol=1e-4)
    criterion = SetCriterion(num_points=256, mask_assistance="online")
    masks = criterion._assistance_masks(cond, det_batch.targets)
    for b, target in enumerate(det_batch.targets):
        index = cond.target_index[b, :slots]
        valid = index >= 0
        expected = torch.zeros_like(masks[b])
        expected[index[valid]] = (cond.predictions[-1].masks[b, :slots][valid] > 0).float()
        assert torch.equal(masks[b], expected) and len(masks[b]) == len(target)


def test_clean_group_is_not_supervised_and_only_requested_for_assistance(det_batch):
    torch.manual_seed(0)
    model = build_openseed("tiny")
    online = SetCriterion(num_points=256, mask_assistance="online")
    assert online.wants_clean_group("det") and not online.wants_clean_group("seg")
    assert not SetCriterion(num_points=256).wants_clean_group("det")
    outputs = model(det_batch, clean_group=True)
    losses = online(outputs, det_batch)
    cond = outputs.conditioned
    slots = cond.slots_per_group
    logits = [p.logits for p in cond.predictions]
    grads = torch.autograd.grad(online.total_loss(losses), logits, allow_unused=True)
    for grad in grads:  # no loss reaches the clean group's outputs; every layer's noisy groups are supervised
        assert grad is not None and float(grad[:, :slots].abs().sum()) == 0.0
        assert float(grad[:, slots:].abs().sum()) > 0.0
    without = SetCriterion(num_points=256, mask_assistance="none")
    plain = model(det_batch)
    assert not plain.conditioned.clean_group
    assert without._assistance_masks(plain.conditioned, []) is None  # jittered masks never assist


def test_reference_box_noise_moves_centres_and_scales_sides():
    torch.manual_seed(0)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(20000, 1)
    noisy = noisy_boxes(boxes, 0.4, "reference")
    shift, scale = (noisy[:, :2] - boxes[:, :2]).abs(), (noisy[:, 2:] - boxes[:, 2:]).abs()
    assert torch.all(shift <= 0.4 * boxes[:, 2:] / 2 + 1e-6) and torch.all(scale <= 0.4 * boxes[:, 2:] + 1e-6)
    assert float(shift[:, 0].max()) > 0.039 and float(scale[:, 1].max()) > 0.159  # the bounds are reached
    torch.testing.assert_close(noisy.mean(0), boxes[0], atol=3e-3, rtol=0)  # unbiased
    corners = noisy_boxes(boxes, 0.4, "corners")
    assert float((corners[:, 2:] - boxes[:, 2:]).abs().max()) <= 0.4 * 0.4 / 2 * 2 + 1e-6
    assert MODEL_SIZES["swint_decouple"].box_noise == "reference" and MODEL_SIZES["small"].box_noise == "corners"
    with pytest.raises(ValueError, match="box_noise"):
        build_openseed("tiny", box_noise="gaussian")


def test_over_budget_batches_get_no_denoising_queries_as_the_reference(det_batch):
    torch.manual_seed(0)
    most = max(len(t) for t in det_batch.targets)
    kept = build_openseed("tiny", cond_budget=most - 1)  # one_group: still one noisy group
    outputs = kept(det_batch)
    assert outputs.conditioned.num_groups == 1
    dropped = build_openseed("tiny", cond_budget=most - 1, cond_over_budget="none")
    outputs = dropped(det_batch)
    assert outputs.conditioned is None
    outputs = dropped(det_batch, clean_group=True)
    assert outputs.conditioned.num_groups == 1 and outputs.conditioned.clean_group  # assistance keeps its group
    losses = SetCriterion(num_points=256, mask_assistance="online")(outputs, det_batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_class_cond0"].detach()) == 0.0  # nothing supervised in the clean group
    assert MODEL_SIZES["swinl_decouple"].cond_over_budget == "none"


@pytest.mark.parametrize("experiment", ["swint_joint", "swinl_joint", "swint_coco"])
def test_paper_presets_clip_the_whole_models_gradient_norm_to_001(experiment):
    """The reference clips the L2 norm of all the model's gradients together to 0.01 (CLIP_TYPE full_model)."""
    from hydra import compose, initialize_config_dir

    from openseed.config import CONF

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    assert cfg.trainer.gradient_clip_val == 0.01 and cfg.trainer.gradient_clip_algorithm == "norm"
    assert cfg.model.size in ("swint_decouple", "swinl_decouple", "swint_nodecouple")
    assert MODEL_SIZES[cfg.model.size].box_noise == "reference"


def test_reference_scale_of_the_conditioned_class_loss(det_batch):
    """The reference's denoising class loss: focal loss of the supervised slots, mean over the classes, summed,
    divided by boxes x groups and multiplied by the padded size (slots x groups): the per-box sum x slots x groups /
    classes."""
    torch.manual_seed(0)
    model = build_openseed("tiny")
    outputs = model(det_batch)
    ours = SetCriterion(num_points=256)(outputs, det_batch)
    theirs = SetCriterion(num_points=256, cond_class_loss="reference")(outputs, det_batch)
    cond = outputs.conditioned
    slots = cond.slots_per_group
    factor = slots * cond.num_groups / len(det_batch.vocabulary)
    for layer in range(len(cond.predictions)):
        key = f"loss_class_cond{layer}"
        torch.testing.assert_close(theirs[key], ours[key] * factor)
        assert torch.equal(theirs[f"loss_bbox_cond{layer}"], ours[f"loss_bbox_cond{layer}"])
    with pytest.raises(ValueError, match="cond_class_loss"):
        SetCriterion(cond_class_loss="mean")


def test_reference_lr_scope_puts_projection_and_logit_scale_at_the_text_multiplier():
    from openseed.training.module import parameter_groups

    def group_of(model):
        groups = parameter_groups(model, lr=1.0, weight_decay=0.05, text_multiplier=0.1,
                                  text_prefixes=model.text_lr_prefixes)
        return {id(p): g["lr"] for g in groups for p in g["params"]}

    ours = build_openseed("tiny", text_trainable=True)
    lr = group_of(ours)
    assert lr[id(ours.decoder.class_head.logit_scale)] == 1.0 and lr[id(ours.text_encoder.projection.weight)] == 1.0
    theirs = build_openseed("tiny", text_trainable=True, text_lr_scope="reference")
    lr = group_of(theirs)
    assert lr[id(theirs.decoder.class_head.logit_scale)] == 0.1
    assert lr[id(theirs.text_encoder.projection.weight)] == 0.1
    assert lr[id(theirs.decoder.class_head.project.weight)] == 1.0  # the query projection is the decoder's
    assert MODEL_SIZES["swint_decouple"].text_lr_scope == "reference"
    with pytest.raises(ValueError, match="text_lr_scope"):
        build_openseed("tiny", text_lr_scope="all")


def test_encoder_and_decoder_run_in_float32_under_autocast(det_batch):
    torch.manual_seed(0)
    model = build_openseed("tiny").eval()
    with torch.no_grad():  # without autocast the switch changes nothing
        model.fp32_encoder_decoder = False
        a = model.forward_images(det_batch.images, det_batch.padding_mask, det_batch.vocabulary)
        model.fp32_encoder_decoder = True
        b = model.forward_images(det_batch.images, det_batch.padding_mask, det_batch.vocabulary)
    assert torch.equal(a.final.logits, b.final.logits)
    seen = {}
    model.pixel_decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("memory", o.memory.dtype))
    model.decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("logits", o.final.logits.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.forward_images(det_batch.images, det_batch.padding_mask, det_batch.vocabulary)
    assert seen == {"memory": torch.float32, "logits": torch.float32}
    model.fp32_encoder_decoder = False  # the switch off: the deformable encoder follows autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode_images(det_batch.images, det_batch.padding_mask)
    assert seen["memory"] == torch.bfloat16
