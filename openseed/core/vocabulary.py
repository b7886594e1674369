"""The one vocabulary type: class names, thing/stuff flags, synonyms and the names the text encoder sees.

A data set's vocabulary is stored beside its shards as ``vocab.json`` (see docs/data.md). Labels in shards and in
``Targets`` are *contiguous indices* into the vocabulary (0..K-1); the data set's own category ids are kept too, so
that predictions can be written back in the data set's id space for the official evaluators.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The 133 COCO panoptic category names (80 things, then 53 stuff), as COCO writes them. ``clean_class_name``
#: rewrites these names only (other data sets' hyphenated names, "x-ray", "t-shirt", keep their word order).
COCO_PANOPTIC_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
    "banner", "blanket", "bridge", "cardboard", "counter", "curtain", "door-stuff", "floor-wood", "flower", "fruit",
    "gravel", "house", "light", "mirror-stuff", "net", "pillow", "platform", "playingfield", "railroad", "river",
    "road", "roof", "sand", "sea", "shelf", "snow", "stairs", "tent", "towel", "wall-brick", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "window-blind", "window-other", "tree-merged", "fence-merged",
    "ceiling-merged", "sky-other-merged", "cabinet-merged", "table-merged", "floor-other-merged", "pavement-merged",
    "mountain-merged", "grass-merged", "dirt-merged", "paper-merged", "food-other-merged", "building-other-merged",
    "rock-merged", "wall-other-merged", "rug-merged",
)
_COCO_NAMES = frozenset(COCO_PANOPTIC_NAMES)
# COCO panoptic suffixes that say how the class was built, not what it is.
_DROPPED_SUFFIXES = ("-merged", "-other", "-stuff")
#: How ``Vocabulary.prompt_names`` turns categories into words: openseed's cleaned synonyms, or the reference
#: OpenSeeD code's rule on the raw names (``reference_class_name``).
NAME_STYLES = ("openseed", "reference")
# Hyphenated COCO names whose parts already read in English order (COCO's other "head-modifier" names are swapped).
_KEEP_ORDER = {"window-blind": "window blind"}


#: LVIS's category frequency groups (rare, common, frequent), as its ``frequency`` field writes them.
FREQUENCIES = ("r", "c", "f")


def clean_class_name(name: str) -> str:
    """Turn a data set's raw class name into plain words for the text encoder.

    The same function serves training and evaluation, so a class is always embedded from the same words:
    ``"aerosol_can" -> "aerosol can"``, ``"Traffic Sign" -> "traffic sign"``, ``"x-ray" -> "x ray"``. COCO panoptic
    names (``COCO_PANOPTIC_NAMES``, exactly as COCO writes them) also lose their ``-merged`` / ``-other`` / ``-stuff``
    suffixes and read in English order: ``"wall-brick" -> "brick wall"``, ``"sky-other-merged" -> "sky"``,
    ``"door-stuff" -> "door"``. That rewriting is COCO's only: elsewhere ``"t-shirt"`` stays "t shirt" and
    ``"sky-other"`` "sky other".
    """
    text = name.strip()
    if text in _COCO_NAMES:
        text = _coco_words(text)
    text = text.replace("_", " ").replace("-", " ")
    return re.sub(r"\s+", " ", text).strip().lower()


def _coco_words(text: str) -> str:
    """A COCO panoptic name in English order: suffixes dropped, "head-modifier" swapped."""
    changed = True
    while changed:  # suffixes can stack ("floor-other-merged")
        changed = False
        for suffix in _DROPPED_SUFFIXES:
            if text.endswith(suffix) and len(text) > len(suffix):
                text = text[: -len(suffix)]
                changed = True
    if text in _KEEP_ORDER:
        text = _KEEP_ORDER[text]
    elif re.fullmatch(r"[A-Za-z]+-[A-Za-z]+", text):
        head, modifier = text.split("-")
        text = f"{modifier} {head}"  # COCO writes "wall-brick" for a brick wall
    return text


def reference_class_name(name: str, training: bool = False) -> str:
    """A raw class name as the reference OpenSeeD code embeds it: only ``-other``, ``-merged`` and ``-stuff`` are
    removed (``"sky-other-merged" -> "sky"``, ``"wall-brick"`` stays); in training it also drops commas and reads
    ``+`` as a space. Nothing else changes (no lower-casing: the tokenizer does that)."""
    text = name.replace("-other", "").replace("-merged", "").replace("-stuff", "")
    return text.replace(",", "").replace("+", " ") if training else text


def reference_synonyms(name: str) -> tuple[str, ...]:
    """The reference-style names of one raw class name: its ``/``-separated parts, each through
    ``reference_class_name`` (evaluation form); the first is the canonical one."""
    parts = tuple(p for p in (reference_class_name(part) for part in name.split("/")) if p)
    return parts or (reference_class_name(name),)


@dataclass(frozen=True)
class Category:
    """One vocabulary entry.

    Attributes:
        id: the data set's own category id (any int, 0 allowed).
        name: the raw name as the data set writes it.
        is_thing: countable object (instances) rather than amorphous stuff.
        synonyms: cleaned alternative names; the first is the canonical one. A raw name "a/b" gives ("a", "b").
    """

    id: int
    name: str
    is_thing: bool
    synonyms: tuple[str, ...]


class Vocabulary:
    """An ordered list of categories; position in the list = contiguous label used everywhere in openseed."""

    def __init__(self, categories: Sequence[Category]):
        if not categories:
            raise ValueError("a vocabulary needs at least one category")
        self.categories: tuple[Category, ...] = tuple(categories)
        self._index_of_id: dict[int, int] = {}
        for index, category in enumerate(self.categories):
            if category.id in self._index_of_id:
                raise ValueError(f"duplicate category id {category.id} ({category.name!r})")
            if not category.synonyms or not all(category.synonyms):
                raise ValueError(f"category {category.id} ({category.name!r}) has an empty name")
            self._index_of_id[category.id] = index

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_names(cls, names: Iterable[str], is_thing: bool | Sequence[bool] = True) -> Vocabulary:
        """A vocabulary from plain names (ids 0..K-1), e.g. a user's list of words for the predictor.

        Every name must be a non-empty string and appear once: a ValueError names the bad entry or the duplicates
        (a data set's categories, which may share a name under different ids, come in through
        ``from_coco_categories``, which does not ask this)."""
        names = list(names)
        for index, name in enumerate(names):
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"class name {index} must be a non-empty string, got {name!r}")
        seen: dict[str, int] = {}
        duplicates = []
        for index, name in enumerate(names):
            key = name.strip()
            if key in seen:
                duplicates.append(f"{name!r} (entries {seen[key]} and {index})")
            else:
                seen[key] = index
        if duplicates:
            raise ValueError(f"duplicate class names: {', '.join(duplicates)}; give each class once")
        flags = [is_thing] * len(names) if isinstance(is_thing, bool) else list(is_thing)
        if len(flags) != len(names):
            raise ValueError(f"{len(names)} names but {len(flags)} thing flags")
        return cls([_make_category(i, n, f) for i, (n, f) in enumerate(zip(names, flags))])

    @classmethod
    def from_coco_categories(cls, categories: Sequence[dict], default_is_thing: bool = True) -> Vocabulary:
        """From a COCO ``categories`` list. ``isthing`` is read where present (COCO panoptic); detection JSONs
        have only things. LVIS-style ``synonyms`` lists are used when present."""
        result = []
        for raw in categories:
            if "id" not in raw or "name" not in raw:
                raise ValueError(f"category entry without id or name: {raw!r}")
            extra = raw.get("synonyms") or ()
            result.append(_make_category(int(raw["id"]), str(raw["name"]), bool(raw.get("isthing", default_is_thing)),
                                         extra))
        return cls(result)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.categories)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.categories == other.categories

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} classes: {self.num_things} things, {len(self) - self.num_things} stuff)"

    @property
    def ids(self) -> list[int]:
        return [c.id for c in self.categories]

    @property
    def names(self) -> list[str]:
        """Raw names, as the data set writes them."""
        return [c.name for c in self.categories]

    @property
    def is_thing(self) -> list[bool]:
        return [c.is_thing for c in self.categories]

    @property
    def num_things(self) -> int:
        return sum(self.is_thing)

    def index_of_id(self, category_id: int) -> int:
        """Contiguous label of a data set category id; KeyError with a clear message when unknown."""
        try:
            return self._index_of_id[int(category_id)]
        except KeyError:
            raise KeyError(f"unknown category id {category_id}; known ids: {self.ids[:20]}"
                           f"{' ...' if len(self) > 20 else ''}") from None

    def __contains__(self, category_id: int) -> bool:
        return int(category_id) in self._index_of_id

    def prompt_names(self, rng: random.Random | None = None, style: str = "openseed") -> list[str]:
        """The words the text encoder embeds, one per class: the canonical synonym, or (training, with ``rng``)
        one synonym drawn per class.

        ``style``: ``"openseed"`` reads the cleaned ``synonyms``; ``"reference"`` the raw name as the reference
        OpenSeeD code cleans it (``reference_synonyms``; with ``rng``, the drawn one in ``reference_class_name``'s
        training form).
        """
        if style == "openseed":
            if rng is None:
                return [c.synonyms[0] for c in self.categories]
            return [rng.choice(c.synonyms) for c in self.categories]
        if style != "reference":
            raise ValueError(f"unknown name style {style!r}; known: {', '.join(NAME_STYLES)}")
        synonyms = [reference_synonyms(c.name) for c in self.categories]
        if rng is None:
            return [s[0] for s in synonyms]
        return [reference_class_name(rng.choice(s), training=True) for s in synonyms]

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> list[dict]:
        return [{"id": c.id, "name": c.name, "isthing": int(c.is_thing), "synonyms": list(c.synonyms)}
                for c in self.categories]

    @classmethod
    def from_json(cls, entries: Sequence[dict]) -> Vocabulary:
        return cls([Category(int(e["id"]), str(e["name"]), bool(e["isthing"]), tuple(e["synonyms"]))
                    for e in entries])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"categories": self.to_json()}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls.from_json(data["categories"])
        except FileNotFoundError:
            raise FileNotFoundError(f"vocabulary file not found: {path}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid vocabulary file ({err})") from err


def _make_category(category_id: int, name: str, is_thing: bool, extra_synonyms: Iterable[str] = ()) -> Category:
    synonyms: list[str] = []
    for word in [*name.split("/"), *extra_synonyms]:
        cleaned = clean_class_name(word)
        if cleaned and cleaned not in synonyms:
            synonyms.append(cleaned)
    return Category(category_id, name, is_thing, tuple(synonyms))
