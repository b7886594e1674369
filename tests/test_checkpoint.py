"""Model files and training checkpoints load strictly: same weights back, or an error that lists the keys."""

import json
from dataclasses import asdict

import pytest
import torch

from openseed.modeling.checkpoint import save_model
from openseed.modeling.openseed import build_openseed, load_model


def test_round_trip_and_overrides(tmp_path):
    torch.manual_seed(0)
    model = build_openseed("tiny", decoupled=False)
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.config.decoupled is False and loaded.decoder.num_bg == 0
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_lightning_checkpoint_layout(tmp_path):
    torch.manual_seed(0)
    model = build_openseed("tiny")
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()} | {"criterion.x": torch.ones(1)},
                "hyper_parameters": {"model_config": asdict(model.config)}}, tmp_path / "last.ckpt")
    loaded = load_model(tmp_path / "last.ckpt")
    assert torch.equal(loaded.decoder.class_head.bias, model.decoder.class_head.bias)


def test_mismatched_weights_fail_loudly(tmp_path):
    model = build_openseed("tiny")
    state = model.state_dict()
    state.pop("decoder.class_head.bias")
    state["decoder.extra"] = torch.zeros(1)
    torch.save({"format": "openseed-model", "version": 1, "config": asdict(model.config), "state_dict": state},
               tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match=r"missing \['decoder.class_head.bias'\].*unexpected \['decoder.extra'\]"):
        load_model(tmp_path / "bad.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an openseed model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "none.pt")


def test_model_file_is_safetensors_with_json_config(tmp_path):
    """A model file holds tensors and a JSON config only: no pickle, so nothing in it can run on load."""
    from safetensors import safe_open

    from openseed.modeling.checkpoint import is_safetensors
    from openseed.modeling.openseed import read_model_config

    model = build_openseed("tiny", num_fg=7)
    save_model(model, tmp_path / "m.safetensors")
    assert is_safetensors(tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
        assert set(handle.keys()) == set(model.state_dict())
    assert meta["format"] == "openseed-model" and meta["version"] == "2"
    assert json.loads(meta["config"])["num_fg"] == 7
    assert read_model_config(tmp_path / "m.safetensors").num_fg == 7
    assert not list(tmp_path.glob(".*partial"))  # the temporary beside the target is gone


def test_unsafe_old_model_file_is_refused_and_safe_one_converts(tmp_path):
    """A pickled (version-1) model file whose pickle would run code is refused before anything runs; a plain one is
    read with weights_only and re-written as a safetensors model file by the documented command."""
    from openseed.convert_checkpoint import main

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    model = build_openseed("tiny")
    torch.save({"format": "openseed-model", "version": 1, "config": asdict(model.config),
                "state_dict": model.state_dict(), "extra": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ValueError, match="unsafe load"):
        load_model(tmp_path / "unsafe.pt")
    assert not ran.exists()
    torch.save({"format": "openseed-model", "version": 1, "config": asdict(model.config),
                "state_dict": model.state_dict()}, tmp_path / "old.pt")
    assert main([f"source={tmp_path / 'old.pt'}", f"out={tmp_path / 'new.safetensors'}"]) == 0
    loaded = load_model(tmp_path / "new.safetensors")
    assert torch.equal(loaded.decoder.class_head.bias, model.decoder.class_head.bias)
    assert main([f"source={tmp_path / 'unsafe.pt'}", f"out={tmp_path / 'x.safetensors'}"]) == 2
    assert not ran.exists() and not (tmp_path / "x.safetensors").exists()


def test_damaged_model_files_name_the_file(tmp_path):
    model = build_openseed("tiny")
    save_model(model, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.pt: not a readable PyTorch checkpoint"):
        load_model(tmp_path / "empty.pt")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="without openseed's model metadata"):
        load_model(tmp_path / "bare.safetensors")
