"""Box-to-mask annotation of an image folder (issue 16). Built so far: the folder's readable pictures and safe paths
(``folder``), the journalled annotation store (``store``), COCO export and import (``coco``) and the session that
encodes each image once and turns boxes into stored masks (``session``). The web app that drives them is not built
yet."""
