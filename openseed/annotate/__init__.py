"""Box-to-mask annotation of an image folder (issue 16): the annotation store (``store``) and COCO export and
import (``coco``). The web app that drives them is not built yet."""
