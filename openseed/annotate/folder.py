"""The pictures of a folder to annotate: which files are readable images, their upright sizes, and the one way to
turn a name from a request into a path (no path traversal).

Every regular file under the folder (subfolders included, hidden files and folders excluded) is looked at once, by
its header: a file PIL cannot identify, or a picture ``openseed.data.images.rgb_array`` would refuse (e.g. float
data outside [0, 1] shows only when decoded, and is refused then by the reader), is listed as unreadable with the
reason and skipped (a file whose header reads but whose pixel data is broken passes here and is reported when it is
opened for annotation). Names are POSIX paths relative to the folder. ``path(name)`` accepts only the names of the
listing: an absolute path, ``..``, a symbolic link out of the folder or any other file is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from openseed.data.images import exif_orientation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FolderImage:
    name: str  # relative POSIX path
    height: int  # upright (EXIF orientation applied), as the model reads it
    width: int


class ImageFolder:
    """The readable pictures under ``root`` (sorted by name) and the files that are not."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise NotADirectoryError(f"not a folder of images: {root}")
        self.images: list[FolderImage] = []
        self.unreadable: list[tuple[str, str]] = []  # (name, reason)
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            relative = path.relative_to(self.root)
            if any(part.startswith(".") for part in relative.parts):
                continue
            name = relative.as_posix()
            if not path.resolve().is_relative_to(self.root):
                self.unreadable.append((name, "a link to a file outside the folder"))
                continue
            try:
                with Image.open(path) as image:
                    width, height = image.size
                    if exif_orientation(image) in (5, 6, 7, 8):  # stored rotated by 90 degrees
                        width, height = height, width
            except (UnidentifiedImageError, OSError, ValueError) as err:
                self.unreadable.append((name, f"not a readable image ({type(err).__name__})"))
                continue
            self.images.append(FolderImage(name, height, width))
        if self.unreadable:
            log.warning("%s: %d file(s) are not readable images and are skipped: %s", self.root, len(self.unreadable),
                        ", ".join(name for name, _ in self.unreadable[:10]))
        self._by_name = {image.name: image for image in self.images}

    def __len__(self) -> int:
        return len(self.images)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> FolderImage:
        """The listed image of that name; ``KeyError`` for any other name (unreadable, absent, outside)."""
        if name not in self._by_name:
            raise KeyError(f"not an image of {self.root}: {name!r}")
        return self._by_name[name]

    def path(self, name: str) -> Path:
        """The file of a listed image. Only names of the listing pass (so ``../x``, ``/etc/passwd`` and links out of
        the folder never reach the disk), and the resolved path is checked to lie inside the folder."""
        self.get(name)
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root):
            raise KeyError(f"not an image of {self.root}: {name!r}")
        return path

    def sizes(self) -> dict[str, tuple[int, int]]:
        """name -> (height, width) of every readable image."""
        return {image.name: (image.height, image.width) for image in self.images}
