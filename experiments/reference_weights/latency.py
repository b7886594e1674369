"""CPU latency of a converted full-size released architecture: forward at the reference's input size, stage by stage,
and box prompts on an encoded image.

    python experiments/reference_weights/latency.py [arch=swint_nodecouple] [threads=2] [repeats=3] [json=FILE]

The weights have the released layout (``layout_checkpoint.py``: random values, since the released files cannot be
downloaded here) and go through the real converter; the input is the fixture photo resized as the reference
(800 x 1199, padded to 800 x 1216); the vocabulary is the fixture's 10 classes. Reported, medians of ``repeats``
runs after a warm-up (fp32, ``threads`` threads): the text prompt ensemble (once per vocabulary, then cached), the
backbone, the pixel decoder, the decoder (every layer's masks, as in training, and only the final ones, as the
predictor and the evaluation loop run it), the whole forward as the predictor runs it (text cached), and
``decode_boxes`` for 10 boxes with the image already encoded and only the boxes' masks (``segment_boxes``: what an
annotation tool pays per request). ``profile=true`` also prints one forward's ``torch.profiler`` table: time per
stage and the operators that take it.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layout_checkpoint import layout_state_dict  # noqa: E402

from openseed.cli import Option, command, flag, integer, one_of, path  # noqa: E402
from openseed.convert_checkpoint import convert  # noqa: E402
from openseed.core.vocabulary import Vocabulary  # noqa: E402
from openseed.modeling.openseed import load_model  # noqa: E402
from openseed.predict import Predictor, load_image  # noqa: E402

PHOTO = ROOT.parent / "shared" / "realdata" / "coco_panoptic_sample" / "input_images" / "000000142238.jpg"
THINGS = ["person", "sports ball", "dog", "car", "bench"]
STUFF = ["grass-merged", "tree-merged", "sky-other-merged", "dirt-merged", "fence-merged"]


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls after one warm-up call; the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


OPTIONS = {
    "arch": Option("the released architecture whose layout is converted and timed", "swint_nodecouple",
                   one_of(["swint_nodecouple", "swint_decouple", "swinl_decouple"])),
    "threads": Option("torch threads", 2, integer(1)),
    "repeats": Option("timed calls per part; the median is shown", 3, integer(1)),
    "json": Option("also write the figures to this file", None, path),
    "profile": Option("also profile one forward with torch.profiler and print where the time goes", False, flag),
}


@command(OPTIONS, "python experiments/reference_weights/latency.py", __doc__)
def main(args) -> int:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        source, converted = Path(tmp) / "layout.pt", Path(tmp) / "converted.pt"
        torch.save(layout_state_dict(args.arch), source)
        convert(source, converted, arch=args.arch, log=lambda message: None)
        model = load_model(converted).eval()
    vocabulary = Vocabulary.from_names(THINGS + STUFF, [True] * 5 + [False] * 5)
    predictor = Predictor(model, device="cpu")
    images, padding, size, _ = predictor._prepare(load_image(PHOTO)[0])
    figures: dict = {"arch": args.arch, "threads": args.threads, "input": list(images.shape[-2:]),
                     "resized": list(size), "torch": torch.__version__}
    with torch.no_grad():
        start = time.perf_counter()
        text = model.embed_vocabulary(vocabulary)
        figures["text_ensemble_first_s"] = time.perf_counter() - start
        figures["text_cached_s"], _ = timed(lambda: model.embed_vocabulary(vocabulary), args.repeats)
        pixels = model.normalise(images, padding)
        figures["backbone_s"], features = timed(lambda: model.backbone(pixels), args.repeats)
        figures["pixel_decoder_s"], memory = timed(lambda: model.pixel_decoder(features, padding), args.repeats)
        figures["decoder_s"], _ = timed(lambda: model.decoder(memory, text), args.repeats)
        figures["decoder_final_masks_s"], _ = timed(lambda: model.decoder(memory, text, masks="final"), args.repeats)
        figures["forward_s"], _ = timed(lambda: model.forward_images(images, padding, vocabulary, masks="final"),
                                        args.repeats)
        generator = torch.Generator().manual_seed(0)
        corner = torch.rand(10, 2, generator=generator) * torch.tensor([size[1] * 0.7, size[0] * 0.7])
        extent = torch.rand(10, 2, generator=generator) * torch.tensor([size[1] * 0.3, size[0] * 0.3]) + 8
        boxes = torch.cat([corner, corner + extent], 1)
        labels = torch.randint(0, len(vocabulary), (10,), generator=generator)
        figures["boxes_10_encoded_s"], outputs = timed(
            lambda: model.decode_boxes(images, padding, vocabulary, [boxes], [labels], memory=memory, text=text,
                                       masks="prompts"), args.repeats)
        assert outputs.conditioned.predictions[-1].masks.shape[1] == 10
        if args.profile:
            print_profile(lambda: model.forward_images(images, padding, vocabulary, masks="final"))
    rows = [("text prompt ensemble (10 classes x 81 templates, first call)", "text_ensemble_first_s"),
            ("text embeddings, cached", "text_cached_s"), ("backbone", "backbone_s"),
            ("pixel decoder", "pixel_decoder_s"), ("decoder (matching queries), every layer's masks", "decoder_s"),
            ("decoder (matching queries), final masks only", "decoder_final_masks_s"),
            ("whole forward as the predictor runs it (text cached, final masks)", "forward_s"),
            ("10 box prompts, image encoded, their masks only", "boxes_10_encoded_s")]
    print(f"{args.arch}, input {images.shape[-2]} x {images.shape[-1]}, {args.threads} threads, fp32, "
          f"median of {args.repeats}\n\n| part | seconds |\n|---|---|")
    for label, key in rows:
        print(f"| {label} | {figures[key]:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def print_profile(forward) -> None:
    """One call of ``forward`` under ``torch.profiler``: milliseconds per stage (the model's ``record_function``
    regions) and the operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward()
    events = prof.key_averages()
    stages = ["text_encoder", "backbone", "pixel_decoder", "ms_deform_attn", "decoder"]
    print("\n| stage (profiled forward) | ms | calls |\n|---|---|---|")
    for event in events:
        if event.key in stages:
            print(f"| {event.key} | {event.cpu_time_total / 1e3:.0f} | {event.count} |")
    print()
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    raise SystemExit(main())
