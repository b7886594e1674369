"""Point a trained model at your own pictures, with your own words.

Command line (``key=value`` arguments, lists in brackets)::

    python -m openseed.predict ckpt=model.safetensors images=[photo.jpg] vocabulary=[dog,frisbee,grass] stuff=[grass] \
        task=panoptic out=predictions
    python -m openseed.predict ckpt=model.safetensors images=[photo.jpg] boxes=[[10,20,200,240]] vocabulary=[dog]

For every image it writes ``OUT/<stem>_<task>.png`` (an overlay: masks, boxes, class names) and
``OUT/<stem>_<task>.json`` (COCO style: panoptic ``segments_info`` with an id PNG ``<stem>_panoptic_ids.png``;
instance result records with RLE masks; semantic class pixel counts with a label PNG; box-prompted records).
With ``boxes`` it runs box-prompted segmentation: one class name per box in ``vocabulary``. Images are resized as
the model records (800 / 1333 shortest-edge for converted released checkpoints, see ``Predictor``) unless
``image_size=N`` (longer side, square padding) or ``short_edge=N max_size=M`` say otherwise; photos are read with
their EXIF orientation.

Python::

    from openseed import Predictor
    predictor = Predictor("model.safetensors")
    result = predictor("photo.jpg", ["dog", "frisbee", "grass"], task="panoptic", stuff=["grass"])
    result.save("predictions")          # overlay PNG + COCO-style JSON (+ the id / label PNG)
"""

from __future__ import annotations

import json
import math
import numbers
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, UnidentifiedImageError

from openseed.cli import Option, UsageError, command, integer, number, one_of, path, string_list
from openseed.core.coco import box_prompt_to_coco, instances_to_coco
from openseed.core.codecs import id_to_rgb
from openseed.core.predictions import BoxPromptMasks, Instances, PanopticSegmentation, SemanticSegmentation
from openseed.core.vocabulary import Vocabulary
from openseed.data.transforms import EvalResize, eval_resize_for
from openseed.modeling.openseed import OpenSeeD
from openseed.modeling.pixel_decoder import EncoderMemory
from openseed.modeling.postprocess import InferenceConfig, postprocess_batch
from openseed.visualize import draw_overlay

TASKS = ("panoptic", "instance", "semantic")


def load_image(image) -> tuple[np.ndarray, str | None]:
    """uint8 [H, W, 3] RGB from a path, a PIL image or an array; a missing or unreadable file is a clear error.

    Pictures are read by ``openseed.data.images.rgb_array``, as the shard converters read them: a file comes out
    upright per its EXIF orientation (as the reference reads it), 16-bit data is scaled to 8 bits (not clipped),
    alpha is dropped. A PIL image is taken as it is (no EXIF orientation applied), in any mode."""
    from openseed.data.images import rgb_array

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                return rgb_array(opened), str(path)
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
    if isinstance(image, Image.Image):
        return rgb_array(image, orient=False), None
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB array, got {array.dtype} {array.shape}")
    return array, None


def class_names(names, what: str = "vocabulary") -> list[str]:
    """Class names as a list of non-empty strings (stripped); ValueError naming ``what``, the index and the value
    otherwise (None, True or 7 are refused, not turned into "None", "True", "7")."""
    from openseed.cli import string_list

    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ValueError(f"{what} must be a list of class names, got {names!r}")
    return string_list(list(names), what, allow_empty=True)


def make_vocabulary(words: Sequence[str] | Vocabulary, stuff: Sequence[str] = ()) -> Vocabulary:
    """A vocabulary from plain words (things unless listed in ``stuff``); "a/b" gives synonyms.

    Every word must be a non-empty string, and no two may name the same class: neither the same word twice nor two
    words the text encoder reads alike ("Dog" and "dog", "wall-brick" and "brick wall"), which would split one class
    in two identical ones. Each is a ValueError naming the words."""
    if isinstance(words, Vocabulary):
        return words
    words = class_names(words)
    if not words:
        raise ValueError("the vocabulary is empty: give at least one class name")
    stuff = class_names(stuff, "stuff")
    unknown = set(stuff) - set(words)
    if unknown:
        raise ValueError(f"stuff names {sorted(unknown)} are not in the vocabulary")
    try:
        vocabulary = Vocabulary.from_names(words, [w not in set(stuff) for w in words])
    except ValueError as err:
        raise ValueError(f"vocabulary: {err}") from None
    first: dict[str, str] = {}
    for word, prompt in zip(words, vocabulary.prompt_names()):
        if prompt in first:
            raise ValueError(f"vocabulary: {first[prompt]!r} and {word!r} are the same class to the text encoder "
                             f"({prompt!r}); give each class once")
        first[prompt] = word
    return vocabulary


def box_prompts(boxes, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Box prompts -> float32 [N, 4] xyxy pixel boxes, checked (and with ``image_size`` = (height, width) clipped).

    ``boxes``: a list of ``[x0, y0, x1, y1]`` (or one such box), a tensor or an array [N, 4]. A box that is not 4
    numbers, has a non-finite coordinate, is empty or inverted (``x1 <= x0`` or ``y1 <= y0``) or, given the image
    size, lies entirely outside the image is a ValueError naming the box's index and values (and the image size).
    A box partly outside the image is clipped to it: the clipped box is the prompt (and the record's ``bbox``)."""
    rows = boxes.tolist() if isinstance(boxes, (torch.Tensor, np.ndarray)) else boxes
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"boxes must be a list of [x0, y0, x1, y1] boxes, got {boxes!r}")
    if len(rows) == 4 and all(_is_number(v) for v in rows):
        rows = [rows]  # one box
    if not rows:
        raise ValueError("boxes is empty: give at least one [x0, y0, x1, y1] box")
    size = "" if image_size is None else f" (image {int(image_size[1])} x {int(image_size[0])}, width x height)"
    checked = []
    for index, box in enumerate(rows):
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise ValueError(f"box {index} must be 4 numbers [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        shown = f"[{x0:g}, {y0:g}, {x1:g}, {y1:g}]"
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise ValueError(f"box {index} {shown} has a non-finite coordinate{size}")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {index} {shown} is empty or inverted: need x0 < x1 and y0 < y1 (xyxy pixels){size}")
        if image_size is not None:
            height, width = (float(v) for v in image_size)
            if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
                raise ValueError(f"box {index} {shown} lies entirely outside the image{size}")
            x0, x1 = max(x0, 0.0), min(x1, width)
            y0, y1 = max(y0, 0.0), min(y1, height)
        checked.append([x0, y0, x1, y1])
    return torch.tensor(checked, dtype=torch.float32)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class EncodedImage:
    """An image as ``Predictor.encode`` prepared it: the picture (``array``, ``path``), the model's padded input
    (``images``, ``padding``), its resized and original sizes, and the encoder's output (``memory``)."""

    array: np.ndarray
    path: str | None
    images: torch.Tensor
    padding: torch.Tensor
    size: tuple[int, int]
    orig: tuple[int, int]
    memory: EncoderMemory


class Predictor:
    """A model ready for inference on single images.

    Args:
        model: an ``OpenSeeD`` or the path of a model file / training checkpoint.
        device: where to run (default: CUDA if available).
        image_size: longer side the image is resized to (and the square it is padded to), as in evaluation; not
            used when ``short_edge`` is given.
        inference: post-processing thresholds (default: ``InferenceConfig.for_model``, the model's recorded top-k
            and box clipping).
        short_edge, max_size: preprocess as the reference's evaluation instead (``short_edge=800, max_size=1333`` for
            the released checkpoints): shorter side to ``short_edge`` unless the longer would pass ``max_size``
            (``EvalResize``'s size rule, ``int(x * scale + 0.5)``), zero padding at the bottom and right to a
            multiple of ``SIZE_DIVISIBILITY`` (32). ``max_size`` needs ``short_edge``.

    Without ``image_size`` and ``short_edge`` the model's recorded evaluation resize is used
    (``OpenSeeDConfig.eval_short_edge`` / ``eval_max_size``: 800 / 1333 for converted released checkpoints), else a
    1024 square. Either way the image is resampled as in evaluation (``EvalResize.resize_image``: PIL bilinear).
    """

    SIZE_DIVISIBILITY = 32

    def __init__(self, model: OpenSeeD | str | Path, device: str | None = None, image_size: int | None = None,
                 inference: InferenceConfig | None = None, short_edge: int | None = None,
                 max_size: int | None = None):
        if max_size is not None and short_edge is None:
            raise ValueError("max_size caps short_edge: give short_edge too (image_size sets the longer side alone)")
        if not isinstance(model, OpenSeeD):
            from openseed.modeling.openseed import load_model

            model = load_model(model)
        config = model.config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.inference = inference or InferenceConfig.for_model(config)
        if short_edge is not None:
            self.resize, self.pad_to = EvalResize(short_edge, max_size), None
        else:
            self.resize, self.pad_to = eval_resize_for(config, image_size)

    def _prepare(self, array: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int]]:
        orig = array.shape[:2]
        size = self.resize.output_size(*orig)
        image = self.resize.resize_image(torch.from_numpy(array.copy()).permute(2, 0, 1), size)
        if self.pad_to is not None:
            height, width = self.pad_to
        else:
            step = self.SIZE_DIVISIBILITY
            height, width = -(-size[0] // step) * step, -(-size[1] // step) * step
        padded = torch.zeros((1, 3, height, width), dtype=torch.uint8)
        padded[0, :, : size[0], : size[1]] = image
        padding = torch.ones((1, height, width), dtype=torch.bool)
        padding[0, : size[0], : size[1]] = False
        return padded.to(self.device), padding.to(self.device), size, orig

    @torch.no_grad()
    def __call__(self, image, vocabulary: Sequence[str] | Vocabulary, task: str = "panoptic",
                 stuff: Sequence[str] = ()) -> PanopticResult | InstanceResult | SemanticResult:
        """Panoptic, instance or semantic segmentation of one image against ``vocabulary`` (instances: thing
        classes only, stuff pairs dropped after the top-k, as the reference)."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {task!r}")
        array, path = load_image(image)
        vocab = make_vocabulary(vocabulary, stuff)
        images, padding, size, orig = self._prepare(array)
        outputs = self.model.forward_images(images, padding, vocab, masks="final")
        (prediction,) = postprocess_batch(outputs, [(size, orig)], vocab, tuple(images.shape[-2:]), task,
                                          self.inference, things_only=task == "instance")
        return RESULTS[task](**vars(prediction), image=path, array=array, vocabulary=vocab)

    @torch.no_grad()
    def encode(self, image) -> EncodedImage:
        """The image read, resized, padded and through the backbone and pixel decoder once, for any number of
        ``segment_boxes`` calls on it (an annotation tool: each box then costs the decoder only)."""
        array, path = load_image(image)
        images, padding, size, orig = self._prepare(array)
        memory = self.model.encode_images(images, padding)
        return EncodedImage(array=array, path=path, images=images, padding=padding, size=size, orig=orig,
                            memory=memory)

    @torch.no_grad()
    def segment_boxes(self, image, boxes: Sequence[Sequence[float]], names: Sequence[str]) -> BoxPromptResult:
        """One mask per box (xyxy pixels of the original image) for the given class names (one per box; a name may
        repeat). Boxes are checked by ``box_prompts``: a non-finite, empty, inverted or entirely outside box is a
        ValueError naming it; a box partly outside is clipped to the image, and ``boxes`` in the result are the
        clipped ones. ``image`` may be an ``encode`` result: the image is then not encoded again."""
        encoded = image if isinstance(image, EncodedImage) else None
        array, path = (encoded.array, encoded.path) if encoded is not None else load_image(image)
        boxes = box_prompts(boxes, array.shape[:2])
        names = class_names(names, "names")
        if len(boxes) != len(names):
            raise ValueError(f"give one class name per box: {len(boxes)} boxes, {len(names)} names")
        if encoded is None:
            images, padding, size, orig = self._prepare(array)
            memory = None
        else:
            images, padding, size, orig, memory = (encoded.images, encoded.padding, encoded.size, encoded.orig,
                                                   encoded.memory)
        scale = torch.tensor([size[1] / orig[1], size[0] / orig[0]] * 2)
        (masks,) = self.model.segment_boxes(images, padding, [(boxes * scale).to(self.device)], [list(names)],
                                            memory=memory)
        masks = F.resize(masks[None].float(), list(orig), interpolation=F.InterpolationMode.NEAREST)[0].bool().cpu()
        return BoxPromptResult(masks=masks, boxes=boxes, names=list(names), image=path, array=array)


# ------------------------------------------------------------------------------------------------------------ results
@dataclass(kw_only=True)
class _ImageResult:
    """What every ``Predictor`` result adds to its prediction: the image, and ``save``.

    Attributes:
        image: the path the image was read from (None for an array or a PIL image).
        array: uint8 [H, W, 3] RGB, the image as read (EXIF orientation applied).
    """

    image: str | None
    array: np.ndarray

    def save(self, out_dir: str | Path, stem: str | None = None, score_threshold: float = 0.5) -> list[Path]:
        """Write ``<stem>_<task>.png`` (the overlay), ``<stem>_<task>.json`` (COCO style) and the task's label PNG
        if it has one, into ``out_dir``; ``stem`` defaults to the image file's. Returns the paths written."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = stem or (Path(self.image).stem if self.image else "image")
        height, width = self.array.shape[:2]
        header = {"image": self.image, "height": height, "width": width}
        picture, payload, written = self._render(out_dir, stem, score_threshold)
        task = self.task  # type: ignore[attr-defined]  (each result's prediction type names its task)
        picture.save(out_dir / f"{stem}_{task}.png")
        (out_dir / f"{stem}_{task}.json").write_text(json.dumps({**header, **payload}, indent=1))
        return [out_dir / f"{stem}_{task}.png", out_dir / f"{stem}_{task}.json", *written]

    def _render(self, out_dir: Path, stem: str, score_threshold: float) -> tuple[Image.Image, dict, list[Path]]:
        """The overlay, the JSON payload (beside the header) and the other files written (label PNGs)."""
        raise NotImplementedError


@dataclass(kw_only=True)
class PanopticResult(_ImageResult, PanopticSegmentation):
    """``Predictor(..., task="panoptic")``: a ``PanopticSegmentation`` of the image against ``vocabulary``. ``save``
    also writes the id map as ``<stem>_panoptic_ids.png`` (COCO panoptic colours) and names each segment's class."""

    vocabulary: Vocabulary

    def _render(self, out_dir: Path, stem: str, score_threshold: float) -> tuple[Image.Image, dict, list[Path]]:
        names = dict(zip(self.vocabulary.ids, self.vocabulary.prompt_names()))
        ids = self.panoptic_seg.cpu().numpy().astype(np.uint32)
        Image.fromarray(id_to_rgb(ids)).save(out_dir / f"{stem}_panoptic_ids.png")
        segments = [{**s, "category_name": names[s["category_id"]]} for s in self.segments_info]
        masks = np.stack([ids == s["id"] for s in segments]) if segments else None
        picture = draw_overlay(self.array, masks, None, [s["category_name"] for s in segments])
        payload = {"file_name": f"{stem}_panoptic_ids.png", "segments_info": segments}
        return picture, payload, [out_dir / f"{stem}_panoptic_ids.png"]


@dataclass(kw_only=True)
class InstanceResult(_ImageResult, Instances):
    """``Predictor(..., task="instance")``: the image's ``Instances`` (thing classes of ``vocabulary``). ``save``
    writes every detection as a COCO result record (with its class name) and draws those scoring at least
    ``score_threshold``."""

    vocabulary: Vocabulary

    def _render(self, out_dir: Path, stem: str, score_threshold: float) -> tuple[Image.Image, dict, list[Path]]:
        prompt_names = self.vocabulary.prompt_names()
        names = dict(zip(self.vocabulary.ids, prompt_names))
        records = [{**r, "category_name": names[r["category_id"]]}
                   for r in instances_to_coco(self, image_id=0, category_ids=self.vocabulary.ids)]
        shown = self.cpu()[self.scores.cpu() >= score_threshold]
        labels = [f"{prompt_names[int(label)]} {float(score):.2f}" for label, score in zip(shown.labels, shown.scores)]
        picture = draw_overlay(self.array, None if shown.masks is None else shown.masks.numpy(), shown.boxes.numpy(),
                               labels)
        return picture, {"annotations": records}, []


@dataclass(kw_only=True)
class SemanticResult(_ImageResult, SemanticSegmentation):
    """``Predictor(..., task="semantic")``: a ``SemanticSegmentation`` against ``vocabulary``. ``save`` also writes the
    labels as ``<stem>_semantic_labels.png`` (8-bit, 16-bit past 255 classes) and each class's pixel count."""

    vocabulary: Vocabulary

    def _render(self, out_dir: Path, stem: str, score_threshold: float) -> tuple[Image.Image, dict, list[Path]]:
        vocab, names = self.vocabulary, self.vocabulary.prompt_names()
        labels = self.sem_seg.cpu().numpy()
        Image.fromarray(labels.astype(np.uint16 if len(vocab) > 255 else np.uint8)).save(
            out_dir / f"{stem}_semantic_labels.png")
        counts = np.bincount(labels.ravel(), minlength=len(vocab))
        payload = {"file_name": f"{stem}_semantic_labels.png",
                   "classes": [{"label": i, "category_id": c.id, "name": n, "pixels": int(counts[i])}
                               for i, (c, n) in enumerate(zip(vocab.categories, names))]}
        present = [i for i in range(len(vocab)) if counts[i]]
        picture = draw_overlay(self.array, np.stack([labels == i for i in present]) if present else None, None,
                               [names[i] for i in present])
        return picture, payload, [out_dir / f"{stem}_semantic_labels.png"]


@dataclass(kw_only=True)
class BoxPromptResult(_ImageResult, BoxPromptMasks):
    """``Predictor.segment_boxes``: ``BoxPromptMasks``, one mask per given box and name. ``save`` writes one COCO-style
    record per box (its class name, the prompt box, the mask's area and RLE)."""

    def _render(self, out_dir: Path, stem: str, score_threshold: float) -> tuple[Image.Image, dict, list[Path]]:
        picture = draw_overlay(self.array, self.masks.numpy(), self.boxes.numpy(), self.names)
        return picture, {"annotations": box_prompt_to_coco(self, image_id=0)}, []


RESULTS = {cls.task: cls for cls in (PanopticResult, InstanceResult, SemanticResult)}


def _names(allow_empty: bool):
    return lambda value, key: string_list(value, key, allow_empty=allow_empty)


CLI_OPTIONS = {
    "ckpt": Option("a model file (.safetensors / .pt) or a training checkpoint", required=True, check=path),
    "images": Option("image files, [a.jpg,b.png]", required=True, check=_names(False)),
    "vocabulary": Option("class names, [dog,grass]; with boxes, one name per box", required=True,
                         check=_names(False)),
    "task": Option(f"one of {list(TASKS)} (ignored with boxes)", "panoptic", one_of(list(TASKS))),
    "stuff": Option("the vocabulary's names that are stuff (panoptic, semantic)", [], _names(True)),
    "boxes": Option("box prompts in pixels, [[x0,y0,x1,y1],...]: box-prompted segmentation", None),
    "out": Option("output folder", "predictions", path),
    "device": Option("torch device (null: cuda when available, else cpu)", None, path),
    "image_size": Option("resize: the longer side, square padding (null: as the model records)", None, integer(1)),
    "short_edge": Option("resize: the shorter side (with max_size)", None, integer(1)),
    "max_size": Option("resize: at most this longer side (with short_edge)", None, integer(1)),
    "score_threshold": Option("draw instances scoring at least this (the JSON keeps every one)", 0.5, number),
}


@command(CLI_OPTIONS, "python -m openseed.predict", __doc__)
def main(args) -> int:
    try:  # every argument is checked before the model is loaded
        boxes = None
        if args.boxes is not None:
            try:
                boxes = box_prompts(args.boxes)
            except ValueError as err:
                raise UsageError(f"boxes: {err}; write boxes=[[x0,y0,x1,y1],...] in pixels") from None
            if len(boxes) != len(args.vocabulary):
                raise UsageError(f"give one class name per box: {len(boxes)} boxes, {len(args.vocabulary)} names in "
                                 f"vocabulary")
        else:
            make_vocabulary(args.vocabulary, args.stuff)  # duplicates, unknown stuff names
    except (UsageError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.ckpt, device=args.device, image_size=args.image_size, short_edge=args.short_edge,
                              max_size=args.max_size)
        for image in args.images:
            if boxes is not None:
                result = predictor.segment_boxes(image, boxes, args.vocabulary)
            else:
                result = predictor(image, args.vocabulary, task=args.task, stuff=args.stuff)
            for written in result.save(args.out, score_threshold=args.score_threshold):
                print(written)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
