"""One annotator's session: a folder, its annotation store and a model, with each image encoded once.

An image is read and run through the backbone and pixel decoder once (``Predictor.encode``) and kept in a small
cache (the last ``cache_size`` images); ``prefetch`` encodes another image (the next one in the list) in a
background thread while the annotator works on this one, so that moving on costs nothing when the annotator is
slower than the encoder. A box then costs the decoder only. Boxes decoded in one call are decoded together (their
conditioned queries see one another, as in the reference).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from openseed.annotate.folder import ImageFolder
from openseed.annotate.store import AnnotatedObject, AnnotationStore
from openseed.core.codecs import encode_rle
from openseed.predict import EncodedImage, Predictor


class UnreadableImage(ValueError):
    """An image of the listing whose pixel data cannot be decoded (found when it is opened)."""


class AnnotationSession:
    """Args:
        predictor: the model, as a ``Predictor`` (its resize is the one the boxes are decoded at).
        folder: the images; store: where the objects go.
        cache_size: encoded images kept (each holds the encoder's output: tens of MB for Swin-T at 1024 px).
    """

    def __init__(self, predictor: Predictor, folder: ImageFolder, store: AnnotationStore, cache_size: int = 3):
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        self.predictor, self.folder, self.store, self.cache_size = predictor, folder, store, cache_size
        self._cache: OrderedDict[str, EncodedImage] = OrderedDict()
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="openseed-prefetch")
        self.encodes = 0  # images encoded so far (each at most once while it stays in the cache)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------------------------------------ encoding
    def encoded(self, name: str) -> EncodedImage:
        """The image's encoding: from the cache, from a prefetch under way (waited for), or computed now."""
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            pending = self._pending.get(name)
        if pending is not None:
            return pending.result()
        return self._encode(name)

    def prefetch(self, name: str) -> Future | None:
        """Encode ``name`` in the background unless it is cached or under way; returns the future (None if cached)."""
        self.folder.get(name)
        with self._lock:
            if name in self._cache:
                return None
            if name not in self._pending:
                self._pending[name] = self._worker.submit(self._encode, name)
            return self._pending[name]

    def _encode(self, name: str) -> EncodedImage:
        path = self.folder.path(name)
        try:
            encoded = self.predictor.encode(path)
        except ValueError as err:  # the header read, the pixels do not
            raise UnreadableImage(f"{name}: {err}") from None
        finally:
            with self._lock:
                self._pending.pop(name, None)
        with self._lock:
            self.encodes += 1
            self._cache[name] = encoded
            self._cache.move_to_end(name)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return encoded

    # ------------------------------------------------------------------------------------------------ boxes
    def segment(self, name: str, boxes: Sequence[Sequence[float]], names: Sequence[str],
                status: str = "accepted") -> list[AnnotatedObject]:
        """Decode a mask for each box (xyxy pixels of the upright image; clipped to it, a box wholly outside is a
        ValueError naming it) with its class name, and add the objects to the store in one journal write."""
        result = self.predictor.segment_boxes(self.encoded(name), boxes, names)
        rles = encode_rle(result.masks)
        return self.store.add_many([(name, label, box.tolist(), rle, "model")
                                    for label, box, rle in zip(result.names, result.boxes, rles, strict=True)],
                                   status=status)

    def resegment(self, object_id: int, box: Sequence[float] | None = None,
                  category: str | None = None) -> AnnotatedObject:
        """An object's mask decoded again from its (new) box and (new) class: a redrawn box or a changed class."""
        obj = self.store.get(object_id)
        box = obj.box if box is None else box
        category = obj.category if category is None else category
        result = self.predictor.segment_boxes(self.encoded(obj.image), [box], [category])
        return self.store.update(object_id, category=category, box=result.boxes[0].tolist(),
                                 rle=encode_rle(result.masks)[0], source="model")
