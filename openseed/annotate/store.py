"""The annotations of an image folder, on disk as they change: a journal of every accepted change, replayed on open.

Each change (an object added, edited or removed, an undo, a redo) is one JSON line appended to the journal and
flushed to disk (``fsync``) before the call returns, so a crash or a reload loses nothing and reopening the journal
resumes where the annotator stopped, undo history included. A line holds the object before and after the change
(``null`` for none), so replaying it needs nothing else; a torn last line (the process killed while writing it) is
dropped with a warning, any other unreadable line is an error that names the journal and the line.

Objects are per image (file names relative to the image folder): an id unique in the store (from 1), a class name
(open vocabulary: any name), a box (pixel ``[x0, y0, x1, y1]``) and, once decoded or drawn, a mask as COCO compressed
RLE. Undo and redo are per image: undoing restores the object as it was before the image's last change.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

JOURNAL_VERSION = 1
KINDS = ("do", "undo", "redo")


@dataclass(frozen=True)
class AnnotatedObject:
    """One object of one image."""

    id: int
    image: str
    category: str
    box: tuple[float, float, float, float]
    rle: dict | None = None
    source: str = "manual"  # "manual", "model" (decoded from a box), "import"
    status: str = "accepted"  # or "proposed": awaiting review (masks decoded for a detection file's boxes)

    def to_json(self) -> dict:
        out = asdict(self)
        out["box"] = list(self.box)
        return out

    @classmethod
    def from_json(cls, data: dict) -> AnnotatedObject:
        return cls(id=int(data["id"]), image=str(data["image"]), category=str(data["category"]),
                   box=tuple(float(v) for v in data["box"]), rle=data.get("rle"),
                   source=str(data.get("source", "manual")), status=_status(data.get("status", "accepted")))


@dataclass
class _History:
    undo: list[tuple[AnnotatedObject | None, AnnotatedObject | None]] = field(default_factory=list)
    redo: list[tuple[AnnotatedObject | None, AnnotatedObject | None]] = field(default_factory=list)


class JournalError(ValueError):
    """A journal that cannot be read back; the message names the file and the line."""


class AnnotationStore:
    """Objects per image, persisted to ``journal`` (JSON lines) on every change.

    Args:
        journal: the journal file; created (with its folder) when missing, replayed when present.
    """

    def __init__(self, journal: str | Path) -> None:
        self.journal = Path(journal)
        self._objects: dict[int, AnnotatedObject] = {}
        self._history: dict[str, _History] = {}
        self._next_id = 1
        if self.journal.is_file():
            self._replay()
        else:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self._append({"journal": "openseed-annotations", "version": JOURNAL_VERSION})

    # ------------------------------------------------------------------------------------------------ reading
    def objects(self, image: str | None = None) -> list[AnnotatedObject]:
        """The objects of ``image`` (all images when None), by id."""
        return sorted((o for o in self._objects.values() if image is None or o.image == image), key=lambda o: o.id)

    def get(self, object_id: int) -> AnnotatedObject:
        if object_id not in self._objects:
            raise KeyError(f"no object with id {object_id}")
        return self._objects[object_id]

    def counts(self) -> dict[str, int]:
        """Objects per image (images without objects are absent)."""
        out: dict[str, int] = {}
        for obj in self._objects.values():
            out[obj.image] = out.get(obj.image, 0) + 1
        return out

    def can_undo(self, image: str) -> bool:
        return bool(self._history.get(image, _History()).undo)

    def can_redo(self, image: str) -> bool:
        return bool(self._history.get(image, _History()).redo)

    # ------------------------------------------------------------------------------------------------ changes
    def add(self, image: str, category: str, box: Iterable[float], rle: dict | None = None,
            source: str = "manual", status: str = "accepted") -> AnnotatedObject:
        """A new object (its id is the store's next); written to the journal before returning."""
        obj = AnnotatedObject(self._next_id, image, _name(category), _box(box), rle, source, _status(status))
        self._change(None, obj, "do")
        return obj

    def add_many(self, objects: Iterable[tuple[str, str, Iterable[float], dict | None, str]],
                 status: str = "accepted") -> list[AnnotatedObject]:
        """Several new objects ``(image, category, box, rle, source)`` in one journal write (an import, a batch of
        decoded boxes), all with ``status``."""
        lines, added = [], []
        for image, category, box, rle, source in objects:
            obj = AnnotatedObject(self._next_id, image, _name(category), _box(box), rle, source, _status(status))
            self._apply(None, obj, "do")
            lines.append(_line(None, obj, "do"))
            added.append(obj)
        if lines:
            self._append(*lines)
        return added

    def update(self, object_id: int, *, category: str | None = None, box: Iterable[float] | None = None,
               rle: dict | None = None, source: str | None = None, status: str | None = None) -> AnnotatedObject:
        """The object with the given fields replaced (others kept); ``status="accepted"`` accepts a proposal."""
        before = self.get(object_id)
        after = AnnotatedObject(before.id, before.image, before.category if category is None else _name(category),
                                before.box if box is None else _box(box), before.rle if rle is None else rle,
                                before.source if source is None else source,
                                before.status if status is None else _status(status))
        self._change(before, after, "do")
        return after

    def remove(self, object_id: int) -> AnnotatedObject:
        before = self.get(object_id)
        self._change(before, None, "do")
        return before

    def undo(self, image: str) -> AnnotatedObject | None:
        """Revert the image's last change; returns the object as restored (None when the change was an addition).
        Raises LookupError when there is nothing to undo."""
        return self._step(image, undo=True)

    def redo(self, image: str) -> AnnotatedObject | None:
        """Apply again the image's last undone change; returns the object as it is now (None: removed again)."""
        return self._step(image, undo=False)

    def _step(self, image: str, undo: bool) -> AnnotatedObject | None:
        history = self._history.get(image)
        stack = None if history is None else (history.undo if undo else history.redo)
        if not stack:
            raise LookupError(f"nothing to {'undo' if undo else 'redo'} on {image}")
        before, after = stack[-1]
        if undo:
            self._change(after, before, "undo")
            return before
        self._change(before, after, "redo")
        return after

    # ------------------------------------------------------------------------------------------------ internals
    def _change(self, before: AnnotatedObject | None, after: AnnotatedObject | None, kind: str) -> None:
        line = _line(before, after, kind)
        self._append(line)  # on disk first: a failed write leaves the store as it was
        self._apply(before, after, kind)

    def _apply(self, before: AnnotatedObject | None, after: AnnotatedObject | None, kind: str) -> None:
        target = after if after is not None else before
        if target is None:
            raise ValueError("a change needs an object before or after it")
        if after is None:
            self._objects.pop(before.id, None)
        else:
            self._objects[after.id] = after
            self._next_id = max(self._next_id, after.id + 1)
        history = self._history.setdefault(target.image, _History())
        if kind == "do":
            history.undo.append((before, after))
            history.redo.clear()
        elif kind == "undo":  # the change undone: (after, before) here is the original (before, after) reversed
            history.redo.append(history.undo.pop())
        else:
            history.undo.append(history.redo.pop())

    def _append(self, *lines: dict) -> None:
        text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
        with open(self.journal, "a", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def _replay(self) -> None:
        raw = self.journal.read_bytes()
        lines = raw.split(b"\n")
        torn = lines[-1] != b""  # no newline at the end: the last write was cut short
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except ValueError as err:
                if torn and number == len(lines):
                    log.warning("%s: dropped an incomplete last line (%d bytes) of an interrupted write",
                                self.journal, len(line))
                    self._truncate(len(raw) - len(line))
                    break
                raise JournalError(f"{self.journal}, line {number}: not JSON ({err})") from None
            if number == 1:
                if data.get("journal") != "openseed-annotations":
                    raise JournalError(f"{self.journal}: not an openseed annotation journal (first line {line[:80]!r})")
                continue
            try:
                kind = data["kind"]
                if kind not in KINDS:
                    raise ValueError(f"unknown kind {kind!r}")
                before = None if data["before"] is None else AnnotatedObject.from_json(data["before"])
                after = None if data["after"] is None else AnnotatedObject.from_json(data["after"])
                self._apply(before, after, kind)
            except (KeyError, TypeError, ValueError, IndexError) as err:
                raise JournalError(f"{self.journal}, line {number}: {type(err).__name__}: {err}") from None

    def _truncate(self, size: int) -> None:
        with open(self.journal, "r+b") as handle:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())


def _line(before: AnnotatedObject | None, after: AnnotatedObject | None, kind: str) -> dict:
    return {"kind": kind, "before": None if before is None else before.to_json(),
            "after": None if after is None else after.to_json()}


STATUSES = ("accepted", "proposed")


def _status(status: str) -> str:
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    return status


def _name(category: str) -> str:
    name = str(category).strip()
    if not name:
        raise ValueError("a class name cannot be empty")
    return name


def _box(box: Iterable[float]) -> tuple[float, float, float, float]:
    values = tuple(float(v) for v in box)
    if len(values) != 4:
        raise ValueError(f"a box is [x0, y0, x1, y1], got {len(values)} values")
    x0, y0, x1, y1 = values
    if not all(v == v and abs(v) != float("inf") for v in values) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"a box needs finite x0 < x1 and y0 < y1, got {list(values)}")
    return values
