"""The ground floor: the types and conventions that cross the seams between data, model, losses, evaluation and
inference, each defined once. Pure torch, numpy and pycocotools: every other part of openseed may import it, and it
imports nothing of openseed's outside itself.

- ``vocabulary``: ``Category``, ``Vocabulary`` and the class-name rules the text encoder reads;
- ``batch``: ``Batch`` and ``Targets`` (data -> model and losses);
- ``boxes``: the pixel, COCO and model box conventions and their conversions;
- ``conditions``: ``Conditions``, the boxes the conditioned queries decode (training targets or box prompts);
- ``outputs``: ``Outputs``, ``Prediction``, ``ConditionedOutputs`` (model -> losses and post-processing);
- ``predictions``: ``Instances``, ``PanopticSegmentation``, ``SemanticSegmentation``, ``BoxPromptMasks`` (one image's
  post-processed results -> evaluators, the predictor, the tools);
- ``codecs``: panoptic id maps <-> PNG colours, masks <-> COCO RLE.
"""
