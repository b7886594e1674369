"""Predictor latency per image on this machine (panoptic task, a real COCO photo, after a warm-up).

    python experiments/model_profile/predictor_latency.py [repeats=3] [realdata=DIR]

Swin-T (the decoupled released architecture, random weights: the size is what matters for speed) runs at 1024, the
small CPU model at 160 and 512. (Converted released models run at the reference's 800 x 1333:
experiments/reference_weights/latency.py.)
The vocabulary is the 133 COCO panoptic classes; its prompt-ensemble embedding is cached after the first call.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from openseed import Predictor  # noqa: E402
from openseed.cli import Option, command, integer, path  # noqa: E402
from openseed.core.vocabulary import Vocabulary  # noqa: E402
from openseed.modeling.openseed import build_openseed  # noqa: E402

REALDATA = ROOT.parent / "shared" / "realdata" / "coco_panoptic_sample"


OPTIONS = {
    "repeats": Option("timed predictions per setting; the median is shown", 3, integer(1)),
    "realdata": Option("the COCO panoptic sample (its photo and categories)", str(REALDATA), path),
}


@command(OPTIONS, "python experiments/model_profile/predictor_latency.py", __doc__)
def main(args) -> int:
    photo = Path(args.realdata) / "input_images" / "000000142238.jpg"
    categories = json.loads((Path(args.realdata) / "panoptic_coco_categories.json").read_text())
    vocabulary = Vocabulary.from_coco_categories(categories)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image {photo.name} (640x427)\n")
    print("| model | image size | first call (s, incl. text ensemble) | per image (s, median) |\n|---|---|---|---|")
    torch.manual_seed(0)
    for name, build, size in (("small", lambda: build_openseed("small"), 160),
                              ("small", lambda: build_openseed("small"), 512),
                              ("swint_decouple", lambda: build_openseed("swint_decouple"), 1024)):
        predictor = Predictor(build(), device="cpu", image_size=size)
        start = time.perf_counter()
        predictor(photo, vocabulary, task="panoptic")
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            predictor(photo, vocabulary, task="panoptic")
            times.append(time.perf_counter() - start)
        print(f"| {name} | {size} | {first:.1f} | {statistics.median(times):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
