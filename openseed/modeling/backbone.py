"""Image encoders built with timm that return multi-scale NCHW feature maps at strides 4, 8, 16, 32.

``build_backbone(name)`` makes one of the named configurations in ``BACKBONES`` and wraps it in ``Backbone``, whose
forward maps normalised images ``[B, 3, H, W]`` (H, W multiples of 32) to ``{"res2": [B, C2, H/4, W/4], "res3":
[B, C3, H/8, W/8], "res4": [B, C4, H/16, W/16], "res5": [B, C5, H/32, W/32]}``.

Swin is set up as in the Swin detection code that OpenSeeD (through Mask2Former's ``D2SwinTransformer``) uses: any
input size, every other block shifted even when a map is smaller than a window, maps padded to whole windows *before*
the cyclic shift, and a LayerNorm on each output (FocalNet gets the output LayerNorms too, as in X-Decoder/OpenSeeD).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from timm.layers import LayerNorm2d
from timm.models import focalnet, swin_transformer
from timm.models.focalnet import FocalNet
from timm.models.resnet import BasicBlock, ResNet
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

FEATURE_NAMES = ("res2", "res3", "res4", "res5")


@dataclass(frozen=True)
class _Family:
    """How to take the four feature maps out of one kind of timm model.

    Attributes:
        indices: ``forward_intermediates`` indices of res2..res5.
        stem: names of the stem's submodules (frozen from ``freeze_at=1``).
        stages: names of the res2..res5 stage modules.
        checkpoint_filter: timm's converter of original-repo checkpoints to timm names, or None.
        out_norm: put a LayerNorm (over channels) on every output.
    """

    indices: tuple[int, ...]
    stem: tuple[str, ...]
    stages: tuple[str, ...]
    checkpoint_filter: Callable[[dict, nn.Module], dict] | None
    out_norm: bool


_TRANSFORMER_STAGES = ("layers.0", "layers.1", "layers.2", "layers.3")
_FAMILIES: dict[type[nn.Module], _Family] = {
    SwinTransformer: _Family((0, 1, 2, 3), ("patch_embed",), _TRANSFORMER_STAGES,
                             swin_transformer.checkpoint_filter_fn, out_norm=True),
    FocalNet: _Family((0, 1, 2, 3), ("stem",), _TRANSFORMER_STAGES, focalnet.checkpoint_filter_fn, out_norm=True),
    ResNet: _Family((1, 2, 3, 4), ("conv1", "bn1"), ("layer1", "layer2", "layer3", "layer4"), None, out_norm=False),
}


class _PadThenShiftSwinBlock(SwinTransformerBlock):
    """timm's Swin block with the original (detection) order of padding and cyclic shift.

    timm rolls the unpadded map and then pads it to whole windows, while the shifted-window mask assumes the padded map
    was rolled; when H (or W) is not a multiple of the window the image's last rows then share a mask region with its
    first rows and attend to them across the wrap-around. Here the map is padded first and the padded map is rolled, so
    the mask matches (same as the Swin-Transformer-Object-Detection code). Works for any H, W.
    """

    def _attn(self, x: Tensor) -> Tensor:
        """x: [B, H, W, C] (after norm1) -> window attention output [B, H, W, C]."""
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
        padded_h, padded_w = x.shape[1], x.shape[2]
        shifted = any(self.shift_size)
        mask = None
        if shifted:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            mask = self.get_attn_mask(x)  # regions of the rolled, padded map: [num_windows, win_h*win_w, win_h*win_w]
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if shifted:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class Backbone(nn.Module):
    """A timm image encoder returning the res2..res5 feature maps, NCHW.

    The wrapped timm classification model loses its classifier head and final norm. Its parameters keep timm's names
    under ``encoder.`` (so timm checkpoints load, see ``load_weights``); the output LayerNorms (Swin, FocalNet; new,
    not in any ImageNet checkpoint) are ``out_norms.res2`` .. ``out_norms.res5``.

    Args:
        encoder: a timm ``SwinTransformer``, ``FocalNet`` or ``ResNet``. A Swin should be made with
            ``strict_img_size=False, always_partition=True`` (as the ``BACKBONES`` builders do) to take any size.
        freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 freezes the stem and res2..res{k} (detectron2's
            convention; 5 freezes the whole encoder). Frozen parts get ``requires_grad=False`` and stay in eval mode
            (BatchNorm statistics, stochastic depth). The output norms stay trainable.

    Attributes:
        channels: {"res2": C2, ..., "res5": C5}.
        strides: {"res2": 4, "res3": 8, "res4": 16, "res5": 32}.
    """

    size_divisibility = 32

    def __init__(self, encoder: nn.Module, freeze_at: int = 0) -> None:
        super().__init__()
        family = _FAMILIES.get(type(encoder))
        if family is None:
            raise TypeError(f"unsupported timm model {type(encoder).__name__}; supported: "
                            f"{[cls.__name__ for cls in _FAMILIES]}")
        if not 0 <= freeze_at <= len(FEATURE_NAMES) + 1:
            raise ValueError(f"freeze_at must be in 0..{len(FEATURE_NAMES) + 1}, got {freeze_at}")
        if isinstance(encoder, SwinTransformer):
            for block in encoder.modules():
                if type(block) is SwinTransformerBlock:
                    block.__class__ = _PadThenShiftSwinBlock
        full_keys = set(encoder.state_dict())
        encoder.prune_intermediate_layers(list(family.indices), prune_norm=True, prune_head=True)
        self.encoder = encoder
        self._family = family
        # checkpoint entries of the removed head / final norm, ignored when loading weights
        self._discarded_keys = frozenset(full_keys - set(encoder.state_dict()))
        info = [encoder.feature_info[i] for i in family.indices]
        self.channels = {name: int(f["num_chs"]) for name, f in zip(FEATURE_NAMES, info)}
        self.strides = {name: int(f["reduction"]) for name, f in zip(FEATURE_NAMES, info)}
        if list(self.strides.values()) != [4, 8, 16, 32]:
            raise ValueError(f"{type(encoder).__name__} feature strides are {self.strides}, expected 4, 8, 16, 32")
        self.out_norms = nn.ModuleDict({
            name: LayerNorm2d(channels, eps=1e-5) if family.out_norm else nn.Identity()
            for name, channels in self.channels.items()
        })
        self._frozen = (family.stem + family.stages[:freeze_at - 1]) if freeze_at else ()
        for name in self._frozen:
            encoder.get_submodule(name).requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode; frozen stages always stay in eval mode."""
        super().train(mode)
        for name in self._frozen:
            self.encoder.get_submodule(name).eval()
        return self

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images: [B, 3, H, W] normalised, H and W multiples of 32 -> {"res{k}": [B, channels, H/s, W/s]} (s = 2^k)."""
        step = self.size_divisibility
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2] % step or images.shape[-1] % step:
            raise ValueError(f"expected images [B, 3, H, W] with H and W multiples of {step}, "
                             f"got {tuple(images.shape)}")
        features = self.encoder.forward_intermediates(images, indices=list(self._family.indices),
                                                      intermediates_only=True)
        return {name: self.out_norms[name](feature).contiguous() for name, feature in zip(FEATURE_NAMES, features)}

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load encoder weights from a local checkpoint file, strictly.

        The file is a timm or torchvision state dict (``.safetensors``, or anything ``torch.load(weights_only=True)``
        reads), possibly nested under "model" / "state_dict"; original Swin / FocalNet repo checkpoints are converted by
        timm's filters. Classifier head and final-norm entries are ignored; any other missing or unexpected key, or a
        shape mismatch, raises a RuntimeError listing them and leaves the weights unchanged.
        """
        state = _read_state_dict(Path(path))
        if self._family.checkpoint_filter is not None:
            try:
                state = self._family.checkpoint_filter(state, self.encoder)
            except AttributeError as err:  # e.g. a position-bias table of a block this model does not have
                raise RuntimeError(f"checkpoint {path} does not match the {type(self.encoder).__name__} backbone: "
                                   f"{err}") from err
        target = self.encoder.state_dict()
        optional = {key for key in target if key.endswith("num_batches_tracked")}  # absent from old torchvision files
        missing = sorted(set(target) - set(state) - optional)
        unexpected = sorted(set(state) - set(target) - self._discarded_keys)
        mismatched = sorted(f"{key}: file {tuple(value.shape)} vs model {tuple(target[key].shape)}"
                            for key, value in state.items() if key in target and value.shape != target[key].shape)
        if missing or unexpected or mismatched:
            raise RuntimeError(f"checkpoint {path} does not match the {type(self.encoder).__name__} backbone:"
                               f"{_listing('missing keys', missing)}{_listing('unexpected keys', unexpected)}"
                               f"{_listing('shape mismatches', mismatched)}")
        self.encoder.load_state_dict({key: value for key, value in state.items() if key in target}, strict=False)


def _listing(title: str, items: list[str], limit: int = 40) -> str:
    if not items:
        return ""
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"\n  {len(items)} {title}: {', '.join(items[:limit])}{more}"


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a checkpoint file, unwrapped from a "model" / "state_dict" entry if nested."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained backbone weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_safetensors(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(value, Tensor) for value in state.values()):
        raise ValueError(f"{path} is not a state dict (name -> tensor), nor one nested under 'model'/'state_dict'")
    return dict(state)


def _create_timm(model_name: str, pretrained: bool, **kwargs) -> nn.Module:
    """timm.create_model, turning a failed weight download into a RuntimeError that says how to supply the weights."""
    if not pretrained:
        return timm.create_model(model_name, **kwargs)
    try:
        return timm.create_model(model_name, pretrained=True, **kwargs)
    except OSError as err:  # no network and no cached copy (huggingface_hub / urllib errors are OSErrors)
        cfg = timm.models.get_pretrained_cfg(model_name)
        source = f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else cfg.url
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RuntimeError(
            f"pretrained weights for timm model '{model_name}' could not be fetched ({reason}). Supply them "
            f"without network: set `pretrained` to a local checkpoint file (a timm or torchvision state dict, "
            f".pth / .bin / .safetensors, e.g. downloaded from {source}), or fill the timm weight cache (Hugging Face "
            f"hub cache under HF_HOME, or the torch hub cache under TORCH_HOME) with these weights on a machine with "
            f"network access and point HF_HOME / TORCH_HOME at it."
        ) from err


_SWIN_ANY_SIZE = {"strict_img_size": False, "always_partition": True}


def _timm_builder(model_name: str, default_drop_path_rate: float | None,
                  **kwargs) -> Callable[[bool, float | None], nn.Module]:
    """A builder (pretrained, drop_path_rate) -> timm model for a named timm model with fixed extra arguments."""

    def build(pretrained: bool = False, drop_path_rate: float | None = None) -> nn.Module:
        rate = default_drop_path_rate if drop_path_rate is None else drop_path_rate
        extra = {} if rate is None else {"drop_path_rate": rate}
        return _create_timm(model_name, pretrained, **kwargs, **extra)

    return build


def _build_tiny(pretrained: bool = False, drop_path_rate: float | None = None) -> nn.Module:
    """A 3.2M-parameter Swin (embed 48, depths 1-1-2-1, window 7) for CPU tests and experiments; no weights exist."""
    if pretrained:
        raise ValueError("backbone 'tiny' has no pretrained weights; use pretrained=False or a local checkpoint path")
    return SwinTransformer(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16), window_size=7,
                           drop_path_rate=0.1 if drop_path_rate is None else drop_path_rate, **_SWIN_ANY_SIZE)


def _build_swin(pretrained: bool = False, drop_path_rate: float | None = None, embed_dim: int = 96,
                depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                window_size: int = 7) -> nn.Module:
    """A Swin of any size (e.g. the reference's small test models: embed 32, depths 1-1-2-1); no weights exist for
    arbitrary sizes: they come from a converted checkpoint."""
    if pretrained:
        raise ValueError("backbone 'swin' (custom sizes) has no published weights; use swin_tiny / swin_large, or "
                         "pretrained=False and load a converted checkpoint")
    return SwinTransformer(embed_dim=int(embed_dim), depths=tuple(depths), num_heads=tuple(num_heads),
                           window_size=int(window_size), drop_path_rate=0.3 if drop_path_rate is None else
                           drop_path_rate, **_SWIN_ANY_SIZE)


def _build_tiny_resnet(pretrained: bool = False, drop_path_rate: float | None = None) -> nn.Module:
    """A 1.2M-parameter ResNet (basic blocks 1-1-1-1, widths 32-64-128-256, deep stem) that learns fast from scratch:
    the CPU default's backbone (a small Swin needs far more data and steps without pretrained weights)."""
    if pretrained:
        raise ValueError("backbone 'tiny_resnet' has no pretrained weights; use pretrained=False or a local checkpoint")
    return ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(32, 64, 128, 256), stem_width=16, stem_type="deep",
                  num_classes=0, drop_path_rate=drop_path_rate or 0.0)


# name -> builder(pretrained: bool, drop_path_rate: float | None, **options) returning the timm classification model
# (only "swin" takes options: its sizes).
# Weight tags follow the OpenSeeD paper: Swin-T ImageNet-1k, Swin-L ImageNet-22k (384, window 12), Focal-T =
# FocalNet-T (LRF: focal levels 3, as X-Decoder's Focal-T), ResNet-50 with the classic torchvision weights.
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "swin_tiny": _timm_builder("swin_tiny_patch4_window7_224.ms_in1k", 0.3, **_SWIN_ANY_SIZE),
    "swin_large": _timm_builder("swin_large_patch4_window12_384.ms_in22k", 0.3, **_SWIN_ANY_SIZE),
    "focal_tiny": _timm_builder("focalnet_tiny_lrf.ms_in1k", 0.3),
    "resnet50": _timm_builder("resnet50.tv_in1k", None),
    "swin": _build_swin,
    "tiny": _build_tiny,
    "tiny_resnet": _build_tiny_resnet,
}


def build_backbone(name: str, pretrained: bool | str | os.PathLike | None = False, drop_path_rate: float | None = None,
                   freeze_at: int = 0, options: Mapping | None = None) -> Backbone:
    """Build a named backbone.

    Args:
        name: a key of ``BACKBONES``.
        pretrained: False (or None) for random weights; True to load the published weights through timm
            (RuntimeError with instructions when they cannot be fetched); or a local checkpoint path (see
            ``Backbone.load_weights``).
        drop_path_rate: stochastic depth rate; None keeps the configuration's default (0.3 for the transformers).
        freeze_at: see ``Backbone``.
        options: sizes for the "swin" builder (embed_dim, depths, num_heads, window_size); no other backbone takes
            options.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    options = dict(options or {})
    if options and name != "swin":
        raise ValueError(f"backbone {name!r} takes no options (got {sorted(options)}); only 'swin' has sizes")
    known = {"embed_dim", "depths", "num_heads", "window_size"}
    if set(options) - known:
        raise ValueError(f"unknown swin option(s) {sorted(set(options) - known)}; known: {sorted(known)}")
    from_file = pretrained is not None and not isinstance(pretrained, bool)
    backbone = Backbone(BACKBONES[name](pretrained=pretrained is True, drop_path_rate=drop_path_rate, **options),
                        freeze_at=freeze_at)
    if from_file:
        backbone.load_weights(pretrained)
    return backbone
