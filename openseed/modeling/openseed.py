"""OpenSeeD as one plain ``nn.Module``: backbone -> pixel decoder -> decoder, classified against text embeddings.

    model = build_openseed("tiny")                  # or "small" (CPU default), "swint", "swinl"
    outputs = model(batch.images, batch.padding_mask, batch.vocabulary, batch.targets)   # training
    masks = model.segment_boxes(images, padding_mask, boxes=[...], names=[...])        # box-prompted

Sizes live in ``MODEL_SIZES`` (the paper's Swin-T / Swin-L settings and two CPU sizes); any field can be overridden.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from openseed.data.vocab import Vocabulary
from openseed.modeling.backbone import Backbone, build_backbone
from openseed.modeling.decoder import Conditions, OpenSeeDDecoder
from openseed.modeling.outputs import Outputs, targets_to_model_boxes
from openseed.modeling.pixel_decoder import PixelDecoder
from openseed.modeling.text_encoder import TextEncoder, build_text_tower
from openseed.structures import Targets

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class OpenSeeDConfig:
    """Every size and switch of the model. See ``MODEL_SIZES`` for the named settings."""

    backbone: str = "swin_tiny"
    backbone_pretrained: bool | str = False
    drop_path_rate: float | None = None
    encoder_features: tuple[str, ...] = ("res3", "res4", "res5")
    num_levels: int = 4
    hidden_dim: int = 256
    encoder_layers: int = 6
    decoder_layers: int = 9
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.0
    mask_dim: int = 256
    num_fg: int = 300
    num_bg: int = 100
    text_tower: str = "clip"
    text_path: str | None = None
    text_dim: int = 512
    text_trainable: bool = True
    text_lr_multiplier: float = 0.1
    decoupled: bool = True
    conditioned: bool = True
    cond_budget: int = 100
    box_noise_scale: float = 0.4


MODEL_SIZES: dict[str, OpenSeeDConfig] = {
    # the paper's settings (SPEC.md section 2; ref configs): 4 encoder levels from stride 8 for Swin-T, 5 from 4 for L
    "swint": OpenSeeDConfig(backbone="swin_tiny", drop_path_rate=0.3),
    "swinl": OpenSeeDConfig(backbone="swin_large", encoder_features=("res2", "res3", "res4", "res5"), num_levels=5),
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
    """The model. Modules are built outside (``build_openseed``) and passed in.

    Args:
        backbone: multi-scale image encoder. pixel_decoder, decoder: see their modules. text_encoder: class names
            -> [K, text_dim] embeddings. seed: seed of the synonym/template draws in training.
    """

    def __init__(self, backbone: Backbone, pixel_decoder: PixelDecoder, decoder: OpenSeeDDecoder,
                 text_encoder: TextEncoder, pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, seed: int = 0):
        super().__init__()
        self.backbone, self.pixel_decoder, self.decoder = backbone, pixel_decoder, decoder
        self.text_encoder = text_encoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self.rng = random.Random(seed)

    def embed_vocabulary(self, vocabulary: Vocabulary) -> Tensor:
        """[K, text_dim]: one random template and synonym per class in training, the prompt ensemble otherwise."""
        return self.text_encoder.encode_vocabulary(vocabulary, training=self.training,
                                                   rng=self.rng if self.training else None)

    def encode_images(self, images: Tensor, padding_mask: Tensor):
        """uint8 or float [B, 3, H, W] (RGB, 0-255; H, W multiples of 32) -> ``EncoderMemory``."""
        pixels = (images.float() - self.pixel_mean) / self.pixel_std
        pixels = pixels.masked_fill(padding_mask[:, None], 0.0)
        with record_function("backbone"):
            features = self.backbone(pixels)
        with record_function("pixel_decoder"):
            return self.pixel_decoder(features, padding_mask)

    def forward(self, images: Tensor, padding_mask: Tensor, vocabulary: Vocabulary,
                targets: list[Targets] | None = None, conditions: Conditions | None = None,
                text: Tensor | None = None) -> Outputs:
        """Predictions for a batch.

        Args:
            images: [B, 3, H, W] RGB 0-255 (uint8 as the data pipeline gives them), zero-padded.
            padding_mask: [B, H, W] bool, True on padding.
            vocabulary: the classes to score (``Batch.vocabulary``).
            targets: ground truth; in training (with conditioned decoding on) the conditioned queries are built
                from it (all targets: things and stuff on segmentation data, boxes on detection data).
            conditions: explicit conditions instead (box prompts); overrides ``targets`` for the conditioned queries.
            text: precomputed [K, text_dim] embeddings of ``vocabulary`` (skips the text encoder).
        """
        if text is None:
            with record_function("text_encoder"):
                text = self.embed_vocabulary(vocabulary)
        memory = self.encode_images(images, padding_mask)
        if conditions is None and targets is not None and self.training and self.decoder.conditioned:
            padded = tuple(images.shape[-2:])
            conditions = Conditions(labels=[t.labels for t in targets],
                                    boxes=[targets_to_model_boxes(t.boxes, padded) for t in targets])
        with record_function("decoder"):
            return self.decoder(memory, text, conditions)

    @torch.no_grad()
    def segment_boxes(self, images: Tensor, padding_mask: Tensor, boxes: list[Tensor], names: list[list[str]],
                      threshold: float = 0.0) -> list[Tensor]:
        """Box-prompted segmentation (conditioned decoding without noise; paper Fig. 6).

        Args:
            images, padding_mask: as ``forward``.
            boxes: per image, [N_i, 4] xyxy pixels of the padded image.
            names: per image, one class name per box.
            threshold: mask logit threshold.
        Returns:
            per image, bool [N_i, h_i, w_i] masks at the image's unpadded size (from ``padding_mask``).
        """
        if not self.decoder.conditioned:
            raise ValueError("this model was built with conditioned=False: it cannot decode box prompts")
        if len(boxes) != images.shape[0] or len(names) != images.shape[0]:
            raise ValueError(f"need boxes and names for each of the {images.shape[0]} images")
        for image_boxes, image_names in zip(boxes, names):
            if len(image_boxes) != len(image_names):
                raise ValueError(f"{len(image_boxes)} boxes but {len(image_names)} names")
        was_training = self.training
        self.eval()
        try:
            vocabulary = Vocabulary.from_names(sorted({n for image_names in names for n in image_names}) or ["object"])
            index = {n: i for i, n in enumerate(vocabulary.names)}
            padded = tuple(images.shape[-2:])
            conditions = Conditions(
                labels=[torch.tensor([index[n] for n in image_names], dtype=torch.long) for image_names in names],
                boxes=[targets_to_model_boxes(b.float().to(images.device), padded) for b in boxes],
                add_noise=False, num_groups=1)
            outputs = self.forward(images, padding_mask, vocabulary, conditions=conditions)
        finally:
            self.train(was_training)
        masks = F.interpolate(outputs.conditioned.predictions[-1].masks, size=padded, mode="bilinear",
                              align_corners=False)
        results = []
        for i, image_boxes in enumerate(boxes):
            height = int((~padding_mask[i]).any(1).sum())
            width = int((~padding_mask[i]).any(0).sum())
            results.append(masks[i, : len(image_boxes), :height, :width] > threshold)
        return results


def build_openseed(size: str | OpenSeeDConfig = "tiny", **overrides) -> OpenSeeD:
    """Build a model from a named size (``MODEL_SIZES``) or a config, with any field overridden by keyword."""
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
    backbone = build_backbone(config.backbone, pretrained=config.backbone_pretrained,
                              drop_path_rate=config.drop_path_rate)
    pixel_decoder = PixelDecoder(backbone.channels, backbone.strides, config.encoder_features, config.num_levels,
                                 config.hidden_dim, config.encoder_layers, config.num_heads, config.num_points,
                                 config.ffn_dim, config.dropout, config.mask_dim)
    decoder = OpenSeeDDecoder(config.hidden_dim, config.text_dim, config.mask_dim, config.num_levels, config.num_fg,
                              config.num_bg, config.decoder_layers, config.num_heads, config.num_points,
                              config.ffn_dim, config.dropout, config.decoupled, config.conditioned,
                              config.cond_budget, config.box_noise_scale)
    tower = build_text_tower(config.text_tower, path=config.text_path)
    text_encoder = TextEncoder(tower, config.text_dim, trainable=config.text_trainable,
                               lr_multiplier=config.text_lr_multiplier)
    model = OpenSeeD(backbone, pixel_decoder, decoder, text_encoder)
    model.config = asdict(config)
    return model
