"""The ground floor's conventions and codecs (openseed.core), against independent computations."""

import io

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from openseed.core.boxes import model_boxes_to_pixels, stored_box_xywh, targets_to_model_boxes, xyxy_to_xywh
from openseed.core.codecs import (
    decode_label_png,
    decode_panoptic_png,
    decode_rle,
    encode_label_png,
    encode_rle,
    id_to_rgb,
    rgb_to_id,
    segmentation_to_rle,
)


def test_panoptic_ids_survive_a_png_round_trip():
    ids = np.array([[0, 1, 255], [256, 65535, 65536], [2 ** 24 - 1, 123456, 7]], dtype=np.int64)
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb[1, 0].tolist() == [0, 1, 0] and rgb[1, 2].tolist() == [0, 0, 1]
    assert np.array_equal(rgb_to_id(rgb), ids)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    assert np.array_equal(decode_panoptic_png(buffer.getvalue()), ids)


def test_label_maps_survive_a_png_round_trip_at_8_and_16_bits():
    small = np.array([[0, 1, 254], [255, 7, 0]], dtype=np.uint8)
    large = np.array([[0, 846, 65535], [255, 256, 1]], dtype=np.uint16)
    for labels, mode in ((small, "L"), (large, "I;16")):
        data = encode_label_png(labels)
        with Image.open(io.BytesIO(data)) as image:
            assert image.mode == mode  # what the readers of other tools see too
        assert np.array_equal(decode_label_png(data), labels.astype(np.int64))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_label_png(large.astype(np.int32))


def test_rle_round_trip_and_pycocotools_agreement():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 23)) > 0.6
    rles = encode_rle(torch.from_numpy(masks))
    assert all(isinstance(r["counts"], str) and r["size"] == [17, 23] for r in rles)
    for mask, rle in zip(masks, rles):
        assert torch.equal(decode_rle(rle), torch.from_numpy(mask))
        assert int(mask_utils.area(rle)) == int(mask.sum())
    assert encode_rle(np.zeros((0, 5, 5), dtype=bool)) == []


def test_every_coco_segmentation_form_becomes_the_same_rle():
    square = [[2.0, 2.0, 8.0, 2.0, 8.0, 6.0, 2.0, 6.0]]  # a polygon
    from_polygon = segmentation_to_rle(square, 10, 12)
    expected = mask_utils.merge(mask_utils.frPyObjects(square, 10, 12))
    assert from_polygon["counts"] == expected["counts"].decode("ascii") and from_polygon["size"] == [10, 12]
    mask = decode_rle(from_polygon).numpy()
    fortran = np.asfortranarray(mask.astype(np.uint8))
    flat = fortran.ravel(order="F")  # uncompressed RLE: run lengths, column-major, starting with zeros
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    uncompressed = {"size": [10, 12], "counts": np.diff(np.concatenate([[0], changes])).tolist()}
    assert segmentation_to_rle(uncompressed, 10, 12) == from_polygon
    with_bytes = {"size": [10, 12], "counts": from_polygon["counts"].encode("ascii")}
    assert segmentation_to_rle(with_bytes, 10, 12) == from_polygon
    with pytest.raises(ValueError, match="unreadable segmentation"):
        segmentation_to_rle([[1.0, 2.0, "x"]], 10, 12)


def test_box_conventions():
    pixels = torch.tensor([[0.0, 0.0, 64.0, 32.0], [10.0, 20.0, 30.0, 60.0]])
    model = targets_to_model_boxes(pixels, (64, 128))  # padded H, W
    assert model[0].tolist() == [0.25, 0.25, 0.5, 0.5]
    torch.testing.assert_close(model_boxes_to_pixels(model, (64, 128)), pixels)
    assert xyxy_to_xywh(pixels)[1].tolist() == [10.0, 20.0, 20.0, 40.0]
    assert stored_box_xywh({"bbox": [0.1, 0.2, 0.4, 0.8]}) == [0.1, 0.2, 0.4 - 0.1, 0.8 - 0.2]  # float64 exact


def test_a_batch_converts_its_boxes_to_the_model_convention_once():
    from openseed.core.batch import Batch, Targets
    from openseed.core.vocabulary import Vocabulary

    def targets(boxes):
        n = len(boxes)
        return Targets(labels=torch.zeros(n, dtype=torch.long), boxes=torch.tensor(boxes).reshape(n, 4), masks=None,
                       is_thing=torch.ones(n, dtype=torch.bool), mask_is_pseudo=torch.zeros(n, dtype=torch.bool),
                       has_mask=torch.zeros(n, dtype=torch.bool), ignore_mask=None, image_id=i, orig_size=(64, 100),
                       image_size=(64, 100))

    i = 0
    batch = Batch(images=torch.zeros(2, 3, 64, 128, dtype=torch.uint8),
                  padding_mask=torch.zeros(2, 64, 128, dtype=torch.bool),
                  targets=[targets([[0.0, 0.0, 64.0, 32.0]]), targets([])],
                  vocabulary=Vocabulary.from_names(["a"]), task="det", dataset="test")
    assert batch.padded_size == (64, 128)
    first = batch.model_boxes()
    assert first[0].tolist() == [[0.25, 0.25, 0.5, 0.5]] and first[1].shape == (0, 4)
    assert batch.model_boxes() is first  # converted once, for the model and the losses alike
    moved = batch.to("cpu")
    assert moved.model_boxes() is not first and torch.equal(moved.model_boxes()[0], first[0])  # a new batch converts
    assert moved == batch  # the kept conversion is not part of the batch's value


def test_tight_boxes_of_masks_in_pixel_and_coco_form():
    from openseed.core.boxes import tight_box_xywh, tight_boxes

    masks = torch.zeros(2, 6, 8, dtype=torch.bool)
    masks[0, 1:4, 2:7] = True  # rows 1-3, columns 2-6
    masks[1, 5, 0] = True
    assert tight_boxes(masks).tolist() == [[2.0, 1.0, 7.0, 4.0], [0.0, 5.0, 1.0, 6.0]]
    assert tight_boxes(masks[:0]).shape == (0, 4)
    assert tight_box_xywh(masks[0]) == [2, 1, 5, 3] and tight_box_xywh(masks[1]) == [0, 5, 1, 1]
    assert tight_box_xywh(torch.zeros(4, 4, dtype=torch.bool)) == [0, 0, 0, 0]
