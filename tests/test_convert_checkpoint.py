"""The converter: the released architectures' full state-dict layouts (../shared/reference/manifests) convert and load
strictly into the full-size presets; anything that does not fit is an error that names it."""

from __future__ import annotations

import json

import pytest
import torch

from openseed.convert_checkpoint import convert, main, target_shapes
from openseed.modeling.openseed import MODEL_SIZES, build_openseed
from openseed.modeling.reference import (
    REFERENCE_ARCHITECTURES,
    ConversionError,
    describe_state_dict,
    map_reference_state_dict,
    read_state_dict,
)
from tests._reference import reference_path

_DTYPES = {"float32": torch.float32, "int64": torch.int64, "float16": torch.float16}


def manifest_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """A state dict with the layout of ``manifests/<arch>.json``: zeros of each shape; aliases share one tensor, as in
    a state dict saved from the reference's module tree."""
    manifest = json.loads(reference_path("manifests", f"{arch}.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for entry in manifest["tensors"]:
        alias = entry.get("alias_of")
        state[entry["key"]] = state[alias] if alias else torch.zeros(entry["shape"], dtype=_DTYPES[entry["dtype"]])
    assert len(state) == manifest["num_tensors"]
    return state


@pytest.fixture(scope="module")
def swint_manifest() -> dict[str, torch.Tensor]:
    return manifest_state_dict("swint_decouple")


@pytest.mark.parametrize("arch", REFERENCE_ARCHITECTURES)
def test_manifest_converts_and_loads_strictly_into_the_full_size_preset(arch):
    state = manifest_state_dict(arch)
    assert describe_state_dict(state)["architecture"] == arch
    config = MODEL_SIZES[arch]
    mapped, report = map_reference_state_dict(state, config, target_shapes(config))
    manifest = json.loads(reference_path("manifests", f"{arch}.json").read_text())
    aliases = sum("alias_of" in entry for entry in manifest["tensors"])
    dropped = sum(report.dropped.values())
    # every source key is accounted for: written, dropped with a reason, or an alias checked equal
    assert report.written + dropped + report.aliases == len(state)
    assert report.aliases == aliases and dropped == len(manifest["buffers_in_state_dict"])
    with torch.device("meta"):
        model = build_openseed(arch)
    model.load_state_dict(mapped, strict=True, assign=True)  # raises on any missing / unexpected key or shape
    # parameter count: the reference's unique tensors minus its buffers equal ours
    ours = sum(v.numel() for v in model.state_dict().values())
    buffers = sum(v.numel() for k, v in state.items() if k in set(manifest["buffers_in_state_dict"]))
    assert ours == manifest["num_unique_elements"] - buffers


def _convert(state, arch="swint_decouple"):
    config = MODEL_SIZES[arch]
    return map_reference_state_dict(state, config, target_shapes(config))


def test_a_missing_key_fails_naming_it(swint_manifest):
    state = dict(swint_manifest)
    del state["sem_seg_head.predictor.enc_output.bias"]
    with pytest.raises(ConversionError, match=r"1 model tensors no source key fills:\s+decoder\.enc_output\.bias"):
        _convert(state)


def test_an_extra_key_fails_naming_it(swint_manifest):
    state = dict(swint_manifest) | {"sem_seg_head.predictor.new_head.weight": torch.zeros(3)}
    with pytest.raises(ConversionError, match=r"1 unknown source keys:\s+sem_seg_head\.predictor\.new_head\.weight"):
        _convert(state)


def test_a_wrong_shape_fails_naming_it(swint_manifest):
    state = dict(swint_manifest) | {"sem_seg_head.pixel_decoder.transformer.level_embed": torch.zeros(5, 256)}
    with pytest.raises(ConversionError, match=r"shape mismatches:\s+sem_seg_head\.pixel_decoder\.transformer\."
                                              r"level_embed -> pixel_decoder\.level_embed: file \(5, 256\) vs model "
                                              r"\(4, 256\)"):
        _convert(state)


def test_a_text_context_of_18_is_never_dropped_into_77(swint_manifest):
    key = "sem_seg_head.predictor.lang_encoder.lang_encoder.positional_embedding"
    state = dict(swint_manifest) | {key: torch.zeros(18, 512)}
    with pytest.raises(ConversionError, match=r"positional_embedding -> text_encoder\.tower\.positional_embedding: "
                                              r"file \(18, 512\) vs model \(77, 512\)"):
        _convert(state)


def test_differing_copies_of_the_shared_box_mlp_fail(swint_manifest):
    state = dict(swint_manifest)
    state["sem_seg_head.predictor.bbox_embed.3.layers.2.bias"] = torch.ones(4)
    with pytest.raises(ConversionError, match=r"aliases of a shared tensor that differ from it:\s+sem_seg_head\."
                                              r"predictor\.bbox_embed\.3\.layers\.2\.bias"):
        _convert(state)


def test_the_wrong_arch_is_a_clear_error(tmp_path, capsys):
    source = tmp_path / "swint_51.2ap.pt"
    torch.save({"model": manifest_state_dict("swint_nodecouple")}, source)  # nested, as some releases are
    assert main([f"source={source}", "arch=swint_decouple", f"out={tmp_path / 'out.pt'}"]) == 2
    error = capsys.readouterr().err
    assert "holds a swint_nodecouple model (text context 18, 0 background queries" in error
    assert "use arch=swint_nodecouple" in error
    assert not (tmp_path / "out.pt").exists()


def test_unsafe_and_unreadable_files_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"model": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ConversionError, match="refuses"):
        read_state_dict(tmp_path / "unsafe.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "empty.pt")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not a state dict"):
        read_state_dict(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "missing.pt", tmp_path / "out.pt", arch="swint_decouple")


def test_prefixed_keys_are_accepted(tmp_path):
    state = {"model.backbone.norm0.weight": torch.ones(2), "model.criterion.empty_weight": torch.ones(3)}
    torch.save(state, tmp_path / "prefixed.pt")
    assert set(read_state_dict(tmp_path / "prefixed.pt")) == {"backbone.norm0.weight", "criterion.empty_weight"}
