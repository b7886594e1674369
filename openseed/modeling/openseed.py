"""OpenSeeD as one plain ``nn.Module``: backbone -> pixel decoder -> decoder, classified against text embeddings.

    model = build_openseed("tiny")    # or "small" (CPU default), "swint_nodecouple", "swint_decouple", "swinl_decouple"
    outputs = model(batch)                                       # a data Batch (in training: conditioned queries
                                                                 # from its targets)
    outputs = model.forward_images(images, padding_mask, vocabulary)                  # images without ground truth
    masks = model.segment_boxes(images, padding_mask, boxes=[...], names=[...])        # box-prompted

Sizes live in ``MODEL_SIZES`` (the three released architectures, which compute what the reference computes, and two
CPU sizes); any field can be overridden.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from openseed.core.batch import Batch
from openseed.core.boxes import targets_to_model_boxes
from openseed.core.conditions import Conditions
from openseed.core.outputs import Outputs
from openseed.core.vocabulary import Vocabulary
from openseed.modeling.backbone import build_backbone
from openseed.modeling.checkpoint import load_state_strictly, read_checkpoint
from openseed.modeling.decoder import OpenSeeDDecoder
from openseed.modeling.pixel_decoder import EncoderMemory, PixelDecoder
from openseed.modeling.text_encoder import TextEncoder, build_text_tower

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class OpenSeeDConfig:
    """Every size and switch of the model, and how it is meant to be run. See ``MODEL_SIZES`` for the named settings.

    Architecture: backbone (a ``BACKBONES`` name; ``backbone_options`` sizes a custom "swin"), encoder levels and
    sizes, decoder sizes (``decoder_num_heads``: None = ``num_heads``; the reference's decoder always has 8), queries,
    text tower (``text_tower`` kind; ``text_context/width/layers/heads`` size the "clip_transformer" kind).

    Switches where our CPU models keep their own choice and the presets that load released weights follow the
    reference (docs/model.md, "Switches"): ``mask_padding`` (padded cells are kept out of attention and query
    selection), ``level_order`` ("fine_first": the finest encoder level proposes the smallest anchors;
    "coarse_first": the reference's reversed order), ``class_bias`` (a learned prior bias on the class logits),
    ``name_cleaning`` ("openseed": ``openseed.core.vocabulary.clean_class_name``; "reference": only
    -other/-merged/-stuff removed). Training switches: ``box_noise`` ("corners": each corner of a conditioned
    query's box jittered, as the paper describes DN-DETR's noise; "reference": the reference's centre shift and
    width/height scaling) and ``cond_over_budget`` ("one_group": one denoising group even when an image has more
    targets than ``cond_budget``; "none": no denoising queries for such a batch, as the reference), ``bg_training``
    ("openseed": background anchors and content learn through the decoder's losses; "reference": they enter the
    decoder detached and learn through the proposal outputs, which carry their rows in training), ``text_lr_scope``
    ("reference": the joint-space projection and the logit scale at the text tower's lr multiplier) and
    ``fp32_encoder_decoder`` (the pixel decoder and decoder in float32 under mixed precision, as the reference; on
    for every size).

    Use: ``eval_short_edge`` / ``eval_max_size`` the evaluation resize (None: the caller's, e.g. the data config's or
    the predictor's square ``image_size``), ``test_top_k`` instance detections per image, ``clip_boxes`` clip
    predicted boxes to the image (the reference does not).
    """

    backbone: str = "swin_tiny"
    backbone_pretrained: bool | str = False
    backbone_options: dict | None = None
    drop_path_rate: float | None = None
    encoder_features: tuple[str, ...] = ("res3", "res4", "res5")
    num_levels: int = 4
    hidden_dim: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 9
    num_heads: int = 8
    decoder_num_heads: int | None = None
    num_points: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.0
    mask_dim: int = 256
    num_fg: int = 300
    num_bg: int = 100
    text_tower: str = "clip"
    text_path: str | None = None
    text_dim: int = 512
    text_context: int = 77
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_trainable: bool = True
    text_lr_multiplier: float = 0.1
    text_lr_scope: str = "tower"
    fp32_encoder_decoder: bool = True
    decoupled: bool = True
    conditioned: bool = True
    cond_budget: int = 100
    box_noise_scale: float = 0.4
    box_noise: str = "corners"
    cond_over_budget: str = "one_group"
    bg_training: str = "openseed"  # "reference": bg queries detached in the decoder, trained via the proposals
    mask_padding: bool = True
    level_order: str = "fine_first"
    class_bias: bool = True
    name_cleaning: str = "openseed"
    eval_short_edge: int | None = None
    eval_max_size: int | None = None
    test_top_k: int = 100
    clip_boxes: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> OpenSeeDConfig:
        """From recorded fields (a checkpoint's config); unknown fields are an error, lists become tuples."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# Parameters trained at the text tower's lr multiplier: the tower's own ("tower"), or also the projection into the
# joint space and the class head's logit scale, which the reference keeps in its language encoder (lr x0.1 there)
TEXT_LR_SCOPES = {"tower": ("text_encoder.tower.",),
                  "reference": ("text_encoder.tower.", "text_encoder.projection.", "decoder.class_head.logit_scale")}

# The reference's computation and use, shared by the presets of the three released architectures
# (../shared/reference/README.md; docs/model.md): no padding mask, levels read coarsest first, no class bias, its
# CLIP-style text transformer with its name cleaning, 8 decoder heads, 800/1333 evaluation resize, unclipped boxes.
_REFERENCE = dict(drop_path_rate=0.3, decoder_num_heads=8, text_tower="clip_transformer", text_dim=512,
                  text_width=512, text_layers=12, text_heads=8, mask_padding=False, level_order="coarse_first",
                  class_bias=False, name_cleaning="reference", eval_short_edge=800, eval_max_size=1333,
                  clip_boxes=False, box_noise="reference", cond_over_budget="none", text_lr_scope="reference",
                  bg_training="reference")

MODEL_SIZES: dict[str, OpenSeeDConfig] = {
    # the released architectures (../shared/reference/manifests): Swin-T without background queries (text context
    # 18; model_state_dict_swint_51.2ap.pt), Swin-T decoupled (300 fg + 100 bg, context 77; the COCO + Objects365
    # configuration), Swin-L decoupled (5 levels from stride 4, context 18; openseed_swinl_pano_sota.pt and
    # openseed_ade20k_swinl.pt)
    "swint_nodecouple": OpenSeeDConfig(backbone="swin_tiny", decoupled=False, num_fg=300, num_bg=0, text_context=18,
                                       test_top_k=100, **_REFERENCE),
    "swint_decouple": OpenSeeDConfig(backbone="swin_tiny", text_context=77, test_top_k=300, **_REFERENCE),
    "swinl_decouple": OpenSeeDConfig(backbone="swin_large", encoder_features=("res2", "res3", "res4", "res5"),
                                     num_levels=5, text_context=18, test_top_k=300, **_REFERENCE),
    # the CPU default experiment on synthshapes (160 px)
    "small": OpenSeeDConfig(backbone="tiny_resnet", hidden_dim=128, encoder_layers=2, decoder_layers=4, num_heads=4,
                            ffn_dim=512, mask_dim=128, num_fg=40, num_bg=20, text_tower="minilm", text_dim=128,
                            text_trainable=False, cond_budget=40),
    # tests: a few seconds per step on CPU
    "tiny": OpenSeeDConfig(backbone="tiny", hidden_dim=64, encoder_layers=1, decoder_layers=2, num_heads=4,
                           num_points=2, ffn_dim=128, mask_dim=64, num_fg=10, num_bg=5, text_tower="tiny",
                           text_dim=64, cond_budget=20),
}


class OpenSeeD(nn.Module):
    """The model, built from its config, which it keeps (``config``: what a model file records).

    Parts: ``backbone`` (multi-scale image encoder), ``pixel_decoder``, ``decoder`` (see their modules),
    ``text_encoder`` (class names -> [K, text_dim] embeddings). ``seed``: of the synonym/template draws in training.
    ``config.fp32_encoder_decoder`` runs the pixel decoder (the deformable encoder) and the decoder in float32 even
    under mixed precision (autocast off, inputs cast up), as the reference does; the backbone and the text tower
    follow the autocast setting. ``build_openseed`` makes one from a size name, overrides or a model file.
    """

    def __init__(self, config: OpenSeeDConfig, seed: int = 0):
        super().__init__()
        if config.text_lr_scope not in TEXT_LR_SCOPES:
            raise ValueError(f"text_lr_scope must be one of {sorted(TEXT_LR_SCOPES)}, got {config.text_lr_scope!r}")
        self.config = config
        self.fp32_encoder_decoder = config.fp32_encoder_decoder
        backbone = build_backbone(config.backbone, pretrained=config.backbone_pretrained,
                                  drop_path_rate=config.drop_path_rate, options=config.backbone_options)
        pixel_decoder = PixelDecoder(backbone.channels, backbone.strides, config.encoder_features,
                                     config.num_levels, config.hidden_dim, config.encoder_layers, config.num_heads,
                                     config.num_points, config.ffn_dim, config.dropout, config.mask_dim,
                                     mask_padding=config.mask_padding)
        decoder = OpenSeeDDecoder(config.hidden_dim, config.text_dim, config.mask_dim, config.num_levels,
                                  config.num_fg, config.num_bg, config.decoder_layers,
                                  config.decoder_num_heads or config.num_heads, config.num_points, config.ffn_dim,
                                  config.dropout, config.decoupled, config.conditioned, config.cond_budget,
                                  config.box_noise_scale, class_bias=config.class_bias,
                                  level_order=config.level_order, box_noise=config.box_noise,
                                  cond_over_budget=config.cond_over_budget, bg_training=config.bg_training)
        tower_options = {}
        if config.text_tower == "clip_transformer":
            tower_options = dict(context_length=config.text_context, width=config.text_width,
                                 layers=config.text_layers, heads=config.text_heads)
        tower = build_text_tower(config.text_tower, path=config.text_path, **tower_options)
        text_encoder = TextEncoder(tower, config.text_dim, trainable=config.text_trainable,
                                   lr_multiplier=config.text_lr_multiplier, name_style=config.name_cleaning)
        self.backbone, self.pixel_decoder, self.decoder = backbone, pixel_decoder, decoder
        self.text_encoder = text_encoder
        pixel_mean, pixel_std = IMAGENET_MEAN, IMAGENET_STD
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.rng = random.Random(seed)

    @property
    def text_lr_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes trained at the text tower's lr multiplier (``config.text_lr_scope``)."""
        return TEXT_LR_SCOPES[self.config.text_lr_scope]

    def embed_vocabulary(self, vocabulary: Vocabulary) -> Tensor:
        """[K, text_dim]: one random template and synonym per class in training, the prompt ensemble otherwise."""
        return self.text_encoder.encode_vocabulary(vocabulary, training=self.training,
                                                   rng=self.rng if self.training else None)

    def normalise(self, images: Tensor, padding_mask: Tensor) -> Tensor:
        """uint8 or float [B, 3, H, W] RGB 0-255 -> the backbone's input: (x - mean) / std, zero on padding."""
        pixels = (images.float() - self.pixel_mean) / self.pixel_std
        return pixels.masked_fill(padding_mask[:, None], 0.0)

    def encode_images(self, images: Tensor, padding_mask: Tensor) -> EncoderMemory:
        """uint8 or float [B, 3, H, W] (RGB, 0-255; H, W multiples of 32) -> ``EncoderMemory``."""
        pixels = self.normalise(images, padding_mask)
        with record_function("backbone"):
            features = self.backbone(pixels)
        with record_function("pixel_decoder"):
            with self._full_precision(pixels):
                if self.fp32_encoder_decoder:
                    features = {name: value.float() for name, value in features.items()}
                return self.pixel_decoder(features, padding_mask)

    def _full_precision(self, reference: Tensor):
        """Autocast off on ``reference``'s device when ``fp32_encoder_decoder`` (a no-op context otherwise)."""
        if not self.fp32_encoder_decoder:
            return contextlib.nullcontext()
        return torch.autocast(reference.device.type, enabled=False)

    def _decode(self, memory: EncoderMemory, text: Tensor, conditions: Conditions | None,
                masks: str = "all") -> Outputs:
        with self._full_precision(text):
            return self.decoder(memory, text.float() if self.fp32_encoder_decoder else text, conditions, masks)

    def forward(self, batch: Batch, conditions: Conditions | None = None, text: Tensor | None = None,
                clean_group: bool = False) -> Outputs:
        """Predictions for a data batch (``openseed.core.batch.Batch``: its images, padding and vocabulary).

        In training, with conditioned decoding on, the conditioned queries are built from the batch's targets (all of
        them: things and stuff on segmentation data, boxes on detection data; boxes from ``Batch.model_boxes``, which
        the losses read too). Out of training the targets are not read.

        Args:
            batch: the data batch.
            conditions: explicit conditions instead of the targets' (box prompts).
            text: precomputed [K, text_dim] embeddings of the batch's vocabulary (skips the text encoder).
            clean_group: in training, add a conditioned group built from the boxes without noise
                (``Conditions.clean_group``: the masks online mask assistance matches with).
        """
        if conditions is None and self.training and self.decoder.conditioned:
            conditions = Conditions(labels=[t.labels for t in batch.targets], boxes=batch.model_boxes(),
                                    clean_group=clean_group)
        return self.forward_images(batch.images, batch.padding_mask, batch.vocabulary, conditions, text)

    def forward_images(self, images: Tensor, padding_mask: Tensor, vocabulary: Vocabulary,
                       conditions: Conditions | None = None, text: Tensor | None = None,
                       masks: str = "all") -> Outputs:
        """Predictions for images without ground truth (the predictor, the tools; ``forward`` for data batches).

        Args:
            images: [B, 3, H, W] RGB 0-255 (uint8 as the data pipeline gives them), zero-padded.
            padding_mask: [B, H, W] bool, True on padding.
            vocabulary: the classes to score.
            conditions: boxes the conditioned queries decode (box prompts), or None.
            text: precomputed [K, text_dim] embeddings of ``vocabulary`` (skips the text encoder).
            masks: which predictions carry masks: ``"all"``, or ``"final"`` for inference that reads only
                ``outputs.final`` (the predictor, the evaluation loop: the same final outputs, without the other
                layers' mask products); see ``openseed.modeling.decoder``.
        """
        if text is None:
            with record_function("text_encoder"):
                text = self.embed_vocabulary(vocabulary)
        memory = self.encode_images(images, padding_mask)
        with record_function("decoder"):
            return self._decode(memory, text, conditions, masks)

    @torch.no_grad()
    def decode_boxes(self, images: Tensor, padding_mask: Tensor, vocabulary: Vocabulary, boxes: list[Tensor],
                     labels: list[Tensor], memory: EncoderMemory | None = None, text: Tensor | None = None,
                     masks: str = "all") -> Outputs:
        """Box-prompted decoding (conditioned queries without noise, one group; paper Fig. 6), in eval mode.

        Args:
            images, padding_mask: as ``forward``.
            vocabulary: the classes the outputs are scored against; ``labels`` index into it.
            boxes: per image, [N_i, 4] xyxy pixels of the padded image.
            labels: per image, long [N_i]: the class of each box (its text embedding is the query's content).
            memory, text: the image's ``encode_images`` output and the vocabulary's embeddings, when already
                computed (an annotation tool encodes an image once and decodes many boxes).
            masks: which predictions carry masks: ``"all"``, or ``"prompts"`` (only the last layer's conditioned
                predictions: one mask per box and nothing else).
        Returns:
            ``Outputs`` whose ``conditioned.predictions`` hold, before the first decoder layer and after each layer,
            one query per box (slot j of image i = box j); the matching queries' predictions of the same pass as
            usual (conditioned queries cannot influence them).
        """
        if not self.decoder.conditioned:
            raise ValueError("this model was built with conditioned=False: it cannot decode box prompts")
        if len(boxes) != images.shape[0] or len(labels) != images.shape[0]:
            raise ValueError(f"need boxes and labels for each of the {images.shape[0]} images")
        for image_boxes, image_labels in zip(boxes, labels):
            if len(image_boxes) != len(image_labels):
                raise ValueError(f"{len(image_boxes)} boxes but {len(image_labels)} labels")
        was_training = self.training
        self.eval()
        try:
            padded = tuple(images.shape[-2:])
            conditions = Conditions(labels=[torch.as_tensor(label, dtype=torch.long) for label in labels],
                                    boxes=[targets_to_model_boxes(b.float().to(images.device), padded) for b in boxes],
                                    add_noise=False, num_groups=1)
            if text is None:
                text = self.embed_vocabulary(vocabulary)
            if memory is None:
                memory = self.encode_images(images, padding_mask)
            return self._decode(memory, text, conditions, masks)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def segment_boxes(self, images: Tensor, padding_mask: Tensor, boxes: list[Tensor], names: list[list[str]],
                      threshold: float = 0.0, vocabulary: Vocabulary | None = None,
                      text: Tensor | None = None, memory: EncoderMemory | None = None) -> list[Tensor]:
        """Box-prompted segmentation: one mask per box (``decode_boxes`` with a vocabulary of the given names).

        Args:
            images, padding_mask: as ``forward``.
            boxes: per image, [N_i, 4] xyxy pixels of the padded image.
            names: per image, one class name per box.
            threshold: mask logit threshold.
            vocabulary, text: a vocabulary holding every name and its ``embed_vocabulary`` embeddings, to embed the
                names once for many calls (a data set's boxes); by default a vocabulary of this call's names.
            memory: the images' ``encode_images`` output when already computed (then a call costs the decoder only).
        Returns:
            per image, bool [N_i, h_i, w_i] masks at the image's unpadded size (from ``padding_mask``).
        """
        if len(names) != images.shape[0] or len(boxes) != images.shape[0]:
            raise ValueError(f"need boxes and names for each of the {images.shape[0]} images")
        for image_boxes, image_names in zip(boxes, names):
            if len(image_boxes) != len(image_names):
                raise ValueError(f"{len(image_boxes)} boxes but {len(image_names)} names")
        if vocabulary is None:
            vocabulary = Vocabulary.from_names(sorted({n for image_names in names for n in image_names}) or ["object"])
        index = {n: i for i, n in enumerate(vocabulary.names)}
        unknown = sorted({n for image_names in names for n in image_names} - set(index))
        if unknown:
            raise ValueError(f"names not in the given vocabulary: {unknown}")
        labels = [torch.tensor([index[n] for n in image_names], dtype=torch.long) for image_names in names]
        outputs = self.decode_boxes(images, padding_mask, vocabulary, boxes, labels, memory=memory, text=text,
                                    masks="prompts")
        padded = tuple(images.shape[-2:])
        masks = F.interpolate(outputs.conditioned.predictions[-1].masks, size=padded, mode="bilinear",
                              align_corners=False)
        results = []
        for i, image_boxes in enumerate(boxes):
            height = int((~padding_mask[i]).any(1).sum())
            width = int((~padding_mask[i]).any(0).sum())
            results.append(masks[i, : len(image_boxes), :height, :width] > threshold)
        return results


def build_openseed(size: str | OpenSeeDConfig | None = "tiny", init_from: str | Path | None = None,
                   **overrides) -> OpenSeeD:
    """Build a model from a named size (``MODEL_SIZES``) or a config, with any field overridden by keyword.

    ``init_from``: a model file (e.g. a converted released checkpoint) or training checkpoint whose weights the model
    starts from, loaded strictly (fine-tuning: weights only; optimizer, schedule and step start afresh). With
    ``size=None`` the model is the file's own (its recorded config, with ``overrides``). The backbone's published
    weights are not fetched then (``backbone_pretrained`` is ignored): the file's replace them.
    """
    state = None
    if init_from is not None:
        recorded, state = read_checkpoint(init_from)
        overrides = {**overrides, "backbone_pretrained": False}
        if size is None:
            size = OpenSeeDConfig.from_dict(recorded)
    if size is None:
        raise ValueError("give a model size (one of MODEL_SIZES, or a config) or init_from=<model file>")
    if isinstance(size, str):
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}; choose from {sorted(MODEL_SIZES)}")
        config = MODEL_SIZES[size]
    else:
        config = size
    known = {f.name for f in fields(OpenSeeDConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model option(s) {sorted(unknown)}; known: {sorted(known)}")
    config = replace(config, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    model = OpenSeeD(config)
    if state is not None:
        load_state_strictly(model, state, init_from)
    return model


def load_model(path: str | Path, **overrides) -> OpenSeeD:
    """Build the model a checkpoint describes and load its weights strictly (on the CPU).

    ``overrides`` change config fields that do not change the weights' shapes (e.g. ``text_path`` to point the text
    tower at a local copy).
    """
    return build_openseed(None, init_from=path, **overrides)


def read_model_config(path: str | Path) -> OpenSeeDConfig:
    """The config a model file or training checkpoint records, without building the model."""
    return OpenSeeDConfig.from_dict(read_checkpoint(path)[0])
