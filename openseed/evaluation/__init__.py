"""Evaluators with the official semantics: panoptic quality, COCO box/mask AP, semantic mIoU.

Each evaluator accumulates per-image results on every rank (``update``), gathers them once
(``openseed.evaluation.common.gather_to_all``) and computes the metrics; each also runs stand-alone on files
(``python -m openseed.evaluation.panoptic`` / ``instances``).
"""
