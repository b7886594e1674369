"""LSJ and evaluation resizing keep image, masks and boxes consistent; collate pads correctly."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from openseed.core.boxes import tight_boxes
from openseed.data.shards import read_shards
from openseed.data.transforms import EvalResize, LargeScaleJitter, collate
from tests._reference import ARCHITECTURES, IMAGE, load_npz


@pytest.fixture(scope="module")
def pan_samples(panoptic_shards):
    return list(read_shards(panoptic_shards))


@pytest.fixture(scope="module")
def det_samples(labelme_shards):
    return list(read_shards(labelme_shards))


def test_tight_boxes_use_exclusive_max():
    masks = torch.zeros((1, 10, 10), dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    assert tight_boxes(masks).tolist() == [[3.0, 2.0, 9.0, 5.0]]


@pytest.mark.parametrize("seed", range(6))
def test_lsj_segmentation_invariants(pan_samples, seed):
    generator = torch.Generator().manual_seed(seed)
    lsj = LargeScaleJitter(256, (0.1, 2.0))
    for sample in pan_samples:
        out = lsj(sample, generator)
        h, w = out.image.shape[-2:]
        assert h <= 256 and w <= 256 and (h == 256 or w == 256 or max(h, w) < 256)
        assert out.masks.shape == (len(out.labels), h, w) and out.masks.dtype == torch.bool
        assert out.masks.flatten(1).any(1).all()  # no empty targets survive
        assert torch.equal(out.boxes, tight_boxes(out.masks))  # boxes re-derived from masks
        assert set(out.labels.tolist()) <= set(sample.labels.tolist())
        assert out.ignore_mask.shape == (h, w)


def test_lsj_without_scaling_is_an_exact_crop_or_flip(pan_samples):
    """At scale 1 (target = image size) LSJ moves pixels without resampling: masks are the original ones."""
    sample = pan_samples[0]
    h, w = sample.image.shape[-2:]
    lsj = LargeScaleJitter(max(h, w), (1.0, 1.0), flip_prob=0.0)
    out = lsj(sample, torch.Generator().manual_seed(0))
    assert torch.equal(out.image, sample.image) and torch.equal(out.masks, sample.masks)
    flipped = LargeScaleJitter(max(h, w), (1.0, 1.0), flip_prob=1.0)(sample, torch.Generator().manual_seed(0))
    assert torch.equal(flipped.masks, sample.masks.flip(-1))
    assert torch.equal(flipped.image, sample.image.flip(-1))
    x0, y0, x1, y1 = sample.boxes.unbind(1)
    assert torch.equal(flipped.boxes, torch.stack([w - x1, y0, w - x0, y1], 1))


def test_lsj_detection_boxes_clipped_and_labels_follow(det_samples):
    generator = torch.Generator().manual_seed(3)
    lsj = LargeScaleJitter(128, (1.5, 2.0))  # zoomed in: many boxes get cut by the crop
    dropped = 0
    for _ in range(10):
        for sample in det_samples:
            out = lsj(sample, generator)
            h, w = out.image.shape[-2:]
            assert (out.boxes[:, 0::2] >= 0).all() and (out.boxes[:, 0::2] <= w).all()
            assert (out.boxes[:, 1::2] >= 0).all() and (out.boxes[:, 1::2] <= h).all()
            assert ((out.boxes[:, 2:] - out.boxes[:, :2]) >= 1).all()
            assert len(out.labels) == len(out.boxes) == len(out.masks) == len(out.is_thing)
            dropped += len(sample.labels) - len(out.labels)
    assert dropped > 0


def test_eval_resize_sizes(pan_samples):
    sample = pan_samples[0]  # 427 x 640
    assert EvalResize(800, 1333).output_size(427, 640) == (800, 1199)
    assert EvalResize(None, 1024).output_size(427, 640) == (683, 1024)
    assert EvalResize(800, 1000).output_size(427, 640) == (667, 1000)
    out = EvalResize(None, 320)(sample)
    assert out.image.shape[-2:] == (214, 320) and out.masks.shape[-2:] == (214, 320)
    assert torch.equal(out.boxes, tight_boxes(out.masks))
    assert out.orig_size == (427, 640)


def test_eval_resize_size_rule_is_int_plus_half():
    """detectron2's rule: shorter side to short_edge unless the longer passes max_size; new = int(x * scale + 0.5),
    so halves round up (Python's round() rounds them to even)."""
    assert EvalResize(None, 10).output_size(5, 4) == (10, 8)
    assert EvalResize(None, 4).output_size(8, 5) == (4, 3)  # 2.5 -> 3 (round() would give 2)
    assert EvalResize(6, None).output_size(4, 5) == (6, 8)  # 7.5 -> 8
    assert EvalResize(800, 1333).output_size(640, 427) == (1199, 800)  # portrait: the same rule transposed
    assert EvalResize(800, None).output_size(100, 1000) == (800, 8000)  # no cap
    assert EvalResize(800, 1333).output_size(100, 1000) == (133, 1333)


def test_eval_resize_reproduces_the_reference_input(pan_samples):
    """The reference's evaluation input of the fixture photo (PIL bilinear on uint8, 800 x 1199), bit for bit: from
    the file read with its EXIF orientation, and through ``EvalResize`` on the decoded shard sample."""
    expected = load_npz(ARCHITECTURES[0])["input_image_uint8"]
    for arch in ARCHITECTURES[1:]:
        assert np.array_equal(load_npz(arch)["input_image_uint8"], expected)
    with Image.open(IMAGE) as opened:
        photo = torch.from_numpy(np.array(ImageOps.exif_transpose(opened).convert("RGB"))).permute(2, 0, 1)
    resize = EvalResize(800, 1333)
    size = resize.output_size(*photo.shape[-2:])
    assert size == expected.shape[-2:] == (800, 1199)
    assert np.array_equal(resize.resize_image(photo, size).numpy(), expected)
    sample = pan_samples[0]
    assert sample.image_id == 142238 and torch.equal(sample.image, photo)
    out = resize(sample)
    assert np.array_equal(out.image.numpy(), expected)
    assert out.masks.shape[-2:] == (800, 1199) and torch.equal(out.boxes, tight_boxes(out.masks))


def test_collate_pads_images_masks_and_sets_padding_mask(pan_samples, panoptic_shards):
    from openseed.data.shards import ShardSet

    vocab = ShardSet.open(panoptic_shards).vocabulary
    samples = [EvalResize(None, 200)(s) for s in pan_samples]
    batch = collate(samples, vocab, "seg", size_divisibility=32)
    assert batch.images.shape == (2, 3, 160, 224) and batch.images.dtype == torch.uint8
    for i, sample in enumerate(samples):
        h, w = sample.image.shape[-2:]
        assert batch.targets[i].image_size == (h, w)
        assert (~batch.padding_mask[i, :h, :w]).all() and batch.padding_mask[i].sum() == 160 * 224 - h * w
        assert torch.equal(batch.images[i, :, :h, :w], sample.image) and batch.images[i, :, h:].sum() == 0
        assert batch.targets[i].masks.shape[-2:] == (160, 224) and not batch.targets[i].masks[:, h:].any()
    fixed = collate(samples, vocab, "seg", pad_to=(256, 256))
    assert fixed.images.shape[-2:] == (256, 256)
    with pytest.raises(ValueError, match="does not fit"):
        collate(samples, vocab, "seg", pad_to=(100, 100))
