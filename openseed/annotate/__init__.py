"""Box-to-mask annotation of an image folder (``python -m openseed.annotate``; docs/annotate.md): the folder's
readable pictures and safe paths (``folder``), the journalled annotation store (``store``), COCO export and import
(``coco``), the session that encodes each image once and turns boxes into stored masks (``session``) and the HTTP API
with its page (``server``, ``static/``)."""
