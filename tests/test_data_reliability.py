"""Data-side reliability: unreadable training data stops with an error instead of spinning, duplicate image ids,
16-bit pictures, unusable boxes, panoptic images without annotations, EXIF orientation. Small synthetic data only."""

import io
import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from data_prep import coco_detection_to_shards, coco_panoptic_to_shards
from openseed.data.coco import DataError
from openseed.data.datamodule import OpenSeeDDataModule, TrainStream
from openseed.data.images import rgb_array
from openseed.data.shards import STREAM_SKIPS, ShardSet, SkipCounter, read_shards
from openseed.predict import load_image
from tests.conftest import read_tar, write_tar

CATEGORIES = [{"id": 1, "name": "thing", "isthing": 1}, {"id": 2, "name": "grass", "isthing": 0}]
NOT_JPEG = b"\xff\xd8\xff" + b"\x00" * 40  # a JPEG header and nothing decodable


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth RGB picture whose four quadrants differ, so that a turn or flip shows."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1),
                    np.where(xs < width // 2, 40, 200) + seed % 50], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _write_json(path, images, annotations, categories=CATEGORIES):
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _det_set(tmp_path, count: int, maxcount: int, name: str = "tiny"):
    """A converted boxes-only detection set of ``count`` 32x24 JPEGs, ``maxcount`` per shard."""
    src = tmp_path / f"{name}_src"
    src.mkdir()
    images, annotations = [], []
    for i in range(count):
        _picture(32, 24, i).save(src / f"im{i}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"im{i}.jpg", "width": 32, "height": 24})
        annotations.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 3, 10, 8], "iscrowd": 0})
    json_path = _write_json(src / "ann.json", images, annotations)
    out = tmp_path / name
    coco_detection_to_shards.convert(json_path, src, out, name, maxcount=maxcount, progress=False)
    return out


def _corrupt_jpegs(root, which=lambda key: True):
    """Replace the JPEG of every sample (or those ``which(key)`` picks) in every shard with undecodable bytes."""
    for tar in sorted(root.glob("*.tar")):
        members = [(n, NOT_JPEG if n.endswith(".jpg") and which(n.split(".")[0]) else d) for n, d in read_tar(tar)]
        write_tar(tar, members)


def _stream(root, **kw) -> TrainStream:
    return TrainStream(ShardSet.open(root), batch_size=2, transform=lambda sample, generator: sample, pad_to=None,
                       shuffle_buffer=2, **kw)


# ------------------------------------------------------------------------------------------ 1. no endless spin
@pytest.mark.timeout(30)
def test_all_samples_corrupt_stops_training_with_an_error_naming_the_shards(tmp_path):
    root = _det_set(tmp_path, 4, maxcount=2)
    _corrupt_jpegs(root)
    module = OpenSeeDDataModule(det={"path": str(root), "batch_size": 2}, image_size=64, num_workers=0,
                                shuffle_buffer=2)
    with pytest.raises(DataError) as caught:
        next(iter(module.train_dataloader()))
    message = str(caught.value)
    assert "tiny-000000.tar" in message and "tiny-000001.tar" in message
    assert "no readable training sample in a whole pass" in message and "corrupt data" in message


@pytest.mark.timeout(30)
def test_zero_byte_shards_stop_the_stream_with_an_error_naming_them(tmp_path):
    only_empty = _det_set(tmp_path, 4, maxcount=2, name="empty")
    for tar in only_empty.glob("*.tar"):
        tar.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty-000000\.tar, empty-000001\.tar"):
        next(_stream(only_empty).batches((0,)))
    mixed = _det_set(tmp_path, 4, maxcount=2, name="mixed")  # one zero-byte shard, one whose samples are corrupt
    _corrupt_jpegs(mixed)
    (mixed / "mixed-000000.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 shard\(s\) mixed-000000\.tar, mixed-000001\.tar"):
        next(_stream(mixed).batches((1,)))


@pytest.mark.timeout(30)
def test_too_many_unreadable_samples_in_a_row_is_an_error(tmp_path):
    root = _det_set(tmp_path, 6, maxcount=6)
    _corrupt_jpegs(root, which=lambda key: int(key) <= 5)  # 5 corrupt samples before the good one
    with pytest.raises(DataError, match=r"3 training samples in a row.*max_consecutive_skips=3.*tiny-000000\.tar"):
        next(_stream(root, max_consecutive_skips=3).batches((0,)))
    batch = next(_stream(root, max_consecutive_skips=6).batches((0,)))  # a looser limit reaches the good sample
    assert {t.image_id for t in batch.targets} == {6}
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        _stream(root, max_consecutive_skips=0)
    assert _stream(root).max_consecutive_skips == 1000  # the default: 1000, or 3 x the largest shard when more
    assert TrainStream(replace(ShardSet.open(root), counts=(5, 800)), 1, None, None, 1).max_consecutive_skips == 2400
    module = OpenSeeDDataModule(det={"path": str(root), "batch_size": 1}, image_size=64, num_workers=0,
                                shuffle_buffer=1, max_consecutive_skips=3)  # the data config's key reaches the stream
    with pytest.raises(DataError, match=r"max_consecutive_skips=3"):
        next(iter(module.train_dataloader()))


@pytest.mark.timeout(30)
def test_one_bad_sample_and_one_empty_shard_among_good_ones_keep_training(tmp_path):
    root = _det_set(tmp_path, 6, maxcount=2)
    _corrupt_jpegs(root, which=lambda key: int(key) == 3)
    (root / "tiny-000002.tar").write_bytes(b"")  # images 5 and 6 gone
    before = dict(STREAM_SKIPS.counts)
    batches = list(zip(range(20), _stream(root, max_consecutive_skips=2).batches((0,))))
    assert len(batches) == 20
    ids = {t.image_id for _, batch in batches for t in batch.targets}
    assert ids == {1, 2, 4}
    assert STREAM_SKIPS.counts["corrupt data"] > before.get("corrupt data", 0)
    assert STREAM_SKIPS.counts["unreadable shard data"] > before.get("unreadable shard data", 0)


def test_skip_log_is_rate_limited(caplog):
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="openseed.data.shards"):
        for i in range(2000):
            counter("corrupt data", f"sample {i}")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 6  # occurrences 1, 2, 3, then 10, 100 and 1000 only
    assert "1000 so far" in messages[5] and "sample 999: corrupt data" in messages[5]
    with caplog.at_level(logging.WARNING, logger="openseed.data.shards"):
        for i in range(5):  # a shard not seen before: its first 3 are named
            counter("corrupt data", f"sample {i} in b.tar", "OSError: truncated", "b.tar")
        counter("missing member", "sample x", "'json'")  # another reason starts its own count
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 6 + 3 + 1 and "sample 2 in b.tar: corrupt data (OSError: truncated)" in messages[8]
    assert "2003 so far" in messages[8] and "missing member ('json')" in messages[9]
    assert counter.counts == {"corrupt data": 2005, "missing member": 1}
    assert counter.last == "sample x: missing member ('json')"


# ------------------------------------------------------------------------------------------ 2. duplicate ids
def test_duplicate_detection_image_id_is_an_error(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        _picture(32, 24).save(tmp_path / name)
    images = [{"id": 7, "file_name": "a.jpg", "width": 32, "height": 24},
              {"id": 7, "file_name": "b.jpg", "width": 32, "height": 24}]
    json_path = _write_json(tmp_path / "dup.json", images,
                            [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [1, 1, 5, 5]}])
    with pytest.raises(DataError, match=r"dup\.json: duplicate image id 7 .*'a\.jpg' and 'b\.jpg'"):
        coco_detection_to_shards.convert(json_path, tmp_path, tmp_path / "out", "dup", progress=False)


def _panoptic_source(tmp_path, ids=(1, 2)):
    """Images and PNGs for a tiny panoptic set: each 32x24 picture has a thing (id 5) on grass (id 9)."""
    (tmp_path / "img").mkdir()
    (tmp_path / "png").mkdir()
    ids_map = np.full((24, 32), 9, np.int64)
    ids_map[4:12, 6:20] = 5
    rgb = np.stack([ids_map % 256, ids_map // 256 % 256, ids_map // 65536], axis=-1).astype(np.uint8)
    images, annotations = [], []
    for i in ids:
        _picture(32, 24, i).save(tmp_path / "img" / f"p{i}.jpg")
        Image.fromarray(rgb).save(tmp_path / "png" / f"p{i}.png")
        images.append({"id": i, "file_name": f"p{i}.jpg", "width": 32, "height": 24})
        annotations.append({"image_id": i, "file_name": f"p{i}.png", "segments_info": [
            {"id": 5, "category_id": 1, "iscrowd": 0}, {"id": 9, "category_id": 2, "iscrowd": 0}]})
    return images, annotations


def test_duplicate_panoptic_ids_are_errors(tmp_path):
    images, annotations = _panoptic_source(tmp_path)
    twice = _write_json(tmp_path / "twice.json", images, annotations + [{**annotations[0], "file_name": "p2.png"}])
    with pytest.raises(DataError, match=r"twice\.json: two panoptic annotations for image id 1 .*'p1\.png' and "
                                        r"'p2\.png'"):
        coco_panoptic_to_shards.convert(twice, tmp_path / "png", tmp_path / "img", tmp_path / "o1", "p",
                                        progress=False)
    same = _write_json(tmp_path / "same.json", [images[0], {**images[1], "id": 1}], annotations[:1])
    with pytest.raises(DataError, match=r"same\.json: duplicate image id 1 .*'p1\.jpg' and 'p2\.jpg'"):
        coco_panoptic_to_shards.convert(same, tmp_path / "png", tmp_path / "img", tmp_path / "o2", "p",
                                        progress=False)


# ------------------------------------------------------------------------------------------ 3. 16-bit pictures
def _gray16(width: int = 64, height: int = 16) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def test_16_bit_png_is_scaled_not_clipped_in_the_converter_and_the_predictor(tmp_path):
    values = _gray16()
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    expected = (values >> 8).astype(np.uint8)
    json_path = _write_json(tmp_path / "ann.json", [{"id": 1, "file_name": "deep.png", "width": 64, "height": 16}],
                            [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8]}])
    summary = coco_detection_to_shards.convert(json_path, tmp_path, tmp_path / "out", "deep", progress=False)
    assert summary.written == 1 and summary.reencoded_images == 1
    stored = next(read_shards(tmp_path / "out")).image.permute(1, 2, 0).numpy().astype(int)
    assert np.abs(stored - expected[..., None]).mean() < 2 and np.abs(stored - expected[..., None]).max() <= 12
    assert stored[:, -4:].mean() > 240 and stored[:, :4].mean() < 15 and 110 < stored[:, 30:34].mean() < 145
    array, _ = load_image(tmp_path / "deep.png")
    assert array.dtype == np.uint8 and array.shape == (16, 64, 3)
    assert np.array_equal(array, np.repeat(expected[..., None], 3, axis=2))
    assert np.array_equal(load_image(Image.open(tmp_path / "deep.png"))[0], array)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGBA", "CMYK", "RGB", "I;16", "I;16B", "I", "F"])
def test_every_common_mode_gives_uint8_rgb(mode):
    base = _picture(8, 6)
    if mode in ("I;16", "I;16B", "I"):
        deep = _gray16(8, 6)
        image = Image.frombytes(mode, (8, 6), deep.astype(">u2" if mode == "I;16B" else "<u2").tobytes()) \
            if mode != "I" else Image.fromarray(deep.astype(np.int32))
        expected = np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=2)
    elif mode == "F":
        image = Image.fromarray(np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8))
        expected = np.repeat(np.rint(np.linspace(0, 1, 48).reshape(6, 8) * 255).astype(np.uint8)[..., None], 3, 2)
    else:
        image = base.convert(mode)
        expected = np.asarray(image.convert("RGB"))
    array = rgb_array(image)
    assert array.dtype == np.uint8 and array.shape == (6, 8, 3)
    assert np.array_equal(array, expected)
    if mode == "RGBA":  # alpha dropped, not composited
        assert np.array_equal(array, np.asarray(base))


def test_unmappable_pictures_are_refused_with_the_file_name(tmp_path):
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        rgb_array(Image.fromarray(np.full((4, 4), 3.5, np.float32)))
    with pytest.raises(ValueError, match="outside 0..65535"):
        rgb_array(Image.fromarray(np.full((4, 4), 70000, np.int32)))
    Image.fromarray(np.full((4, 4), -2.0, np.float32)).save(tmp_path / "depth.tif")
    with pytest.raises(ValueError, match=r"cannot read image .*depth\.tif"):
        load_image(tmp_path / "depth.tif")


# ------------------------------------------------------------------------------------------ 4. bad annotations
def test_panoptic_image_without_annotation_is_counted(tmp_path):
    images, annotations = _panoptic_source(tmp_path)
    json_path = _write_json(tmp_path / "pan.json", images, annotations[:1])
    summary = coco_panoptic_to_shards.convert(json_path, tmp_path / "png", tmp_path / "img", tmp_path / "out", "pan",
                                              progress=False)
    assert summary.written == 1 and summary.skipped_images == {"no panoptic annotation": 1}
    assert "skipped images: 1 (no panoptic annotation)" in summary.report()
    sample = next(read_shards(tmp_path / "out"))
    assert sample.image_id == 1 and len(sample.labels) == 2


def test_unusable_boxes_are_skipped_or_clipped_and_counted(tmp_path):
    _picture(32, 24).save(tmp_path / "a.jpg")
    boxes = {1: [2, 3, 10, 8],  # fine
             2: [float("nan"), 1, 5, 5], 3: [1, 1, float("inf"), 5],  # non-finite
             4: [-4, 20, 10, 10],  # partly outside: -> [0, 20, 6, 4]
             5: [40, 2, 5, 5], 6: [-20, 2, 10, 5]}  # entirely outside
    annotations = [{"id": k, "image_id": 1, "category_id": 1, "bbox": b, "iscrowd": 0} for k, b in boxes.items()]
    json_path = _write_json(tmp_path / "ann.json", [{"id": 1, "file_name": "a.jpg", "width": 32, "height": 24}],
                            annotations)
    summary = coco_detection_to_shards.convert(json_path, tmp_path, tmp_path / "out", "boxes", progress=False)
    assert summary.objects == 2
    assert summary.skipped_objects == {"non-finite box": 2, "box outside the image": 2}
    assert summary.adjusted_objects == {"box clipped to image": 1}
    report = summary.report()
    assert "skipped objects: 2 (non-finite box)" in report and "adjusted objects: 1 (box clipped to image)" in report
    sample = next(read_shards(tmp_path / "out"))
    assert sample.boxes.tolist() == [[2, 3, 12, 11], [0, 20, 6, 24]]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["summary"]["adjusted_objects"] == {"box clipped to image": 1}


# ------------------------------------------------------------------------------------------ 5. EXIF orientation
def _rotated_photo(path, orientation: int, size=(40, 24)):
    exif = Image.Exif()
    exif[0x0112] = orientation
    _picture(*size).save(path, quality=95, exif=exif)
    with Image.open(path) as opened:
        return np.asarray(ImageOps.exif_transpose(opened).convert("RGB")), np.asarray(opened.convert("RGB"))


def _convert_one(tmp_path, name, width, height, box):
    json_path = _write_json(tmp_path / f"{name}.json", [{"id": 1, "file_name": "photo.jpg", "width": width,
                                                         "height": height}],
                            [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box}])
    summary = coco_detection_to_shards.convert(json_path, tmp_path, tmp_path / name, name, progress=False)
    raw = dict(read_tar(next((tmp_path / name).glob("*.tar"))))
    return summary, next(read_shards(tmp_path / name)), raw["000000000001.jpg"]


def test_exif_orientation_is_applied_when_the_json_has_the_upright_size(tmp_path):
    upright, stored = _rotated_photo(tmp_path / "photo.jpg", 6)
    assert upright.shape == (40, 24, 3) and stored.shape == (24, 40, 3)
    summary, sample, jpg = _convert_one(tmp_path, "up", 24, 40, [2, 30, 8, 6])
    assert summary.written == 1 and summary.exif_applied == 1 and summary.exif_ignored == 0
    assert "EXIF orientation applied (stored upright, re-encoded): 1" in summary.report()
    image = sample.image.permute(1, 2, 0).numpy().astype(int)
    assert image.shape == upright.shape and np.abs(image - upright).mean() < 2  # re-encoded at quality 95
    with Image.open(io.BytesIO(jpg)) as stored_jpeg:
        assert 0x0112 not in stored_jpeg.getexif()  # no tag left to turn it a second time
    assert sample.boxes.tolist() == [[2, 30, 10, 36]]
    assert np.array_equal(load_image(tmp_path / "photo.jpg")[0], upright)  # the predictor reads it the same way


def test_exif_orientation_is_ignored_with_a_warning_when_the_json_has_the_stored_size(tmp_path, caplog):
    _, stored = _rotated_photo(tmp_path / "photo.jpg", 6)
    with caplog.at_level(logging.WARNING):
        summary, sample, jpg = _convert_one(tmp_path, "raw", 40, 24, [2, 3, 8, 6])
    assert summary.written == 1 and summary.exif_ignored == 1 and summary.exif_applied == 0
    assert jpg == (tmp_path / "photo.jpg").read_bytes()  # stored as it was
    assert torch.equal(sample.image.permute(1, 2, 0), torch.from_numpy(stored.copy()))
    assert any("photo.jpg" in r.getMessage() and "EXIF orientation 6 ignored" in r.getMessage()
               for r in caplog.records)
    assert "EXIF orientation ignored (the JSON size matches the stored pixels): 1" in summary.report()


def test_half_turn_fits_both_sizes_and_is_applied(tmp_path):
    upright, stored = _rotated_photo(tmp_path / "photo.jpg", 3)
    assert not np.array_equal(upright, stored)
    summary, sample, _ = _convert_one(tmp_path, "half", 40, 24, [2, 3, 8, 6])
    assert summary.exif_applied == 1
    assert np.abs(sample.image.permute(1, 2, 0).numpy().astype(int) - upright).mean() < 2
