"""Saving and loading a model: its config and weights in one file, loaded strictly.

A model file holds ``{"format": "openseed-model", "version": 1, "config": OpenSeeDConfig fields, "state_dict": ...}``.
``load_model`` also reads Lightning checkpoints of the training module: their weights live under ``state_dict`` with a
``model.`` prefix and the config under ``hyper_parameters["model_config"]``. Keys are mapped explicitly; any missing or
unexpected key is an error that lists them (never a silent partial load).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from openseed.modeling.openseed import OpenSeeD, OpenSeeDConfig, build_openseed

FORMAT, VERSION = "openseed-model", 1
LIGHTNING_PREFIX = "model."


def save_model(model: OpenSeeD, path: str | Path) -> None:
    """Write the model's config and weights (built with ``build_openseed``, which records ``model.config``)."""
    if not hasattr(model, "config"):
        raise ValueError("the model has no recorded config: build it with build_openseed")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "version": VERSION, "config": dict(model.config),
                "state_dict": model.state_dict()}, path)


def _config(values: dict) -> OpenSeeDConfig:
    known = {f.name for f in fields(OpenSeeDConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"checkpoint config has unknown field(s) {sorted(unknown)}")
    return OpenSeeDConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def load_model(path: str | Path, map_location: str | torch.device = "cpu", **overrides) -> OpenSeeD:
    """Build the model a checkpoint describes and load its weights strictly.

    ``overrides`` change config fields that do not change the weights' shapes (e.g. ``text_path`` to point the text
    tower at a local copy, ``backbone_pretrained=False`` since the checkpoint holds the backbone's weights anyway).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    data = torch.load(path, map_location=map_location, weights_only=False)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        config, state = data["config"], data["state_dict"]
    elif isinstance(data, dict) and "state_dict" in data and "model_config" in data.get("hyper_parameters", {}):
        config = dict(data["hyper_parameters"]["model_config"])
        state = {k[len(LIGHTNING_PREFIX):]: v for k, v in data["state_dict"].items() if k.startswith(LIGHTNING_PREFIX)}
        if not state:
            raise ValueError(f"{path}: a Lightning checkpoint without '{LIGHTNING_PREFIX}*' weights")
    else:
        raise ValueError(f"{path}: not an openseed model file or training checkpoint")
    config = {**config, "backbone_pretrained": False, **overrides}
    model = build_openseed(_config(config))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not fit the model: missing {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                           f"{' ...' if len(unexpected) > 10 else ''}")
    return model
