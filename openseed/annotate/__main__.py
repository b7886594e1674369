"""Box-to-mask annotation of a folder of pictures in the browser: draw a box, get the mask, correct it, export COCO.

    python -m openseed.annotate images=DIR ckpt=MODEL [vocabulary=[dog,cat]] [boxes=COCO.json]
        [out=ANNOTATIONS.json] [host=127.0.0.1] [port=8765] [image_size=1024] [device=cpu]

Every accepted change is written at once to ``<out>.journal`` beside the export (reopening resumes, undo history
included); ``out`` itself is written on export (RLE or polygons). ``boxes``: a COCO detection file whose boxes get
masks decoded for review. ``import``: a COCO instances file whose objects are loaded into an empty journal.
The server binds 127.0.0.1 unless told otherwise and prints its URL; Ctrl-C stops it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from openseed.cli import Option, command, integer, path, string_list


def _names(value, key: str) -> list[str]:
    return string_list(value, key, allow_empty=True)


OPTIONS = {
    "images": Option("the folder of pictures to annotate", required=True, check=path),
    "ckpt": Option("a model file (.safetensors / .pt) or a training checkpoint", required=True, check=path),
    "vocabulary": Option("class names offered by the page's autocomplete, [dog,cat] (new names are allowed)", [],
                         _names),
    "boxes": Option("a COCO detection file: its boxes get masks decoded for review", None, path),
    "import": Option("a COCO instances file to start from (into an empty journal)", None, path),
    "out": Option("the COCO instances file export writes (its journal: OUT.journal)", "annotations.json", path),
    "host": Option("address to bind (127.0.0.1: this machine only)", "127.0.0.1", path),
    "port": Option("port (0: any free one)", 8765, integer(0)),
    "image_size": Option("resize: the longer side (null: as the model records)", None, integer(1)),
    "device": Option("torch device (null: cuda when available, else cpu)", None, path),
}


def build_app(args):
    """The app the options describe (the model loaded, the folder scanned, the journal opened)."""
    from openseed.annotate.coco import detection_boxes, import_coco
    from openseed.annotate.folder import ImageFolder
    from openseed.annotate.server import AnnotationApp
    from openseed.annotate.session import AnnotationSession
    from openseed.annotate.store import AnnotationStore
    from openseed.predict import Predictor

    folder = ImageFolder(args.images)
    out = Path(args.out)
    store = AnnotationStore(out.with_name(out.name + ".journal"))
    sizes = folder.sizes()
    if getattr(args, "import") is not None:
        if store.objects():
            raise ValueError(f"import={getattr(args, 'import')}: the journal {store.journal} already holds objects; "
                             "import into a new one (another out=)")
        counts = import_coco(store, getattr(args, "import"), sizes)
        print(f"imported {counts['imported']} objects ({counts['skipped_images']} images not in the folder)")
    proposals = detection_boxes(args.boxes, sizes) if args.boxes is not None else {}
    predictor = Predictor(args.ckpt, device=args.device, image_size=args.image_size)
    session = AnnotationSession(predictor, folder, store)
    return AnnotationApp(session, out, args.vocabulary, proposals)


@command(OPTIONS, "python -m openseed.annotate", __doc__)
def main(args) -> int:
    from openseed.annotate.server import serve

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        app = build_app(args)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    server = serve(app, args.host, args.port)
    host, port = server.server_address[:2]
    folder = app.session.folder
    print(f"{len(folder)} images ({len(folder.unreadable)} unreadable files skipped), "
          f"journal {app.session.store.journal}")
    print(f"open http://{host}:{port}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
