"""What an annotator waits for in ``python -m openseed.annotate``, on this machine's CPU: the time to the first mask
of a new image (encode + one box), one box and ten boxes on an encoded image, and the first mask of the next image
when it was prefetched while the annotator worked.

    python experiments/model_profile/annotate_latency.py [size=small] [image_size=null] [threads=2] [repeats=3]

The model has random weights (the cost does not depend on them); the picture is the COCO fixture photo (640 x 427),
copied under several names so that each "new image" is really encoded. Medians of ``repeats``.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from openseed.annotate.folder import ImageFolder  # noqa: E402
from openseed.annotate.session import AnnotationSession  # noqa: E402
from openseed.annotate.store import AnnotationStore  # noqa: E402
from openseed.cli import Option, command, integer, optional_int, path  # noqa: E402
from openseed.modeling.openseed import build_openseed  # noqa: E402
from openseed.predict import Predictor  # noqa: E402

PHOTO = ROOT.parent / "shared" / "realdata" / "coco_panoptic_sample" / "input_images" / "000000142238.jpg"
BOXES = [[100, 100, 300, 400], [10, 10, 50, 60], [300, 50, 420, 200], [450, 100, 600, 400], [0, 300, 200, 420],
         [200, 200, 260, 300], [500, 20, 630, 120], [50, 150, 150, 250], [350, 250, 450, 420], [250, 0, 330, 90]]


def seconds(session: AnnotationSession, name: str, boxes: list[list[int]]) -> float:
    """Seconds for ``session.segment`` of these boxes on that image."""
    start = time.perf_counter()
    session.segment(name, boxes, ["thing"] * len(boxes))
    return time.perf_counter() - start


OPTIONS = {
    "size": Option("model size (MODEL_SIZES)", "small", path),
    "image_size": Option("the longer side the picture is resized to (null: as the model records)", None,
                         lambda v, k: optional_int(v, k)),
    "threads": Option("torch threads", 2, integer(1)),
    "repeats": Option("measurements per figure; the median is shown", 3, integer(1)),
}


@command(OPTIONS, "python experiments/model_profile/annotate_latency.py", __doc__)
def main(args) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    predictor = Predictor(build_openseed(args.size), device="cpu", image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        root.mkdir()
        count = 3 * args.repeats + 2
        for i in range(count):
            shutil.copy(PHOTO, root / f"{i:03d}.jpg")
        session = AnnotationSession(predictor, ImageFolder(root), AnnotationStore(Path(tmp) / "journal"),
                                    cache_size=count)
        names = [image.name for image in session.folder.images]
        session.segment(names.pop(), BOXES[:1], ["thing"])  # warm-up
        first, one, ten, prefetched = [], [], [], []
        for _ in range(args.repeats):
            name = names.pop()
            first.append(seconds(session, name, BOXES[:1]))  # encode + 1 box
            one.append(seconds(session, name, BOXES[:1]))
            ten.append(seconds(session, name, BOXES))
            following = names.pop()
            session.prefetch(following).result()  # the annotator was slower than the encoder
            prefetched.append(seconds(session, following, BOXES[:1]))
        session.close()
    size = predictor.resize.output_size(427, 640)
    print(f"{args.size}, picture 640 x 427 resized to {size[1]} x {size[0]}, {args.threads} threads, median of "
          f"{args.repeats}\n\n| wait | seconds |\n|---|---|")
    for label, values in [("first mask of a new image (encode + 1 box)", first), ("1 box, image encoded", one),
                          ("10 boxes, image encoded", ten), ("first mask of a prefetched image", prefetched)]:
        print(f"| {label} | {statistics.median(values):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
