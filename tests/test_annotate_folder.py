"""openseed.annotate.folder: readable pictures listed with their upright sizes, other files listed as unreadable and
skipped, and no name from a request reaches a file outside the listing."""

import os

import numpy as np
import pytest
from PIL import Image

from openseed.annotate.folder import ImageFolder


def _picture(path, height, width, orientation=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8))
    if orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif)


def test_listing_sizes_unreadable_files_and_traversal(tmp_path, caplog):
    root = tmp_path / "images"
    _picture(root / "b.png", 20, 30)
    _picture(root / "sub" / "a.jpg", 10, 40, orientation=6)  # stored rotated: upright it is 40 x 10
    (root / "notes.txt").write_text("not a picture")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / ".hidden.png").write_bytes(b"")
    secret = tmp_path / "secret.png"
    _picture(secret, 5, 5)
    os.symlink(secret, root / "link.png")
    with caplog.at_level("WARNING"):
        folder = ImageFolder(root)
    assert [(i.name, i.height, i.width) for i in folder.images] == [("b.png", 20, 30), ("sub/a.jpg", 40, 10)]
    assert dict(folder.unreadable) == {"broken.jpg": "not a readable image (OSError)",
                                       "link.png": "a link to a file outside the folder",
                                       "notes.txt": "not a readable image (UnidentifiedImageError)"}
    assert "3 file(s) are not readable images" in caplog.text
    assert folder.path("sub/a.jpg") == (root / "sub" / "a.jpg").resolve()
    assert folder.sizes() == {"b.png": (20, 30), "sub/a.jpg": (40, 10)}
    for name in ["../secret.png", str(secret), "link.png", "notes.txt", "sub/../b.png", "missing.png", ""]:
        with pytest.raises(KeyError, match="not an image of"):
            folder.path(name)
    with pytest.raises(NotADirectoryError, match="not a folder of images"):
        ImageFolder(tmp_path / "nowhere")
