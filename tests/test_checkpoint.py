"""Model files and training checkpoints load strictly: same weights back, or an error that lists the keys."""

import pytest
import torch

from openseed.modeling.checkpoint import load_model, save_model
from openseed.modeling.openseed import build_openseed


def test_round_trip_and_overrides(tmp_path):
    torch.manual_seed(0)
    model = build_openseed("tiny", decoupled=False)
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert loaded.config["decoupled"] is False and loaded.decoder.num_bg == 0
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_lightning_checkpoint_layout(tmp_path):
    torch.manual_seed(0)
    model = build_openseed("tiny")
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()} | {"criterion.x": torch.ones(1)},
                "hyper_parameters": {"model_config": model.config}}, tmp_path / "last.ckpt")
    loaded = load_model(tmp_path / "last.ckpt")
    assert torch.equal(loaded.decoder.class_head.bias, model.decoder.class_head.bias)


def test_mismatched_weights_fail_loudly(tmp_path):
    model = build_openseed("tiny")
    state = model.state_dict()
    state.pop("decoder.class_head.bias")
    state["decoder.extra"] = torch.zeros(1)
    torch.save({"format": "openseed-model", "version": 1, "config": model.config, "state_dict": state},
               tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match=r"missing \['decoder.class_head.bias'\].*unexpected \['decoder.extra'\]"):
        load_model(tmp_path / "bad.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an openseed model file"):
        load_model(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "none.pt")
