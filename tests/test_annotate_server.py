"""The annotation app's HTTP API with the tiny model, over a real socket: the image list, the picture, encode, box ->
mask, edits, undo / redo, proposals from a detection file, export read back by pycocotools, and refusals (path
traversal, unknown routes, bad bodies, boxes outside the picture)."""

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO

from openseed.annotate.__main__ import build_app, main
from openseed.annotate.server import mask_runs, serve

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "coco_panoptic_sample" / "input_images" / \
    "000000142238.jpg"


@pytest.fixture
def server(tiny_model_file, tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    shutil.copy(PHOTO, root / "a.jpg")
    shutil.copy(PHOTO, root / "b.jpg")
    (root / "readme.txt").write_text("not a picture")
    detections = {"images": [{"id": 7, "file_name": "b.jpg", "height": 427, "width": 640}],
                  "categories": [{"id": 3, "name": "horse"}],
                  "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 100, 80]},
                                  {"id": 2, "image_id": 7, "category_id": 3, "bbox": [200, 100, 150, 200]}]}
    (tmp_path / "detections.json").write_text(json.dumps(detections))
    args = SimpleNamespace(images=str(root), ckpt=str(tiny_model_file), vocabulary=["person", "horse"],
                           boxes=str(tmp_path / "detections.json"), out=str(tmp_path / "out" / "annotations.json"),
                           device="cpu", image_size=256, **{"import": None})
    app = build_app(args)
    httpd = serve(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield SimpleNamespace(url=f"http://{host}:{port}", app=app, out=Path(args.out))
    httpd.shutdown()
    httpd.server_close()
    app.session.close()


def call(server, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(server.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            payload = response.read()
            kind = response.headers["Content-Type"]
            return response.status, (json.loads(payload) if kind == "application/json" else payload)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_api_end_to_end(server):
    status, state = call(server, "GET", "/api/state")
    assert status == 200 and [i["name"] for i in state["images"]] == ["a.jpg", "b.jpg"]
    assert state["unreadable"] == [{"name": "readme.txt", "reason": "not a readable image (UnidentifiedImageError)"}]
    assert state["images"][1]["boxes"] == 2 and state["vocabulary"] == ["person", "horse"]
    status, picture = call(server, "GET", "/api/image?name=a.jpg")
    assert status == 200 and picture == PHOTO.read_bytes()
    status, page = call(server, "GET", "/")
    assert status == 200 and b"/static/app.js" in page
    assert call(server, "POST", "/api/encode", {"name": "a.jpg", "next": "b.jpg"})[0] == 200

    status, made = call(server, "POST", "/api/segment", {"name": "a.jpg", "boxes": [[100, 100, 300, 400],
                                                                                     [10, 10, 50, 60]],
                                                          "names": ["person", "zebra"]})
    assert status == 200 and [o["category"] for o in made["objects"]] == ["person", "zebra"]
    first = made["objects"][0]
    mask = mask_utils.decode(server.app.session.store.get(first["id"]).rle)
    runs = np.asarray(first["runs"])
    assert first["size"] == [427, 640] and runs.sum() == mask.size and runs[1::2].sum() == mask.sum()
    status, edited = call(server, "POST", "/api/update", {"id": first["id"], "category": "man"})
    assert status == 200 and edited["object"]["category"] == "man"
    status, redrawn = call(server, "POST", "/api/update", {"id": first["id"], "box": [120, 100, 300, 420],
                                                           "decode": True})
    assert redrawn["object"]["box"] == [120, 100, 300, 420]
    status, after = call(server, "POST", "/api/undo", {"name": "a.jpg"})
    assert status == 200 and after["objects"][0]["box"] == [100, 100, 300, 400] and after["can_redo"]
    assert call(server, "POST", "/api/redo", {"name": "a.jpg"})[1]["objects"][0]["box"] == [120, 100, 300, 420]
    assert call(server, "POST", "/api/remove", {"id": made["objects"][1]["id"]})[0] == 200

    status, proposed = call(server, "POST", "/api/propose", {"name": "b.jpg"})
    assert [o["status"] for o in proposed["objects"]] == ["proposed", "proposed"]
    assert proposed["objects"][0]["box"] == [10, 10, 110, 90]
    call(server, "POST", "/api/update", {"id": proposed["objects"][1]["id"], "status": "accepted"})

    status, written = call(server, "POST", "/api/export", {"format": "rle"})
    assert status == 200 and written["annotations"] == 2 and Path(written["path"]) == server.out
    coco = COCO(str(server.out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["person", "horse", "man"]
    anns = coco.loadAnns(coco.getAnnIds())
    assert [(a["image_id"], a["category_id"]) for a in anns] == [(1, 3), (2, 2)]
    np.testing.assert_array_equal(coco.annToMask(anns[0]),
                                  mask_utils.decode(server.app.session.store.get(first["id"]).rle))
    assert call(server, "POST", "/api/export", {"format": "polygons"})[0] == 200
    assert all(isinstance(a["segmentation"], list) for a in json.loads(server.out.read_text())["annotations"])


def test_refusals_are_clear(server):
    for name in ["../images/a.jpg", "/etc/passwd", "readme.txt", "missing.jpg"]:
        status, answer = call(server, "GET", f"/api/image?name={name}")
        assert status == 404 and "not an image of the folder" in answer["error"]
    assert call(server, "GET", "/static/../server.py")[0] == 404
    assert call(server, "GET", "/api/nothing")[0] == 404
    status, answer = call(server, "POST", "/api/segment", {"name": "a.jpg", "boxes": [[700, 500, 800, 600]],
                                                            "names": ["dog"]})
    assert status == 400 and "outside" in answer["error"]
    status, answer = call(server, "POST", "/api/segment", {"name": "a.jpg", "boxes": [[1, 2, 3, 4]]})
    assert status == 400 and "one name per box" in answer["error"]
    status, answer = call(server, "POST", "/api/undo", {"name": "a.jpg"})
    assert status == 409 and "nothing to undo" in answer["error"]
    assert call(server, "POST", "/api/update", {"id": 99})[0] == 404
    assert call(server, "POST", "/api/export", {"format": "png"})[0] == 400
    request = urllib.request.Request(server.url + "/api/segment", data=b"[1, 2]", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400


def test_mask_runs_start_with_background():
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 0] = mask[2, 1] = True
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert mask_runs(rle) == [0, 1, 4, 1, 6]  # column-major: pixel 0, then pixel 5
    assert mask_runs(mask_utils.encode(np.asfortranarray(np.zeros((2, 2), dtype=np.uint8)))) == [4]


def test_command_line_errors(tmp_path, capsys):
    assert main(["images=" + str(tmp_path / "none"), "ckpt=x.pt"]) == 1
    assert "not a folder of images" in capsys.readouterr().err
    assert main(["ckpt=x.pt"]) == 2


def _wait_for_job(server, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = call(server, "GET", "/api/job")[1]["job"]
        if not job["running"]:
            return job
        time.sleep(0.05)
    raise AssertionError("the proposal run did not end")


def test_proposals_for_the_whole_folder_in_the_background_and_cancel(server, monkeypatch):
    status, started = call(server, "POST", "/api/propose_all")
    assert status == 200 and started["job"]["total"] == 1  # only b.jpg has boxes
    job = _wait_for_job(server)
    assert (job["done"], job["cancelled"], job["error"]) == (1, False, None)
    assert [o.status for o in server.app.session.store.objects("b.jpg")] == ["proposed", "proposed"]
    assert call(server, "POST", "/api/propose_all")[1]["job"]["total"] == 0  # proposed already: nothing to do
    assert call(server, "POST", "/api/propose", {"name": "b.jpg"})[1]["objects"] == []  # nor per image

    # cancel: both images with boxes; the first one's decoding waits until the cancel has arrived
    app = server.app
    app.proposals = {"a.jpg": [([10, 10, 50, 50], "dog")], "b.jpg": [([10, 10, 50, 50], "dog")]}
    for obj in app.session.store.objects("b.jpg"):
        app.session.store.remove(obj.id)
    cancelled, decoding = threading.Event(), []
    original = app.propose

    def slow_propose(name):
        decoding.append(name)
        assert cancelled.wait(30)
        return {"objects": []}

    monkeypatch.setattr(app, "propose", slow_propose)
    assert call(server, "POST", "/api/propose_all")[1]["job"]["total"] == 2
    assert call(server, "POST", "/api/propose_all")[0] == 409  # one run at a time
    call(server, "POST", "/api/cancel")
    cancelled.set()
    job = _wait_for_job(server)
    assert decoding == ["a.jpg"] and (job["done"], job["cancelled"]) == (1, True)
    monkeypatch.setattr(app, "propose", original)
