"""The annotation app's HTTP side: a JSON API over an ``AnnotationSession`` and the static page, on Python's own
``http.server`` (threads, no framework: nothing to install beyond openseed, nothing fetched from a CDN; one
annotator's local tool needs a handful of JSON routes, and the model's work is the cost, not the serving).

Routes (every body and answer JSON unless said; errors are ``{"error": message}`` with 400 for a bad request, 404
for a name that is not an image of the folder or an unknown object, 409 for nothing to undo / redo, 422 for an
unreadable picture):

    GET  /                               the page (static/index.html; /static/* its script and style)
    GET  /api/state                      images (name, height, width, objects, proposed), unreadable files, vocabulary
    GET  /api/image?name=N               the picture's bytes as stored (only names of the listing)
    GET  /api/objects?name=N             the image's objects, masks as run lengths (column-major, COCO's order)
    POST /api/encode {name, next?}       encode the image now (and ``next`` in the background); its seconds
    POST /api/segment {name, boxes, names, status?}   masks for boxes (xyxy pixels) -> new objects
    POST /api/update {id, category?, box?, status?, decode?}   edit an object; ``decode``: decode its mask again
    POST /api/remove {id}
    POST /api/undo {name} | /api/redo {name}
    POST /api/propose {name}             masks for the detection file's boxes of the image, as proposals
    POST /api/propose_all                the same for every image with boxes and no proposals yet, in the background
    GET  /api/job                        that run's progress (done, total, running, cancelled, error)
    POST /api/cancel                     stop it after the image under way
    POST /api/export {format?}           write the COCO file (``rle`` or ``polygons``); its path and counts
"""

from __future__ import annotations

import json
import logging
import mimetypes
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np

from openseed.annotate.coco import SEGMENTATION_FORMATS, export_coco
from openseed.annotate.session import AnnotationSession, UnreadableImage
from openseed.annotate.store import AnnotatedObject
from openseed.core.codecs import decode_rle
from openseed.fileio import atomic_write

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 16 * 2**20


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def mask_runs(rle: dict | None) -> list[int] | None:
    """A compressed RLE as run lengths over the column-major pixels, starting with a background run (the page
    paints them)."""
    if rle is None:
        return None
    pixels = decode_rle(rle).numpy().flatten(order="F")
    changes = np.flatnonzero(np.diff(pixels)) + 1
    bounds = np.concatenate([[0], changes, [pixels.size]])
    runs = np.diff(bounds).tolist()
    return runs if pixels.size == 0 or pixels[0] == 0 else [0] + runs


def object_json(obj: AnnotatedObject) -> dict:
    return {"id": obj.id, "image": obj.image, "category": obj.category, "box": list(obj.box),
            "status": obj.status, "source": obj.source, "runs": mask_runs(obj.rle),
            "size": None if obj.rle is None else [int(v) for v in obj.rle["size"]]}


class AnnotationApp:
    """What the routes do, without HTTP (the handler below only parses and answers)."""

    def __init__(self, session: AnnotationSession, out: Path, vocabulary: list[str],
                 proposals: dict[str, list[tuple[list[float], str]]] | None = None):
        self.session, self.out, self.vocabulary = session, Path(out), list(vocabulary)
        self.proposals = proposals or {}
        self._job = {"done": 0, "total": 0, "running": False, "cancelled": False, "error": None, "current": None}
        self._job_lock = threading.Lock()
        self._cancel = threading.Event()

    def state(self) -> dict:
        counts, proposed = {}, {}
        for obj in self.session.store.objects():
            bucket = proposed if obj.status == "proposed" else counts
            bucket[obj.image] = bucket.get(obj.image, 0) + 1
        return {"images": [{"name": i.name, "height": i.height, "width": i.width, "objects": counts.get(i.name, 0),
                            "proposed": proposed.get(i.name, 0), "boxes": len(self.proposals.get(i.name, ()))}
                           for i in self.session.folder.images],
                "unreadable": [{"name": n, "reason": r} for n, r in self.session.folder.unreadable],
                "vocabulary": self.vocabulary, "out": str(self.out)}

    def objects(self, name: str) -> dict:
        self._image(name)
        return {"objects": [object_json(o) for o in self.session.store.objects(name)],
                "can_undo": self.session.store.can_undo(name), "can_redo": self.session.store.can_redo(name)}

    def encode(self, name: str, following: str | None = None) -> dict:
        self._image(name)
        start = time.perf_counter()
        self.session.encoded(name)
        seconds = time.perf_counter() - start
        if following:
            self._image(following)
            self.session.prefetch(following)
        return {"name": name, "seconds": seconds}

    def segment(self, name: str, boxes, names, status: str = "accepted") -> dict:
        self._image(name)
        if not isinstance(boxes, list) or not isinstance(names, list) or len(boxes) != len(names) or not boxes:
            raise ApiError(400, "give 'boxes' (a non-empty list of [x0, y0, x1, y1]) and one name per box in 'names'")
        created = self.session.segment(name, boxes, names, status=status)
        return {"objects": [object_json(o) for o in created]}

    def update(self, object_id: int, category=None, box=None, status=None, decode: bool = False) -> dict:
        obj = self._object(object_id)
        if decode:
            obj = self.session.resegment(obj.id, box=box, category=category)
            if status is not None:
                obj = self.session.store.update(obj.id, status=status)
        else:
            obj = self.session.store.update(obj.id, category=category, box=box, status=status)
        return {"object": object_json(obj)}

    def remove(self, object_id: int) -> dict:
        return {"object": object_json(self.session.store.remove(self._object(object_id).id))}

    def undo(self, name: str, redo: bool = False) -> dict:
        self._image(name)
        try:
            (self.session.store.redo if redo else self.session.store.undo)(name)
        except LookupError as err:
            raise ApiError(409, str(err)) from None
        return self.objects(name)

    def propose(self, name: str) -> dict:
        """Proposals for the detection file's boxes of the image, once: an image that has proposals already keeps
        them (reviewing removes or accepts them one by one)."""
        self._image(name)
        boxes = self.proposals.get(name, [])
        if not boxes or self._has_proposals(name):
            return {"objects": []}
        return self.segment(name, [b for b, _ in boxes], [c for _, c in boxes], status="proposed")

    def _has_proposals(self, name: str) -> bool:
        return any(o.status == "proposed" for o in self.session.store.objects(name))

    def propose_all(self) -> dict:
        """Start proposing for every image with boxes and no proposals yet, in a background thread."""
        with self._job_lock:
            if self._job["running"]:
                raise ApiError(409, "a proposal run is under way")
            names = [i.name for i in self.session.folder.images
                     if self.proposals.get(i.name) and not self._has_proposals(i.name)]
            self._cancel.clear()
            self._job = {"done": 0, "total": len(names), "running": bool(names), "cancelled": False, "error": None,
                         "current": None}
        if names:
            threading.Thread(target=self._run_proposals, args=(names,), daemon=True,
                             name="openseed-proposals").start()
        return self.job()

    def _run_proposals(self, names: list[str]) -> None:
        try:
            for name in names:
                if self._cancel.is_set():
                    with self._job_lock:
                        self._job["cancelled"] = True
                    break
                with self._job_lock:
                    self._job["current"] = name
                try:
                    self.propose(name)
                except UnreadableImage as err:  # counted, said, and the run goes on
                    log.warning("proposals: %s", err)
                    with self._job_lock:
                        self._job["error"] = str(err)
                with self._job_lock:
                    self._job["done"] += 1
        except Exception as err:  # a bug: said in the job, the server keeps serving
            log.exception("proposal run failed")
            with self._job_lock:
                self._job["error"] = f"{type(err).__name__}: {err}"
        finally:
            with self._job_lock:
                self._job["running"], self._job["current"] = False, None

    def job(self) -> dict:
        with self._job_lock:
            return {"job": dict(self._job)}

    def cancel(self) -> dict:
        self._cancel.set()
        return self.job()

    def export(self, fmt: str = "rle") -> dict:
        if fmt not in SEGMENTATION_FORMATS:
            raise ApiError(400, f"format must be one of {SEGMENTATION_FORMATS}")
        images = [(i.name, i.height, i.width) for i in self.session.folder.images]
        coco = export_coco(self.session.store, images, self.vocabulary, segmentation=fmt)
        atomic_write(json.dumps(coco).encode(), self.out)
        return {"path": str(self.out), "images": len(coco["images"]), "annotations": len(coco["annotations"]),
                "categories": len(coco["categories"])}

    def _image(self, name) -> None:
        if not isinstance(name, str) or name not in self.session.folder:
            raise ApiError(404, f"not an image of the folder: {name!r}")

    def _object(self, object_id) -> AnnotatedObject:
        try:
            return self.session.store.get(int(object_id))
        except (KeyError, TypeError, ValueError):
            raise ApiError(404, f"no object with id {object_id!r}") from None


def make_handler(app: AnnotationApp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "openseed-annotate"

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            log.debug("%s - %s", self.address_string(), format % args)

        def do_GET(self):  # noqa: N802 - http.server's name
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            self._answer(lambda: self._get(url.path, query))

        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                return self._send_json(413, {"error": f"request body over {MAX_BODY} bytes"})
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError as err:
                return self._send_json(400, {"error": f"the body must be a JSON object ({err})"})
            self._answer(lambda: self._post(urlparse(self.path).path, body))

        def _get(self, path: str, query: dict):
            if path in ("/", "/index.html"):
                return self._static("index.html")
            if path.startswith("/static/"):
                return self._static(path[len("/static/"):])
            if path == "/api/state":
                return app.state()
            if path == "/api/job":
                return app.job()
            if path == "/api/objects":
                return app.objects(query.get("name"))
            if path == "/api/image":
                name = query.get("name")
                app._image(name)
                file = app.session.folder.path(name)
                return (file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream")
            raise ApiError(404, f"no such route: GET {path}")

        def _post(self, path: str, body: dict):
            routes = {
                "/api/encode": lambda: app.encode(body.get("name"), body.get("next")),
                "/api/segment": lambda: app.segment(body.get("name"), body.get("boxes"), body.get("names"),
                                                    body.get("status", "accepted")),
                "/api/update": lambda: app.update(body.get("id"), body.get("category"), body.get("box"),
                                                  body.get("status"), bool(body.get("decode", False))),
                "/api/remove": lambda: app.remove(body.get("id")),
                "/api/undo": lambda: app.undo(body.get("name")),
                "/api/redo": lambda: app.undo(body.get("name"), redo=True),
                "/api/propose": lambda: app.propose(body.get("name")),
                "/api/propose_all": app.propose_all,
                "/api/cancel": app.cancel,
                "/api/export": lambda: app.export(body.get("format", "rle")),
            }
            if path not in routes:
                raise ApiError(404, f"no such route: POST {path}")
            return routes[path]()

        def _static(self, name: str):
            file = (STATIC / name).resolve()
            if not file.is_relative_to(STATIC) or not file.is_file():
                raise ApiError(404, f"no such file: {name}")
            return (file.read_bytes(), mimetypes.guess_type(file.name)[0] or "application/octet-stream")

        def _answer(self, work) -> None:
            try:
                result = work()
            except ApiError as err:
                return self._send_json(err.status, {"error": str(err)})
            except UnreadableImage as err:
                return self._send_json(422, {"error": str(err)})
            except KeyError as err:
                return self._send_json(404, {"error": str(err.args[0]) if err.args else "not found"})
            except ValueError as err:
                return self._send_json(400, {"error": str(err)})
            except Exception as err:  # a bug: said, logged, and the server keeps serving
                log.exception("request failed: %s", self.path)
                return self._send_json(500, {"error": f"{type(err).__name__}: {err}"})
            if isinstance(result, tuple):
                data, content_type = result
                self._send(200, data, content_type)
            else:
                self._send_json(200, result)

        def _send_json(self, status: int, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _send(self, status: int, data: bytes, content_type: str) -> None:
            self.send_response(HTTPStatus(status))
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

    return Handler


def serve(app: AnnotationApp, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server bound to ``host:port`` (port 0: any free one; ``server.server_address`` says which); call
    ``serve_forever`` on it, or run it in a thread."""
    server = ThreadingHTTPServer((host, port), make_handler(app))
    server.daemon_threads = True
    return server
