"""openseed.annotate: the annotation journal (changes on disk at once, undo / redo, resume, torn writes) and COCO
export (RLE exact, polygons traced along pixel edges) and import, read back with pycocotools."""

import json

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from scipy import ndimage

from openseed.annotate.coco import export_coco, import_coco, mask_to_polygons
from openseed.annotate.store import AnnotationStore, JournalError
from openseed.core.codecs import encode_rle
from openseed.evaluation.instances import evaluate_coco


def _rle(mask: np.ndarray) -> dict:
    return encode_rle(mask[None])[0]


def _blob(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(4):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 4)
        mask[y: y + rng.integers(2, 9), x: x + rng.integers(2, 9)] = True
    mask[rng.random((height, width)) < 0.05] = True  # single pixels, some touching others only at a corner
    return mask


def test_changes_are_on_disk_at_once_and_reopening_resumes_with_undo(tmp_path):
    journal = tmp_path / "annotations.journal"
    store = AnnotationStore(journal)
    a = store.add("a.jpg", "dog", [1, 2, 10, 12])
    b = store.add("a.jpg", "cat", [0, 0, 5, 5])
    store.update(a.id, category="puppy")
    store.remove(b.id)
    assert [(o.id, o.category) for o in store.objects("a.jpg")] == [(1, "puppy")]
    reopened = AnnotationStore(journal)  # what a crash right now would leave
    assert reopened.objects() == store.objects()
    assert reopened.undo("a.jpg") == b  # the removal undone: cat is back
    assert reopened.undo("a.jpg").category == "dog"  # the rename undone
    assert [o.category for o in reopened.objects("a.jpg")] == ["dog", "cat"]
    assert reopened.redo("a.jpg").category == "puppy"
    again = AnnotationStore(journal)
    assert [o.category for o in again.objects("a.jpg")] == ["puppy", "cat"] and again.can_redo("a.jpg")
    new = again.add("a.jpg", "bird", [3, 3, 4, 4])  # a new change clears the redo stack; ids are never reused
    assert new.id == 3 and not again.can_redo("a.jpg")
    with pytest.raises(LookupError, match="nothing to undo on b.jpg"):
        again.undo("b.jpg")
    with pytest.raises(ValueError, match="x0 < x1"):
        again.add("a.jpg", "dog", [5, 5, 5, 9])


def test_a_torn_last_line_is_dropped_and_a_broken_one_named(tmp_path, caplog):
    journal = tmp_path / "j"
    store = AnnotationStore(journal)
    store.add("a.jpg", "dog", [1, 2, 10, 12])
    store.add("a.jpg", "cat", [1, 2, 10, 12])
    text = journal.read_bytes()
    journal.write_bytes(text[:-20])  # the last write cut short
    with caplog.at_level("WARNING"):
        reopened = AnnotationStore(journal)
    assert [o.category for o in reopened.objects()] == ["dog"] and "incomplete last line" in caplog.text
    reopened.add("a.jpg", "bird", [0, 0, 1, 1])  # the journal goes on from the good part
    assert [o.category for o in AnnotationStore(journal).objects()] == ["dog", "bird"]
    lines = journal.read_text().splitlines()
    lines[1] = "{not json"
    journal.write_text("\n".join(lines) + "\n")
    with pytest.raises(JournalError, match=r"j, line 2: not JSON"):
        AnnotationStore(journal)
    other = tmp_path / "other.json"
    other.write_text('{"images": []}\n')
    with pytest.raises(JournalError, match="not an openseed annotation journal"):
        AnnotationStore(other)


@pytest.mark.parametrize("seed", range(8))
def test_polygons_rasterise_back_to_the_mask(seed):
    """pycocotools gives back the mask's pixels, its holes filled (a COCO polygon has none) and nothing else."""
    mask = _blob(37, 41, seed)
    polygons = mask_to_polygons(mask)
    back = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, 37, 41))).astype(bool)
    np.testing.assert_array_equal(back, ndimage.binary_fill_holes(mask))


def test_a_ring_exports_its_outer_boundary_and_rle_keeps_the_hole():
    mask = np.zeros((10, 10), dtype=bool)
    mask[2:8, 2:8] = True
    mask[4:6, 4:6] = False
    (polygon,) = mask_to_polygons(mask)
    assert polygon == [2.0, 2.0, 8.0, 2.0, 8.0, 8.0, 2.0, 8.0]
    diagonal = np.zeros((4, 4), dtype=bool)
    diagonal[0, 0] = diagonal[1, 1] = True  # touching at a corner: two 4-connected parts
    assert sorted(mask_to_polygons(diagonal)) == [[0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0],
                                                  [1.0, 1.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]]


def test_export_is_read_back_by_pycocotools_and_imported_again(tmp_path):
    store = AnnotationStore(tmp_path / "j")
    masks = {("b.jpg", 0): _blob(30, 40, 1), ("a.jpg", 0): _blob(20, 24, 2), ("a.jpg", 1): _blob(20, 24, 3)}
    store.add("b.jpg", "zebra", [0, 0, 10, 10], _rle(masks["b.jpg", 0]), "model")
    store.add("a.jpg", "dog", [0, 0, 10, 10], _rle(masks["a.jpg", 0]), "model")
    store.add("a.jpg", "new thing", [0, 0, 10, 10], _rle(masks["a.jpg", 1]), "model")
    store.add("a.jpg", "dog", [2.5, 3, 7, 9])  # a box without a mask yet
    images = [("a.jpg", 20, 24), ("b.jpg", 30, 40), ("empty.jpg", 8, 8)]
    for fmt in ("rle", "polygons"):
        path = tmp_path / f"{fmt}.json"
        path.write_text(json.dumps(export_coco(store, images, categories=["dog", "cat"], segmentation=fmt)))
        coco = COCO(str(path))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["dog", "cat", "new thing", "zebra"]
        assert coco.getImgIds() == [1, 2, 3] and sorted(coco.getAnnIds()) == [1, 2, 3, 4]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
        assert [a["category_id"] for a in anns] == [1, 3, 1]
        for ann, key in zip(anns[:2], [("a.jpg", 0), ("a.jpg", 1)]):
            got = coco.annToMask(ann).astype(bool)
            if fmt == "rle":
                np.testing.assert_array_equal(got, masks[key])
                assert ann["area"] == masks[key].sum()
            else:
                assert (got >= masks[key]).all() and (got & ~masks[key]).sum() == (
                    ndimage.binary_fill_holes(masks[key]) & ~masks[key]).sum()
        assert anns[2]["bbox"] == [2.5, 3.0, 4.5, 6.0] and anns[2]["area"] == 27.0
    # openseed's own COCO evaluator reads the export as ground truth: the objects themselves score AP 1
    exported = json.loads((tmp_path / "rle.json").read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "segmentation": a["segmentation"], "score": 1.0} for a in exported["annotations"]]
    for iou_type in ("bbox", "segm"):
        assert evaluate_coco(exported, results, iou_type)["AP"] == pytest.approx(1.0)
    again = AnnotationStore(tmp_path / "j2")
    counts = import_coco(again, tmp_path / "rle.json", {"a.jpg": (20, 24), "b.jpg": (30, 40)})
    assert counts == {"imported": 4, "skipped_images": 1}  # empty.jpg is not in this folder
    assert [(o.image, o.category, o.source) for o in again.objects()] == [
        ("a.jpg", "dog", "import"), ("a.jpg", "new thing", "import"), ("a.jpg", "dog", "import"),
        ("b.jpg", "zebra", "import")]
    np.testing.assert_array_equal(mask_utils.decode(again.objects()[3].rle).astype(bool), masks["b.jpg", 0])


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "a COCO file is a JSON object"),
    ('{"images": [], "categories": []}', "'annotations' must be a list"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] needs"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 24}], "categories": [{"id": 1, "name": "x"}],'
     ' "annotations": [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1]}]}', r"annotations\[0\]: 'category_id'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 24}], "categories": [{"id": 1, "name": "x"}],'
     ' "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0]}]}', r"annotations\[0\]: 'bbox'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg", "height": 20, "width": 24}], "categories": [{"id": 1, "name": "x"}],'
     ' "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2], "segmentation": [[1, 2]]}]}',
     r"annotations\[0\]: 'segmentation'"),
    ("{broken", "not a readable JSON file"),
])
def test_a_malformed_coco_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    store = AnnotationStore(tmp_path / "j")
    with pytest.raises(ValueError, match=message) as err:
        import_coco(store, path, {"a.jpg": (20, 24)})
    assert "bad.json" in str(err.value)
    assert store.objects() == []  # nothing half-imported


def test_proposals_wait_for_review_and_only_accepted_objects_are_exported(tmp_path):
    store = AnnotationStore(tmp_path / "j")
    mask = _blob(20, 24, 5)
    kept, dropped = store.add_many([("a.jpg", "dog", [0, 0, 9, 9], _rle(mask), "model"),
                                    ("a.jpg", "cat", [1, 1, 9, 9], _rle(mask), "model")], status="proposed")
    assert export_coco(store, [("a.jpg", 20, 24)])["annotations"] == []
    store.update(kept.id, status="accepted")
    store.remove(dropped.id)
    reopened = AnnotationStore(tmp_path / "j")
    assert [(o.category, o.status) for o in reopened.objects()] == [("dog", "accepted")]
    coco = export_coco(reopened, [("a.jpg", 20, 24)])
    assert [c["name"] for c in coco["categories"]] == ["dog"] and len(coco["annotations"]) == 1
    with pytest.raises(ValueError, match="status must be one of"):
        store.update(kept.id, status="maybe")
