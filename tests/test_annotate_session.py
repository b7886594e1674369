"""openseed.annotate.session with the tiny model: an image is encoded once (cached, or prefetched in the background),
boxes become stored objects with masks at the image's size, a redrawn box is decoded again, broken pictures and boxes
outside the image are clear errors."""

import shutil
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from openseed.annotate.folder import ImageFolder
from openseed.annotate.session import AnnotationSession, UnreadableImage
from openseed.annotate.store import AnnotationStore
from openseed.modeling.openseed import build_openseed
from openseed.predict import Predictor

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "coco_panoptic_sample" / "input_images" / \
    "000000142238.jpg"


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(build_openseed("tiny"), device="cpu", image_size=256)


@pytest.fixture
def session(predictor, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(PHOTO, root / name)
    data = PHOTO.read_bytes()
    (root / "d_broken.jpg").write_bytes(data[: len(data) // 3])  # the header reads, the pixels do not
    session = AnnotationSession(predictor, ImageFolder(root), AnnotationStore(tmp_path / "journal"), cache_size=2)
    yield session
    session.close()


def test_boxes_become_objects_and_each_image_is_encoded_once(session):
    first = session.segment("a.jpg", [[100, 100, 300, 400], [10, 10, 50, 60]], ["person", "horse"])
    assert [(o.id, o.category, o.source, o.status) for o in first] == [(1, "person", "model", "accepted"),
                                                                    (2, "horse", "model", "accepted")]
    mask = mask_utils.decode(first[0].rle)
    assert mask.shape == (427, 640) and first[0].box == (100.0, 100.0, 300.0, 400.0)
    expected = session.predictor.segment_boxes(PHOTO, [[100, 100, 300, 400], [10, 10, 50, 60]], ["person", "horse"])
    np.testing.assert_array_equal(mask.astype(bool), expected.masks[0].numpy())
    session.segment("a.jpg", [[0, 0, 700, 500]], ["grass"], status="proposed")  # clipped to the image
    assert session.store.objects("a.jpg")[-1].box == (0.0, 0.0, 640.0, 427.0)
    assert session.encodes == 1  # one encoding for three calls
    moved = session.resegment(2, box=[20, 20, 90, 80], category="dog")
    assert moved.category == "dog" and moved.box == (20.0, 20.0, 90.0, 80.0) and session.encodes == 1
    with pytest.raises(ValueError, match="outside"):
        session.segment("a.jpg", [[700, 500, 800, 600]], ["dog"])


def test_prefetch_encodes_ahead_and_the_cache_keeps_the_last_images(session):
    future = session.prefetch("b.jpg")
    future.result(timeout=120)
    assert session.encodes == 1 and session.prefetch("b.jpg") is None  # cached: nothing more to do
    session.segment("b.jpg", [[100, 100, 300, 400]], ["person"])
    assert session.encodes == 1  # the box used the prefetched encoding
    session.encoded("a.jpg")
    session.encoded("c.jpg")  # cache_size=2: b.jpg leaves
    session.encoded("b.jpg")
    assert session.encodes == 4
    with pytest.raises(UnreadableImage, match="d_broken.jpg"):
        session.encoded("d_broken.jpg")
    with pytest.raises(KeyError, match="not an image of"):
        session.prefetch("../journal")
