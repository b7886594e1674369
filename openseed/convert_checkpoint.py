"""Convert an authors' OpenSeeD checkpoint (or a training checkpoint, or an old model file) into an openseed model
file (safetensors weights with the model's config as JSON metadata: no code can be stored in it).

    python -m openseed.convert_checkpoint source=model_state_dict_swint_51.2ap.pt arch=swint_nodecouple \
        out=swint.safetensors
    python -m openseed.convert_checkpoint source=openseed_swinl_pano_sota.pt arch=swinl_decouple out=swinl.safetensors
    python -m openseed.convert_checkpoint source=weights.pt config=config.yaml out=small.safetensors  # sizes: config
    python -m openseed.convert_checkpoint source=outputs/run/checkpoints/last.ckpt out=run.safetensors  # a training run
    python -m openseed.convert_checkpoint source=old_model.pt out=model.safetensors  # a version-1 (pickled) model file

``arch`` names one of the three released architectures at full size (``openseed.modeling.reference``); ``config``
reads the sizes from a reference config file instead (``configs/openseed/*.yaml`` of the authors' repository, or a
merged config such as the test fixtures'). The source is read with ``torch.load(weights_only=True)``; every key is
mapped explicitly (see ``openseed.modeling.reference.map_reference_state_dict``) and anything that does not fit is an
error listing the keys. Without ``arch`` / ``config`` the source is an openseed training checkpoint or model file,
whose recorded config and weights are written as they are. The result loads with
``openseed.modeling.openseed.load_model``, ``Predictor``, ``python -m openseed.predict``, ``python -m
openseed.evaluate`` and, as initial weights, ``model.init_from`` in training. Exit status: 0 written, 2 bad input
(message on stderr).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from openseed.cli import Option, command, path
from openseed.modeling.checkpoint import read_checkpoint, write_model_file
from openseed.modeling.openseed import MODEL_SIZES, OpenSeeDConfig, build_openseed
from openseed.modeling.reference import (
    REFERENCE_ARCHITECTURES,
    ConversionError,
    config_from_reference,
    describe_state_dict,
    map_reference_state_dict,
    read_state_dict,
)


def target_shapes(config: OpenSeeDConfig) -> dict[str, torch.Size]:
    """The state-dict shapes of the model ``config`` builds (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = build_openseed(config)
    return {key: value.shape for key, value in model.state_dict().items()}


def _facts(facts: dict) -> str:
    return (f"text context {facts['text_context']}, {facts['background_queries']} background queries, "
            f"{facts['encoder_levels']} encoder levels, Swin embedding {facts['swin_embed_dim']} with "
            f"{facts['swin_stage3_depth']} blocks in stage 3")


def convert(source: str | Path, out: str | Path, arch: str | None = None, config_file: str | Path | None = None,
            log=print) -> dict:
    """Convert ``source`` into the model file ``out``; returns a summary (architecture, counts, seconds).

    At most one of ``arch`` (a released architecture) and ``config_file`` (a reference config) is given; with neither,
    ``source`` is an openseed training checkpoint or model file, re-written as a model file (``export``).
    Raises ``ConversionError`` (a ValueError) or FileNotFoundError naming what does not fit.
    """
    if arch is not None and config_file is not None:
        raise ConversionError("give at most one of arch and config")
    if arch is None and config_file is None:
        return export(source, out, log=log)
    if arch is not None and arch not in REFERENCE_ARCHITECTURES:
        raise ConversionError(f"unknown arch {arch!r}; choose from {', '.join(REFERENCE_ARCHITECTURES)}")
    start = time.perf_counter()
    config = MODEL_SIZES[arch] if arch is not None else config_from_reference(config_file)
    log(f"reading {source}")
    state = read_state_dict(source)
    elements = sum(value.numel() for value in state.values())
    log(f"read {len(state)} tensors ({elements / 1e6:.1f} M values) in {time.perf_counter() - start:.1f} s")
    facts = describe_state_dict(state)
    if arch is not None and facts["architecture"] not in (None, arch):
        raise ConversionError(f"{source} holds a {facts['architecture']} model ({_facts(facts)}), not {arch}: "
                              f"use arch={facts['architecture']}")
    log(f"mapping onto openseed's {arch or Path(config_file).name} model")
    try:
        mapped, report = map_reference_state_dict(state, config, target_shapes(config))
    except ConversionError as err:
        known = f" It looks like {facts['architecture']}." if facts["architecture"] else ""
        raise ConversionError(f"{source} does not convert to {arch or config_file} ({_facts(facts)}).{known} "
                              f"{err}") from None
    log(f"writing {out}")
    write_model_file(asdict(config), mapped, out)
    seconds = time.perf_counter() - start
    parameters = sum(value.numel() for value in mapped.values())
    log(f"converted {source} -> {out}: {report.summary()}; {parameters / 1e6:.2f} M values; "
        f"{Path(out).stat().st_size / 2**20:.1f} MiB; {seconds:.1f} s")
    return {"architecture": arch or str(config_file), "tensors": report.written, "values": parameters,
            "dropped": report.dropped, "aliases": report.aliases, "seconds": seconds}


def export(source: str | Path, out: str | Path, log=print) -> dict:
    """Re-write an openseed training checkpoint or (version-1) model file as a model file; returns a summary."""
    start = time.perf_counter()
    try:
        config, state = read_checkpoint(source)
        OpenSeeDConfig.from_dict(config)  # a config this openseed can build
    except ValueError as err:
        raise ConversionError(f"{err} (a released OpenSeeD checkpoint needs arch= or config=)") from None
    write_model_file(config, state, out)
    values = sum(value.numel() for value in state.values())
    log(f"wrote {out} from {source}: {len(state)} tensors, {values / 1e6:.2f} M values, "
        f"{Path(out).stat().st_size / 2**20:.1f} MiB, {time.perf_counter() - start:.1f} s")
    return {"architecture": "recorded", "tensors": len(state), "values": values, "dropped": [], "aliases": [],
            "seconds": time.perf_counter() - start}


CLI_OPTIONS = {
    "source": Option("the checkpoint: an authors' released .pt (flat or under 'model'), an openseed training "
                     "checkpoint or an old model file", required=True, check=path),
    "out": Option("the openseed model file to write (.safetensors)", required=True, check=path),
    "arch": Option("the released architecture a reference checkpoint holds", None, lambda value, key: str(value)),
    "config": Option("or: a reference config file (YAML) giving the sizes", None, path),
}


@command(CLI_OPTIONS, "python -m openseed.convert_checkpoint",
         "Convert an authors' OpenSeeD checkpoint (with arch= or config=), or an openseed training checkpoint or an "
         "old model file, into an openseed model file.")
def main(args) -> int:
    # arch's value and arch-or-config are checked by convert, before it reads anything
    source, out, arch, config = args.source, args.out, args.arch, args.config
    try:
        convert(source, out, arch=arch, config_file=config)
    except (ConversionError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
