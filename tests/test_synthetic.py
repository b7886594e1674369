"""Tests of data_prep.synthetic: the synthshapes generator writes consistent, deterministic COCO files."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data_prep import synthetic as S

SCALE = 0.01  # 20 / 2 / 40 / 2 images


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    S.generate(out, seed=0, scale=SCALE, workers=2, progress=False)
    return out


def _pan_ids(png: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def _tight_box(m: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _assert_colour_family(name: str, rgb: np.ndarray) -> None:
    r, g, b = rgb
    colour = name.split(" ")[0]
    if colour == "red":
        assert r > g + 60 and r > b + 60, (name, rgb)
    elif colour == "green":
        assert g > r + 60 and g > b + 60, (name, rgb)
    elif colour == "blue":
        assert b > r + 60 and b > g + 60, (name, rgb)
    elif colour == "yellow":
        assert r > b + 80 and g > b + 80, (name, rgb)
    else:
        raise AssertionError(name)


# ------------------------------------------------------------------------------------------------ layout


def test_manifest_and_files(data: Path) -> None:
    m = _load(data / "synthshapes.json")
    assert m["seed"] == 0 and m["scale"] == SCALE and m["image_size"] == 160 and m["version"] == 1
    assert m["counts"] == {"seg_train": 20, "seg_val": 2, "det_train": 40, "det_val": 2}
    assert len(m["seg_thing_classes"]) == 16 and len(m["det_only_classes"]) == 16
    assert m["stuff_classes"] == ["sky", "grass", "water", "sand", "brick wall", "road"]
    assert m["variant"] == "standard"
    for split, n in m["counts"].items():
        jpgs = sorted((data / split / "images").glob("*.jpg"))
        assert [p.name for p in jpgs] == [f"{i:012d}.jpg" for i in range(1, n + 1)]
        with Image.open(jpgs[0]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (160, 160)
        if split.startswith("seg"):
            pngs = sorted((data / split / "panoptic").glob("*.png"))
            assert [p.name for p in pngs] == [f"{i:012d}.png" for i in range(1, n + 1)]
            js = _load(data / split / "panoptic.json")
        else:
            js = _load(data / split / "instances.json")
        assert set(js) >= {"info", "licenses", "images", "annotations", "categories"}
        assert [im["id"] for im in js["images"]] == list(range(1, n + 1))
        assert all(im["height"] == 160 and im["width"] == 160 for im in js["images"])


def test_categories() -> None:
    things = S.thing_categories()
    assert [c["id"] for c in things] == list(range(1, 33))
    assert things[0]["name"] == "red circle" and things[8]["name"] == "green circle"
    assert things[31]["name"] == "yellow cross"
    assert all(c["isthing"] == 1 and c["supercategory"] == "shape" for c in things)
    stuff = S.stuff_categories()
    assert [(c["id"], c["name"]) for c in stuff] == list(zip(range(101, 107), S.STUFF_CLASSES))
    assert all(c["isthing"] == 0 and c["supercategory"] == "stuff" for c in stuff)
    crowded = S.stuff_categories(S.VARIANTS["crowded"].stuff_classes)
    assert crowded[:6] == stuff and [c["id"] for c in crowded] == list(range(101, 113))
    colours = [tuple(c["color"]) for c in things + crowded]
    assert len(set(colours)) == len(colours)
    assert len(S.SEG_SHAPES) == 4 and set(S.SEG_SHAPES) <= set(S.SHAPES)


# ------------------------------------------------------------------------------------------------ determinism


def test_deterministic_across_workers(data: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    S.generate(one, seed=0, scale=SCALE, workers=1, progress=False)
    assert _tree_hashes(one) == _tree_hashes(data)


def test_other_seed_differs(data: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    S.generate(other, seed=1, scale=SCALE, workers=2, progress=False)
    a, b = _tree_hashes(data), _tree_hashes(other)
    assert a.keys() - {"synthshapes.json"} == b.keys() - {"synthshapes.json"}
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != b[k] for k in jpgs) == len(jpgs)


# ------------------------------------------------------------------------------------------------ panoptic


@pytest.mark.parametrize("split", ["seg_train", "seg_val"])
def test_panoptic_maps_match_json(data: Path, split: str) -> None:
    js = _load(data / split / "panoptic.json")
    cats = {c["id"]: c for c in js["categories"]}
    assert len(cats) == 22
    assert sorted(i for i, c in cats.items() if c["isthing"]) == sorted(
        S.thing_id(col, s) for col in S.THING_COLOURS for s in S.SEG_SHAPES)
    assert sorted(i for i, c in cats.items() if not c["isthing"]) == list(range(101, 107))
    assert len(js["annotations"]) == len(js["images"])
    for ann, img in zip(js["annotations"], js["images"]):
        assert ann["image_id"] == img["id"]
        ids = _pan_ids(data / split / "panoptic" / ann["file_name"])
        segs = ann["segments_info"]
        seg_ids = [s["id"] for s in segs]
        assert len(set(seg_ids)) == len(seg_ids) and all(0 < i < 256 ** 3 for i in seg_ids)
        assert set(np.unique(ids).tolist()) == set(seg_ids)  # no void, no extra
        n_things = n_stuff = 0
        stuff_cats = []
        for s in segs:
            m = ids == s["id"]
            assert s["area"] == int(m.sum())
            assert s["bbox"] == _tight_box(m)
            assert s["iscrowd"] == 0
            assert s["category_id"] in cats
            if cats[s["category_id"]]["isthing"]:
                n_things += 1
            else:
                n_stuff += 1
                stuff_cats.append(s["category_id"])
        assert 0 < n_things <= 6
        assert 1 <= n_stuff <= 3
        assert len(set(stuff_cats)) == len(stuff_cats)  # one segment per stuff class


def test_panoptic_pixels_match_colours(data: Path) -> None:
    js = _load(data / "seg_train" / "panoptic.json")
    names = {c["id"]: c["name"] for c in js["categories"]}
    checked = Counter()
    for ann, img in zip(js["annotations"], js["images"]):
        ids = _pan_ids(data / "seg_train" / "panoptic" / ann["file_name"])
        rgb = np.asarray(Image.open(data / "seg_train" / "images" / img["file_name"]).convert("RGB"))
        for s in ann["segments_info"]:
            name = names[s["category_id"]]
            pix = rgb[ids == s["id"]].astype(np.float64)
            if s["category_id"] <= 32:
                _assert_colour_family(name, pix.mean(axis=0))
                checked["thing"] += 1
            elif s["area"] >= 400:
                r, g, b = pix.mean(axis=0)
                if name == "sky" or name == "water":
                    assert b > r + 30, (name, (r, g, b))
                elif name == "grass":
                    assert g > r + 30 and g > b + 30, (name, (r, g, b))
                elif name == "sand":
                    assert r > b + 30 and g > b + 20 and r > 150, (name, (r, g, b))
                elif name == "brick wall":
                    assert r > g + 25 and r > b + 25, (name, (r, g, b))
                elif name == "road":
                    assert max(r, g, b) - min(r, g, b) < 25 and max(r, g, b) < 130, (name, (r, g, b))
                checked["stuff"] += 1
    assert checked["thing"] >= 20 and checked["stuff"] >= 10


# ------------------------------------------------------------------------------------------------ detection


def test_detection_splits(data: Path) -> None:
    seen = Counter()
    for split in ("det_train", "det_val"):
        js = _load(data / split / "instances.json")
        assert [c["id"] for c in js["categories"]] == list(range(1, 33))
        assert all(c["isthing"] == 1 for c in js["categories"])
        assert [a["id"] for a in js["annotations"]] == list(range(1, len(js["annotations"]) + 1))
        image_ids = {im["id"] for im in js["images"]}
        per_image = Counter(a["image_id"] for a in js["annotations"])
        assert set(per_image) <= image_ids and max(per_image.values()) <= 6
        for a in js["annotations"]:
            assert 1 <= a["category_id"] <= 32 and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and w >= 1 and h >= 1 and x + w <= 160 and y + h <= 160
            assert S.MIN_VISIBLE_PIXELS <= a["area"] <= w * h
            assert ("segmentation" in a) == (split == "det_val")
            seen[S.SHAPES[(a["category_id"] - 1) % 8]] += 1
    for shape in ("star", "hexagon", "heart", "cross"):
        assert seen[shape] > 0, seen


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools vs numpy 2
def test_det_val_rle(data: Path) -> None:
    js = _load(data / "det_val" / "instances.json")
    names = {c["id"]: c["name"] for c in js["categories"]}
    files = {im["id"]: im["file_name"] for im in js["images"]}
    assert js["annotations"]
    masks_per_image: dict[int, list[np.ndarray]] = {}
    for a in js["annotations"]:
        seg = a["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == [160, 160]
        rle = {"size": seg["size"], "counts": seg["counts"].encode()}
        m = mask_utils.decode([rle])[:, :, 0].astype(bool)
        assert int(m.sum()) == a["area"] == int(mask_utils.area([rle])[0])
        assert a["bbox"] == _tight_box(m)
        rgb = np.asarray(Image.open(data / "det_val" / "images" / files[a["image_id"]]).convert("RGB"))
        _assert_colour_family(names[a["category_id"]], rgb[m].astype(np.float64).mean(axis=0))
        masks_per_image.setdefault(a["image_id"], []).append(m)
    for ms in masks_per_image.values():  # visible masks never overlap
        assert int(np.sum(ms, axis=0).max()) == 1


def test_render_image_partition() -> None:
    rng = np.random.default_rng([7, 0, 0])
    out = S.render_image(rng, 96, S.SHAPES)
    total = np.zeros((96, 96), dtype=np.int64)
    for _, m in out["stuff"] + out["things"]:
        assert m.any()
        total += m
    assert (total == 1).all()
    assert out["image"].shape == (96, 96, 3) and out["image"].dtype == np.uint8
    for cat, m in out["things"]:  # painted pixels equal the masks exactly (before JPEG)
        fam = S.THING_COLOURS[(cat - 1) // 8]
        _assert_colour_family(f"{fam} x", out["image"][m].astype(np.float64).mean(axis=0))


# ------------------------------------------------------------------------------------------------ CLI


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    assert S.main([f"out={out}", "scale=0.01", "workers=1", "progress=false"]) == 0
    manifest = _load(out / "synthshapes.json")
    assert manifest["counts"]["det_train"] == 40
    first = capsys.readouterr().out
    assert "det_train=40" in first
    before = (out / "synthshapes.json").stat().st_mtime_ns
    assert S.main([f"out={out}", "scale=0.01", "progress=false"]) == 0
    assert "cached" in capsys.readouterr().out
    assert (out / "synthshapes.json").stat().st_mtime_ns == before


@pytest.mark.parametrize(("arg", "message"), [
    ("scale=0", "scale must be > 0"), ("scale=-1", "scale must be > 0"),
    ("image_size=32", "image_size must be an integer >= 64"), ("--scale", "is not a key=value word"),
    ("progress=maybe", "progress must be true")])
def test_cli_bad_args(tmp_path: Path, capsys, arg: str, message: str) -> None:
    assert S.main([f"out={tmp_path / 'bad'}", arg]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_help_lists_every_key(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        S.main(["--help"])
    text = capsys.readouterr().out
    assert stopped.value.code == 0 and text.startswith("usage: python -m data_prep.synthetic out=...")
    for line in ("  out         output directory (required)", "  scale       multiply", "(default 1.0)",
                 "  variant     standard, or crowded", "(default standard)", "  force       ", "(default false)"):
        assert line in text


# ------------------------------------------------------------------------------------------------ variants


def _render_digest(seed: int, count: int, size: int, variant: S.Variant) -> str:
    digest = hashlib.sha256()
    for i in range(count):
        out = S.render_image(np.random.default_rng([seed, i]), size, S.SHAPES, variant)
        digest.update(out["image"].tobytes())
        for cls, m in out["stuff"] + out["things"]:
            digest.update(bytes([cls]))
            digest.update(np.packbits(m).tobytes())
    return digest.hexdigest()


def test_standard_images_are_unchanged_by_the_variants() -> None:
    """The digest of six standard renders, recorded before the variants existed: the default data set (and so every
    number measured on it) stays what it was."""
    expected = "02fe97a8beeb5e4818765d8ed54c6db004f90765c2e65712dca26260444eb7de"
    assert _render_digest(7, 6, 96, S.VARIANTS["standard"]) == expected


def test_crowded_images_follow_their_layout() -> None:
    crowded = S.VARIANTS["crowded"]
    things, stuff, overlapping = [], [], 0
    for i in range(24):
        out = S.render_image(np.random.default_rng([5, i]), 160, S.SHAPES, crowded)
        total = np.zeros((160, 160), dtype=np.int64)
        for _, m in out["stuff"] + out["things"]:
            assert m.any()
            total += m
        assert (total == 1).all()  # still a partition
        assert all(0 <= cls < 12 for cls, _ in out["stuff"])
        things.append(len(out["things"]))
        stuff.append(len({cls for cls, _ in out["stuff"]}))
        boxes = [_tight_box(m) for _, m in out["things"]]
        overlapping += sum(a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
                           for j, a in enumerate(boxes) for b in boxes[j + 1:])
    assert max(things) <= 12 and np.mean(things) > 5  # standard: 1-6 sampled, about 3 kept
    assert max(stuff) <= 5 and np.mean(stuff) > 2
    assert overlapping > 2 * len(things)  # boxes overlap often: several pairs per image


def test_crowded_set_and_its_cache(tmp_path: Path) -> None:
    out = tmp_path / "crowded"
    m = S.generate(out, seed=0, scale=0.005, workers=1, progress=False, variant="crowded")
    assert m["variant"] == "crowded" and len(m["stuff_classes"]) == 12
    pan = _load(out / "seg_train" / "panoptic.json")
    assert [c["id"] for c in pan["categories"] if not c["isthing"]] == list(range(101, 113))
    used = {seg["category_id"] for a in pan["annotations"] for seg in a["segments_info"]}
    assert used <= {c["id"] for c in pan["categories"]}
    assert "crowded" in pan["info"]["description"]
    assert S.is_cached(out, 0, 0.005, 160, "crowded") is not None
    assert S.is_cached(out, 0, 0.005, 160) is None  # a crowded set is not the standard one
    legacy = S.read_manifest(out)
    legacy.pop("variant")
    legacy["stuff_classes"] = list(S.STUFF_CLASSES)
    (out / "synthshapes.json").write_text(json.dumps(legacy))
    assert S.is_cached(out, 0, 0.005, 160) is not None  # a manifest from before the variants: standard
    with pytest.raises(ValueError, match="unknown synthshapes variant 'busy'"):
        S.generate(tmp_path / "bad", variant="busy")
    assert S.main([f"out={tmp_path / 'bad2'}", "variant=busy"]) == 2
