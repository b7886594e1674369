"""Backbones: shapes and strides at any size, parameter counts, weight loading, freezing, Swin's shifted windows."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock

from openseed.modeling import backbone as backbone_module
from openseed.modeling.backbone import BACKBONES, FEATURE_NAMES, Backbone, build_backbone

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
CHANNELS = {
    "swin_tiny": (96, 192, 384, 768),
    "swin_large": (192, 384, 768, 1536),
    "swin": (96, 192, 384, 768),  # custom sizes; Swin-T's by default
    "focal_tiny": (96, 192, 384, 768),
    "resnet50": (256, 512, 1024, 2048),
    "tiny": (48, 96, 192, 384),
    "tiny_resnet": (32, 64, 128, 256),
}
# the whole backbone: encoder without classifier head / final norm, plus the output LayerNorms
PARAMS = {"swin_tiny": 27.52e6, "swin_large": 195.2e6, "focal_tiny": 27.88e6, "resnet50": 23.51e6,
          "tiny_resnet": 1.23e6}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_features(features: dict[str, torch.Tensor], name: str, batch: int, height: int, width: int) -> None:
    assert list(features) == list(FEATURE_NAMES)
    for key, channels in zip(FEATURE_NAMES, CHANNELS[name]):
        stride = STRIDES[key]
        assert features[key].shape == (batch, channels, height // stride, width // stride), (name, key)
        assert features[key].is_contiguous()  # NCHW, not a permuted NHWC view
        assert torch.isfinite(features[key]).all()


@pytest.fixture(scope="module")
def built() -> dict[str, Backbone]:
    torch.manual_seed(0)
    return {name: build_backbone(name).eval() for name in BACKBONES}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_builds_with_strides_channels_and_size(built, name):
    model = built[name]
    assert model.strides == STRIDES
    assert model.channels == dict(zip(FEATURE_NAMES, CHANNELS[name]))
    height, width = (64, 96) if name == "swin_large" else (128, 96)
    with torch.no_grad():
        _check_features(model(torch.randn(2, 3, height, width)), name, 2, height, width)
    if name in PARAMS:
        assert _count(model) == pytest.approx(PARAMS[name], rel=0.02)


@pytest.mark.parametrize("name, sizes", [
    ("tiny", [(160, 224), (160, 160), (256, 192), (1024, 1024)]),
    ("swin_tiny", [(160, 224)]),
    ("swin_large", [(96, 160)]),
])
def test_swin_takes_any_multiple_of_32(built, name, sizes):
    """Sizes that are multiples of 32 but not of window * 32 (window 7 or 12): padded windows, shifted masks."""
    for height, width in sizes:
        with torch.no_grad():
            _check_features(built[name](torch.randn(1, 3, height, width)), name, 1, height, width)


def test_custom_swin_sizes_and_option_errors():
    """The reference's small test models' Swin (embed 32, depths 1-1-2-1, heads 1-2-4-8, window 12)."""
    model = build_backbone("swin", options={"embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8],
                                            "window_size": 12})
    assert model.channels == dict(zip(FEATURE_NAMES, (32, 64, 128, 256)))
    assert model.encoder.layers[2].blocks[1].attn.relative_position_bias_table.shape == (23 * 23, 4)
    with pytest.raises(ValueError, match="takes no options"):
        build_backbone("swin_tiny", options={"window_size": 12})
    with pytest.raises(ValueError, match=r"unknown swin option\(s\) \['mlp_ratio'\]"):
        build_backbone("swin", options={"mlp_ratio": 2})


def test_rejects_sizes_not_multiple_of_32(built):
    with pytest.raises(ValueError, match="multiples of 32"):
        built["tiny"](torch.randn(1, 3, 100, 96))


def test_shifted_windows_do_not_wrap_around(built):
    """A shifted block pads to whole windows before rolling, so the last rows never see the first ones."""
    block = built["tiny"].encoder.layers[2].blocks[1]
    assert block.shift_size == (3, 3) and block.window_size == (7, 7)
    # shifted even where the pretraining map (7x7 at 224) is no larger than a window, as in Swin's detection code
    assert built["swin_tiny"].encoder.layers[3].blocks[1].shift_size == (3, 3)
    assert built["swin_large"].encoder.layers[3].blocks[1].shift_size == (6, 6)
    for size in (5, 12, 13):  # maps that are not a multiple of the window
        x = torch.randn(1, size, size, block.dim, requires_grad=True)
        block(x)[0, 0, 0].sum().backward()
        influence = x.grad[0].abs().sum(-1)
        assert influence[0, 0] > 0
        assert influence[size - 1].sum() == 0 and influence[:, size - 1].sum() == 0
    # identical to timm's block where no padding is needed
    timm_block = copy.deepcopy(block)
    timm_block.__class__ = SwinTransformerBlock
    x = torch.randn(2, 14, 21, block.dim)
    with torch.no_grad():
        torch.testing.assert_close(block(x), timm_block(x))


def test_drop_path_rate_default_and_override(built):
    assert built["swin_tiny"].encoder.layers[3].blocks[1].drop_path1.drop_prob == pytest.approx(0.3)
    model = build_backbone("tiny", drop_path_rate=0.0)
    assert not any(type(m).__name__ == "DropPath" for m in model.modules())


def test_tiny_is_small_and_every_parameter_gets_a_gradient():
    """(Its speed is a benchmark's: experiments/model_profile.)"""
    torch.manual_seed(0)
    model = build_backbone("tiny").train()
    assert _count(model) < 5e6
    sum(f.square().mean() for f in model(torch.randn(2, 3, 64, 64)).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())  # none unused (DDP-safe)


def _tiny_timm_swin() -> SwinTransformer:
    """A full timm classification Swin with the 'tiny' configuration, as someone would save it."""
    return SwinTransformer(embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16), window_size=7)


def _assert_loaded(model: Backbone, reference: dict[str, torch.Tensor]) -> None:
    loaded = model.encoder.state_dict()
    assert set(loaded) <= set(reference)
    for key, value in loaded.items():
        assert torch.equal(value, reference[key]), key


def test_pretrained_file_round_trip_nested_pth(tmp_path):
    torch.manual_seed(1)
    reference = _tiny_timm_swin().state_dict()
    path = tmp_path / "tiny.pth"
    torch.save({"model": reference, "epoch": 3}, path)
    _assert_loaded(build_backbone("tiny", pretrained=str(path)), reference)


def test_pretrained_file_round_trip_resnet_safetensors(tmp_path):
    torch.manual_seed(2)
    reference = timm.create_model("resnet50").state_dict()
    path = tmp_path / "resnet50.safetensors"
    save_file(reference, path)
    model = build_backbone("resnet50", pretrained=path)
    _assert_loaded(model, reference)
    headless = tmp_path / "resnet50_headless.pth"  # a saved backbone encoder: no fc, no num_batches_tracked
    torch.save({"state_dict": {k: v for k, v in model.encoder.state_dict().items()
                               if not k.endswith("num_batches_tracked")}}, headless)
    _assert_loaded(build_backbone("resnet50", pretrained=headless), reference)


def test_pretrained_original_swin_checkpoint_is_converted(tmp_path):
    """Original Swin repo layout (patch merging at the end of a stage, ``head.weight``) goes through timm's filter."""
    torch.manual_seed(3)
    reference = _tiny_timm_swin().state_dict()
    original = {}
    for key, value in reference.items():
        for stage in (1, 2, 3):
            key = key.replace(f"layers.{stage}.downsample", f"layers.{stage - 1}.downsample")
        original[key.replace("head.fc.", "head.")] = value
    assert "layers.0.downsample.reduction.weight" in original
    path = tmp_path / "swin_original.pth"
    torch.save({"model": original}, path)
    _assert_loaded(build_backbone("tiny", pretrained=path), reference)


def test_pretrained_file_with_wrong_keys_raises_listing_them(tmp_path):
    state = _tiny_timm_swin().state_dict()
    del state["layers.2.blocks.1.mlp.fc1.weight"]
    state["layers.9.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="missing keys") as info:
        build_backbone("tiny", pretrained=path)
    assert "layers.2.blocks.1.mlp.fc1.weight" in str(info.value) and "layers.9.extra" in str(info.value)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        torch.save(timm.create_model("resnet18").state_dict(), path)
        build_backbone("resnet50", pretrained=path)


def test_pretrained_missing_file_raises(tmp_path):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_backbone("resnet50", pretrained=str(path))


def test_pretrained_download_failure_raises_with_guidance(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(RuntimeError, match="could not be fetched") as info:
        build_backbone("swin_tiny", pretrained=True)
    message = str(info.value)
    assert "local checkpoint file" in message and "HF_HOME" in message
    assert "swin_tiny_patch4_window7_224" in message


def test_tiny_has_no_published_weights_and_unknown_names_are_listed():
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("tiny", pretrained=True)
    with pytest.raises(ValueError, match="swin_tiny") as info:
        build_backbone("swin_huge")
    assert all(name in str(info.value) for name in BACKBONES)


@pytest.mark.parametrize("freeze_at, frozen", [
    (0, []),
    (1, ["patch_embed"]),
    (3, ["patch_embed", "layers.0", "layers.1"]),
    (5, ["patch_embed", "layers.0", "layers.1", "layers.2", "layers.3"]),
])
def test_freeze_at_swin(freeze_at, frozen):
    model = build_backbone("tiny", freeze_at=freeze_at).train()
    for name, param in model.named_parameters():
        inside = any(name.startswith(f"encoder.{prefix}.") for prefix in frozen)
        assert param.requires_grad != inside, name
    for prefix in frozen:
        assert not model.encoder.get_submodule(prefix).training
    assert all(m.training for name, m in model.out_norms.items())


def test_freeze_at_resnet_keeps_frozen_batchnorm_in_eval():
    model = build_backbone("resnet50", freeze_at=2).train()
    frozen = ("encoder.conv1.", "encoder.bn1.", "encoder.layer1.")
    for name, param in model.named_parameters():
        assert param.requires_grad != name.startswith(frozen), name
    assert not model.encoder.bn1.training and not model.encoder.layer1[0].bn1.training
    assert model.encoder.layer2[0].bn1.training
    running = model.encoder.layer1[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.encoder.layer1[0].bn1.running_mean, running)
    with pytest.raises(ValueError, match="freeze_at"):
        build_backbone("tiny", freeze_at=6)


def test_module_imports_no_training_framework():
    tree = ast.parse(Path(backbone_module.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name.split(".")[0] for name in imported} & {"lightning", "pytorch_lightning", "hydra", "webdataset"}
