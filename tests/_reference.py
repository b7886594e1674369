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
