"""The authors' OpenSeeD checkpoints in openseed: their configs, their state-dict layout, and the map to ours.

The reference code (IDEA-Research/OpenSeeD, detectron2-based) saves ``model.state_dict()`` of its module tree:
``backbone.*`` (the Swin detection backbone), ``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*`` (decoder,
heads and the text tower ``lang_encoder``) and the training criteria's buffers. ``map_reference_state_dict`` turns such
a state dict into an ``OpenSeeD`` state dict, key by key:

- every source key is used or is on the documented drop list (``DROPPED``: the criteria's ``empty_weight`` buffers,
  Swin's ``relative_position_index`` buffers, which the model rebuilds, and the aliases of shared tensors, each
  checked to equal the tensor it aliases);
- every target tensor is filled, with the shape the model has; anything else is a ``ConversionError`` that lists the
  keys (never a partial or silent load, unlike the reference's own loader, which drops tensors whose shape differs).

``config_from_reference`` reads a reference config (``configs/openseed/*.yaml``, or the fixtures' merged
``config.yaml``) into an ``OpenSeeDConfig`` with the reference's computation; ``MODEL_SIZES`` holds the three released
architectures. ``describe_state_dict`` tells which architecture a state dict holds, for clear errors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from openseed.modeling.checkpoint import load_weights_only
from openseed.modeling.openseed import IMAGENET_MEAN, IMAGENET_STD, MODEL_SIZES, OpenSeeDConfig

REFERENCE_ARCHITECTURES = ("swint_nodecouple", "swint_decouple", "swinl_decouple")
HEAD = "sem_seg_head."
PREDICTOR = "sem_seg_head.predictor."
ENCODER = "sem_seg_head.pixel_decoder."

#: Source keys that are not weights of the model, with the reason (regex -> reason).
DROPPED: dict[str, str] = {
    r"^criterion(_\w+)?\.empty_weight$": "training criterion buffer (class weights of a softmax loss never used)",
    r"^backbone\.layers\.\d+\.blocks\.\d+\.attn\.relative_position_index$":
        "Swin relative position index (a constant the model rebuilds)",
    r"^backbone\.layers\.\d+\.blocks\.\d+\.attn_mask$": "Swin shifted-window mask (a constant the model rebuilds)",
}
# Aliases of one shared tensor (checked equal to the canonical copy, then dropped).
_BOX_MLP = re.compile(r"^sem_seg_head\.predictor\.(_bbox_embed|bbox_embed\.\d+|decoder\.bbox_embed\.\d+)"
                      r"\.layers\.(\d+)\.(weight|bias)$")
_DECODER_NORM_ALIAS = re.compile(r"^sem_seg_head\.predictor\.decoder\.norm\.(weight|bias)$")


class ConversionError(ValueError):
    """A state dict that does not fit the target model (message lists the keys)."""


@dataclass
class ConversionReport:
    """What ``map_reference_state_dict`` did: tensors written, source keys dropped (by reason), aliases checked."""

    written: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    aliases: int = 0
    transposed: list[str] = field(default_factory=list)
    cast: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.written} tensors written"]
        parts += [f"{count} dropped ({reason})" for reason, count in sorted(self.dropped.items())]
        parts.append(f"{self.aliases} aliases of shared tensors checked equal and dropped")
        if self.transposed:
            parts.append(f"{len(self.transposed)} transposed ({', '.join(self.transposed)})")
        if self.cast:
            parts.append(f"{len(self.cast)} cast to float32")
        return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------- reading
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a reference checkpoint, read without executing pickled code.

    Accepts a flat state dict, one nested under "model" / "state_dict", and keys with a "model." or "module."
    prefix. Raises ``FileNotFoundError`` or ``ConversionError`` (naming the file) otherwise.
    """
    try:
        data = load_weights_only(path)
    except ValueError as err:  # unreadable or unsafe: the message names the file and why
        raise ConversionError(str(err)) from err
    for key in ("model", "state_dict"):
        while isinstance(data, Mapping) and isinstance(data.get(key), Mapping) and not _all_tensors(data):
            data = data[key]
    if not isinstance(data, Mapping) or not data or not _all_tensors(data):
        raise ConversionError(f"{path}: not a state dict (name -> tensor), nor one nested under 'model' / "
                              f"'state_dict'")
    state = dict(data)
    for prefix in ("module.", "model."):
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _all_tensors(mapping: Mapping) -> bool:
    return all(isinstance(value, Tensor) for value in mapping.values())


# ---------------------------------------------------------------------------------------------------- configs
def describe_state_dict(state: Mapping[str, Tensor]) -> dict:
    """Facts that tell the released architectures apart: text context, background queries, encoder levels, Swin
    embedding width and depth of its third stage, and the matching architecture name (or None)."""
    facts: dict = {}
    positional = state.get(f"{PREDICTOR}lang_encoder.lang_encoder.positional_embedding")
    facts["text_context"] = None if positional is None else int(positional.shape[0])
    queries = state.get(f"{PREDICTOR}query_feat.weight")
    facts["background_queries"] = 0 if queries is None else int(queries.shape[0])
    level_embed = state.get(f"{ENCODER}transformer.level_embed")
    facts["encoder_levels"] = None if level_embed is None else int(level_embed.shape[0])
    patch = state.get("backbone.patch_embed.proj.weight")
    facts["swin_embed_dim"] = None if patch is None else int(patch.shape[0])
    facts["swin_stage3_depth"] = len({m.group(1) for key in state
                                      if (m := re.match(r"backbone\.layers\.2\.blocks\.(\d+)\.", key))})
    facts["architecture"] = None
    for name in REFERENCE_ARCHITECTURES:
        config = MODEL_SIZES[name]
        embed, depth = (192, 18) if config.backbone == "swin_large" else (96, 6)
        if (facts["text_context"], facts["background_queries"], facts["encoder_levels"], facts["swin_embed_dim"],
                facts["swin_stage3_depth"]) == (config.text_context, config.num_bg, config.num_levels, embed, depth):
            facts["architecture"] = name
    return facts


def config_from_reference(source: str | Path | Mapping) -> OpenSeeDConfig:
    """An ``OpenSeeDConfig`` computing what the reference computes for a reference config (a YAML file or its dict).

    Reads the sizes (Swin, encoder and decoder, queries, text tower), the evaluation resize and the detections per
    image; raises ``ConversionError`` naming the key for settings our model does not implement.
    """
    import yaml

    if isinstance(source, Mapping):
        cfg, where = source, "config"
    else:
        where = str(source)
        try:
            cfg = yaml.safe_load(Path(source).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"reference config not found: {source}") from None
        except yaml.YAMLError as err:
            raise ConversionError(f"{source}: not a readable YAML file: {err}") from err
    if not isinstance(cfg, Mapping):
        raise ConversionError(f"{where}: not a reference config (a mapping with a MODEL section)")

    def get(dotted: str, default=KeyError):
        node = cfg
        for part in dotted.split("."):
            if not isinstance(node, Mapping) or part not in node:
                if default is KeyError:
                    raise ConversionError(f"{where}: missing key {dotted}")
                return default
            node = node[part]
        return node

    def require(dotted: str, expected) -> None:
        value = get(dotted, None)
        if value != expected:
            raise ConversionError(f"{where}: {dotted} = {value!r} is not supported (openseed implements "
                                  f"{expected!r}, as the released configurations)")

    require("MODEL.BACKBONE.NAME", "swin")
    require("MODEL.TEXT.TOKENIZER", "clip")
    require("MODEL.TEXT.NAME", "transformer")
    require("MODEL.ENCODER.FEATURE_ORDER", "low2high")
    require("MODEL.DECODER.TWO_STAGE", True)
    require("MODEL.DECODER.INITIAL_PRED", True)
    require("MODEL.DECODER.LEARN_TGT", False)
    require("MODEL.DECODER.INITIALIZE_BOX_TYPE", "no")
    if not get("MODEL.TEXT.AUTOGRESSIVE", True):
        raise ConversionError(f"{where}: MODEL.TEXT.AUTOGRESSIVE = false is not supported (the causal tower is)")
    for key, expected in (("INPUT.PIXEL_MEAN", IMAGENET_MEAN), ("INPUT.PIXEL_STD", IMAGENET_STD)):
        value = get(key, list(expected))
        if [float(v) for v in value] != [float(v) for v in expected]:
            raise ConversionError(f"{where}: {key} = {value} differs from the ImageNet values openseed uses")
    hidden = int(get("MODEL.DECODER.HIDDEN_DIM"))
    if int(get("MODEL.ENCODER.CONVS_DIM")) != hidden:
        raise ConversionError(f"{where}: MODEL.ENCODER.CONVS_DIM ({get('MODEL.ENCODER.CONVS_DIM')}) must equal "
                              f"MODEL.DECODER.HIDDEN_DIM ({hidden}) (the decoder has no input projection)")
    decoder_name = get("MODEL.DECODER.NAME")
    if decoder_name not in ("openseed_decoder", "openseed_decoder_decouple"):
        raise ConversionError(f"{where}: MODEL.DECODER.NAME = {decoder_name!r} is not supported "
                              f"(openseed_decoder or openseed_decoder_decouple)")
    decoupled = decoder_name == "openseed_decoder_decouple"
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    features = tuple(sorted(get("MODEL.ENCODER.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"), key=strides.get))
    levels = int(get("MODEL.ENCODER.TOTAL_NUM_FEATURE_LEVELS"))
    base = MODEL_SIZES["swinl_decouple" if features[0] == "res2" else
                       "swint_decouple" if decoupled else "swint_nodecouple"]
    swin = get("MODEL.BACKBONE.SWIN")
    sizes = {"embed_dim": int(swin["EMBED_DIM"]), "depths": tuple(int(d) for d in swin["DEPTHS"]),
             "num_heads": tuple(int(h) for h in swin["NUM_HEADS"]), "window_size": int(swin["WINDOW_SIZE"])}
    named = {"swin_tiny": {"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "window_size": 7},
             "swin_large": {"embed_dim": 192, "depths": (2, 2, 18, 2), "num_heads": (6, 12, 24, 48),
                            "window_size": 12}}
    backbone = next((name for name, values in named.items() if values == sizes), "swin")
    queries = get("MODEL.DECODER.NUM_OBJECT_QUERIES_TEST", None) if decoupled else None
    return replace(
        base, backbone=backbone, backbone_options=None if backbone != "swin" else
        {k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()},
        drop_path_rate=float(swin.get("DROP_PATH_RATE", 0.3)), encoder_features=features, num_levels=levels,
        hidden_dim=hidden, encoder_layers=int(get("MODEL.ENCODER.TRANSFORMER_ENC_LAYERS")),
        decoder_layers=int(get("MODEL.DECODER.DEC_LAYERS")), num_heads=int(get("MODEL.DECODER.NHEADS")),
        ffn_dim=int(get("MODEL.DECODER.DIM_FEEDFORWARD")), mask_dim=int(get("MODEL.ENCODER.MASK_DIM")),
        num_fg=int(queries if queries is not None else get("MODEL.DECODER.NUM_OBJECT_QUERIES")),
        num_bg=int(get("MODEL.DECODER.NUM_QUERIES_STUFF", 100)) if decoupled else 0, decoupled=decoupled,
        text_dim=int(get("MODEL.DIM_PROJ")), text_context=int(get("MODEL.TEXT.CONTEXT_LENGTH")),
        text_width=int(get("MODEL.TEXT.WIDTH")), text_layers=int(get("MODEL.TEXT.LAYERS")),
        text_heads=int(get("MODEL.TEXT.HEADS")), cond_budget=int(get("MODEL.DECODER.DN_NUM", 100)),
        box_noise_scale=float(get("MODEL.DECODER.DN_NOISE_SCALE", 0.4)),
        eval_short_edge=int(get("COCO.INPUT.MIN_SIZE_TEST", 800)),
        eval_max_size=int(get("COCO.INPUT.MAX_SIZE_TEST", 1333)),
        test_top_k=int(get("COCO.TEST.DETECTIONS_PER_IMAGE", base.test_top_k)))


# ---------------------------------------------------------------------------------------------------- key map
def _fpn_reference_index(config: OpenSeeDConfig) -> Callable[[int], int]:
    """Our ``pixel_decoder.lateral.{k}`` (coarse to fine) -> the reference's ``adapter_{j}`` (j from 1 at res2)."""
    strides = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
    num_fpn = max(int(math.log2(strides[config.encoder_features[0]]) - 2), 1)
    return lambda j: num_fpn - j  # adapter_j <-> lateral.(num_fpn - j)


# one-to-one renames (backbone output norms, Swin patch merging, input projections and the FPN: ``_target_key``)
_SIMPLE: list[tuple[str, str]] = [
    # backbone
    (r"^backbone\.patch_embed\.(.+)$", r"backbone.encoder.patch_embed.\1"),
    (r"^backbone\.layers\.(\d+)\.blocks\.(.+)$", r"backbone.encoder.layers.\1.blocks.\2"),
    # pixel decoder
    (r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$", "pixel_decoder.level_embed"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)$",
     r"pixel_decoder.layers.\1.attention.\2"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.(norm1|norm2)\.(.+)$",
     r"pixel_decoder.layers.\1.\2.\3"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear1\.(.+)$",
     r"pixel_decoder.layers.\1.ffn.0.\2"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.linear2\.(.+)$",
     r"pixel_decoder.layers.\1.ffn.3.\2"),
    (r"^sem_seg_head\.pixel_decoder\.mask_features\.(weight|bias)$", r"pixel_decoder.mask_features.\1"),
    # decoder
    (r"^sem_seg_head\.predictor\.query_feat\.weight$", "decoder.bg_content.weight"),
    (r"^sem_seg_head\.predictor\.query_embed\.weight$", "decoder.bg_anchor.weight"),
    (r"^sem_seg_head\.predictor\.enc_output\.(weight|bias)$", r"decoder.enc_output.\1"),
    (r"^sem_seg_head\.predictor\.enc_output_norm\.(weight|bias)$", r"decoder.enc_norm.\1"),
    (r"^sem_seg_head\.predictor\.mask_embed\.layers\.(\d+)\.(weight|bias)$", r"decoder.mask_head.layers.\1.\2"),
    (r"^sem_seg_head\.predictor\.decoder_norm\.(weight|bias)$", r"decoder.norm.\1"),
    (r"^sem_seg_head\.predictor\.decoder\.ref_point_head\.layers\.(\d+)\.(weight|bias)$",
     r"decoder.ref_point_head.layers.\1.\2"),
    (r"^sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.(self_attn|cross_attn)\.(.+)$",
     r"decoder.layers.\1.\2.\3"),
    # the reference names its layer norms by position in the code (norm2 after self-attention, norm1 after
    # cross-attention); ours by their order in the layer
    (r"^sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.norm2\.(.+)$", r"decoder.layers.\1.norm1.\2"),
    (r"^sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.norm1\.(.+)$", r"decoder.layers.\1.norm2.\2"),
    (r"^sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.norm3\.(.+)$", r"decoder.layers.\1.norm3.\2"),
    (r"^sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.linear1\.(.+)$", r"decoder.layers.\1.ffn.0.\2"),
    (r"^sem_seg_head\.predictor\.decoder\.layers\.(\d+)\.linear2\.(.+)$", r"decoder.layers.\1.ffn.3.\2"),
    # text tower and classification
    (r"^sem_seg_head\.predictor\.lang_encoder\.lang_encoder\.(.+)$", r"text_encoder.tower.\1"),
    (r"^sem_seg_head\.predictor\.lang_encoder\.logit_scale$", "decoder.class_head.logit_scale"),
]
# reference [in, out] matrices applied as ``x @ W``; ours are nn.Linear weights [out, in]
_TRANSPOSED = {
    f"{PREDICTOR}class_embed": "decoder.class_head.project.weight",
    f"{PREDICTOR}lang_mapper": "decoder.cond_content.weight",
    f"{PREDICTOR}lang_encoder.lang_proj": "text_encoder.projection.weight",
}


def _target_key(key: str, config: OpenSeeDConfig) -> str | None:
    """Our key for a reference key that maps one to one (None: not such a key)."""
    if m := re.match(r"^backbone\.norm(\d)\.(weight|bias)$", key):
        return f"backbone.out_norms.res{int(m.group(1)) + 2}.{m.group(2)}"
    if m := re.match(r"^backbone\.layers\.(\d+)\.downsample\.(.+)$", key):
        # the Swin detection code merges patches at the end of a stage, timm at the start of the next one
        return f"backbone.encoder.layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    if m := re.match(rf"^{re.escape(ENCODER)}input_proj\.(\d+)\.([01])\.(weight|bias)$", key):
        index, encoder_levels = int(m.group(1)), len(config.encoder_features)
        if index < encoder_levels:
            return f"pixel_decoder.input_proj.{index}.{m.group(2)}.{m.group(3)}"
        return f"pixel_decoder.extra_proj.{index - encoder_levels}.{m.group(2)}.{m.group(3)}"
    if m := re.match(rf"^{re.escape(ENCODER)}(adapter|layer)_(\d+)\.(weight|norm\.weight|norm\.bias)$", key):
        k = _fpn_reference_index(config)(int(m.group(2)))
        part = {"weight": "0.weight", "norm.weight": "1.weight", "norm.bias": "1.bias"}[m.group(3)]
        return f"pixel_decoder.lateral.{k}.{part}" if m.group(1) == "adapter" else f"pixel_decoder.fpn_out.{k}.0.{part}"
    for pattern, replacement in _SIMPLE:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def map_reference_state_dict(state: Mapping[str, Tensor], config: OpenSeeDConfig,
                             target_shapes: Mapping[str, torch.Size]) -> tuple[dict[str, Tensor], ConversionReport]:
    """Map a reference state dict onto ours for a model built from ``config`` whose state dict has
    ``target_shapes``. Raises ``ConversionError`` listing unknown source keys, unfilled targets, shape mismatches and
    aliases that differ from the tensor they alias."""
    report = ConversionReport()
    out: dict[str, Tensor] = {}
    sources: dict[str, str] = {}  # target -> source key (for messages)
    unknown: list[str] = []
    box_copies: dict[str, list[tuple[str, Tensor]]] = {}
    norm_aliases: list[tuple[str, Tensor]] = []
    for key, value in state.items():
        reason = next((why for pattern, why in DROPPED.items() if re.match(pattern, key)), None)
        if reason is not None:
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            continue
        if m := _BOX_MLP.match(key):
            box_copies.setdefault(f"decoder.box_head.layers.{m.group(2)}.{m.group(3)}", []).append((key, value))
            continue
        if _DECODER_NORM_ALIAS.match(key):
            norm_aliases.append((key, value))
            continue
        if key in _TRANSPOSED:
            target, value = _TRANSPOSED[key], value.t()
            report.transposed.append(key.removeprefix(PREDICTOR))
        else:
            target = _target_key(key, config)
        if target is None:
            unknown.append(key)
            continue
        if target in sources:
            raise ConversionError(f"source keys {sources[target]} and {key} both map to {target}")
        sources[target], out[target] = key, value
    # shared tensors: one canonical copy, the others must equal it
    mismatched_aliases = []
    for target, copies in sorted(box_copies.items()):
        (first_key, first), *others = copies
        for key, value in others:
            if value.shape != first.shape or not (value is first or torch.equal(value, first)):
                mismatched_aliases.append(f"{key} != {first_key}")
        report.aliases += len(others)
        sources[target], out[target] = first_key, first
    for key, value in norm_aliases:
        canonical = key.replace(".decoder.norm.", ".decoder_norm.")
        if canonical not in state:
            unknown.append(key)
        elif value.shape != state[canonical].shape or not torch.equal(value, state[canonical]):
            mismatched_aliases.append(f"{key} != {canonical}")
        else:
            report.aliases += 1
    missing = sorted(set(target_shapes) - set(out))
    unexpected = sorted(f"{sources[t]} -> {t}" for t in set(out) - set(target_shapes))
    shapes = sorted(f"{sources[t]} -> {t}: file {tuple(v.shape)} vs model {tuple(target_shapes[t])}"
                    for t, v in out.items() if t in target_shapes and tuple(v.shape) != tuple(target_shapes[t]))
    if unknown or missing or unexpected or shapes or mismatched_aliases:
        raise ConversionError("the state dict does not fit the model:" + "".join(
            _listing(title, items) for title, items in (
                ("unknown source keys", sorted(unknown)),
                ("model tensors no source key fills", [f"{m} {tuple(target_shapes[m])}" for m in missing]),
                ("source keys mapped to tensors the model does not have", unexpected),
                ("shape mismatches", shapes),
                ("aliases of a shared tensor that differ from it", mismatched_aliases))))
    for target, value in out.items():
        if value.is_floating_point() and value.dtype != torch.float32:
            out[target] = value.float()
            report.cast.append(target)
        else:
            out[target] = value.contiguous()
    report.written = len(out)
    return out, report


def _listing(title: str, items: list[str], limit: int = 30) -> str:
    if not items:
        return ""
    more = f"\n    ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {len(items)} {title}:\n    " + "\n    ".join(items[:limit]) + more
