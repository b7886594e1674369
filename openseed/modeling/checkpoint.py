"""Saving and loading a model: its config and weights in one file, loaded strictly and without running stored code.

A model file (version 2) is a safetensors file: the weights as tensors, and in its metadata ``format`` =
``openseed-model``, ``version`` = ``2`` and ``config`` = the OpenSeeDConfig fields as JSON. The format holds no code
at all (no pickle). ``python -m openseed.convert_checkpoint`` writes one from the authors' released checkpoints, from
a training checkpoint, or from a version-1 model file.

Also read, through ``torch.load(weights_only=True)`` (which builds only tensors and plain containers, and refuses
anything else with a clear error: an unsafe load would execute code stored in the file): version-1 model files (a
pickled ``{"format", "version": 1, "config", "state_dict"}``) and Lightning checkpoints of the training module (weights
under ``state_dict`` with a ``model.`` prefix, the config under ``hyper_parameters["model_config"]``).
Keys are mapped explicitly; any missing or unexpected key is an error that lists them (never a silent partial load).
This module knows the files, not the model: ``openseed.modeling.openseed.load_model`` builds the model a file
describes and loads its weights with ``load_state_strictly``.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import struct
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from openseed.fileio import atomic_write

FORMAT, VERSION = "openseed-model", 2
LIGHTNING_PREFIX = "model."


def _json_config(config: dict) -> str:
    try:
        return json.dumps(dict(config), sort_keys=True)
    except TypeError as err:
        raise ValueError(f"the model config holds a value JSON cannot store: {err}") from err


def write_model_file(config: dict, state_dict: dict[str, Tensor], path: str | Path) -> None:
    """Write a model file (see the module docstring) atomically: the file is written beside the target, flushed to
    disk, then renamed over it, so a reader (or a kill during the write) never leaves a partial file at ``path``."""
    metadata = {"format": FORMAT, "version": str(VERSION), "config": _json_config(config)}
    tensors, seen = {}, set()
    for key, value in state_dict.items():
        value = value.detach().to("cpu")
        storage = value.untyped_storage().data_ptr() if value.numel() else None
        if storage in seen:
            value = value.clone()  # safetensors refuses shared storage: tied or viewed weights are written apart
        seen.add(storage)
        tensors[key] = value.contiguous()
    atomic_write(save(tensors, metadata=metadata), path)


def is_safetensors(path: str | Path) -> bool:
    """Whether the file starts like a safetensors file (an 8-byte header length, then a JSON header)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= struct.unpack("<Q", head[:8])[0] <= Path(path).stat().st_size - 8


def _read_safetensors_model(path: Path) -> tuple[dict, dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise ValueError(f"{path}: a safetensors file without openseed's model metadata (a bare state dict? "
                                 f"write model files with openseed.modeling.checkpoint.save_model)")
            if metadata.get("version") != str(VERSION):
                raise ValueError(f"{path}: model file version {metadata.get('version')!r}; this openseed reads "
                                 f"{VERSION}")
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or damaged): {err}") from err
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: the model file's config metadata is missing or not JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the model file's config is not a JSON object")
    return config, state


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write the model's config (``OpenSeeD.config``) and weights."""
    write_model_file(dataclasses.asdict(model.config), model.state_dict(), path)


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu"):
    """``torch.load(weights_only=True)``, memory-mapped when the file allows it (tensors are read when used: reading a
    config touches no weights, loading or converting copies each tensor once).

    Raises FileNotFoundError, or ValueError naming the file when it is empty, truncated, of another format, or holds
    Python objects that only an unsafe load (running code stored in the file) could read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: the file holds Python objects other than tensors and plain containers, which only an unsafe "
            f"load (executing code stored in the file) could read; openseed refuses. Re-save its state dict with "
            f"torch.save(model.state_dict(), ...) where you trust the file. ({str(err).splitlines()[0]})") from err
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{path}: not a readable PyTorch checkpoint (empty, truncated or another format): "
                         f"{reason}") from err


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict[str, Tensor]]:
    """(config dict, model state dict) of a model file or a training checkpoint, read without running pickled code.

    Raises FileNotFoundError, or ValueError naming the file when it is empty, truncated, unsafe or of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_safetensors(path):
        config, state = _read_safetensors_model(path)
        return config, state if str(map_location) == "cpu" else {k: v.to(map_location) for k, v in state.items()}
    data = load_weights_only(path, map_location)
    if isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == 1:  # pickled, version 1
        return dict(data["config"]), data["state_dict"]
    if isinstance(data, dict) and "state_dict" in data and "model_config" in data.get("hyper_parameters", {}):
        state = {k[len(LIGHTNING_PREFIX):]: v for k, v in data["state_dict"].items() if k.startswith(LIGHTNING_PREFIX)}
        if not state:
            raise ValueError(f"{path}: a Lightning checkpoint without '{LIGHTNING_PREFIX}*' weights")
        return dict(data["hyper_parameters"]["model_config"]), state
    raise ValueError(f"{path}: not an openseed model file or training checkpoint (a released OpenSeeD checkpoint "
                     f"is converted first: python -m openseed.convert_checkpoint source=SRC arch=ARCH out=OUT)")


def load_state_strictly(model: nn.Module, state: dict[str, Tensor], source: str | Path) -> None:
    """``model.load_state_dict(state)`` that names every missing and unexpected key and every shape mismatch."""
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in state.items()
                    if k in target and v.shape != target[k].shape)
    if missing or unexpected or shapes:
        raise RuntimeError(f"{source}: weights do not fit the model: missing {missing[:10]}"
                           f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
                           f"{' ...' if len(unexpected) > 10 else ''}, shape mismatches {shapes[:10]}"
                           f"{' ...' if len(shapes) > 10 else ''}")
    model.load_state_dict(state, strict=True)
