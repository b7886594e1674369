"""Write a checkpoint with the exact layout of a released OpenSeeD file (``../shared/reference/manifests``) and random
values, to measure the converter and the converted model at full size where the released files cannot be downloaded.

    python experiments/reference_weights/layout_checkpoint.py arch=swinl_decouple out=/tmp/swinl_layout.pt

Float tensors get N(0, 0.02) values (aliases share one tensor, as in a saved reference model), Swin's
``relative_position_index`` buffers the real index, ``logit_scale`` log(1 / 0.07). The values are random: use the
result for timing and memory, not for predictions.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from openseed.cli import Option, command, one_of, path  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "reference"


def relative_position_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def layout_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    manifest = json.loads((SHARED / "manifests" / f"{arch}.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for entry in manifest["tensors"]:
        key, shape = entry["key"], entry["shape"]
        if entry.get("alias_of"):
            state[key] = state[entry["alias_of"]]
        elif key.endswith("relative_position_index"):
            state[key] = relative_position_index(int(math.isqrt(shape[0])))
        elif key.endswith("logit_scale"):
            state[key] = torch.tensor(math.log(1 / 0.07))
        elif entry["dtype"] == "float32":
            state[key] = torch.randn(shape, generator=generator) * 0.02
        else:
            state[key] = torch.zeros(shape, dtype=getattr(torch, entry["dtype"]))
    return state


OPTIONS = {
    "arch": Option("the released architecture", required=True,
                   check=one_of(["swint_nodecouple", "swint_decouple", "swinl_decouple"])),
    "out": Option("the .pt file to write", required=True, check=path),
}


@command(OPTIONS, "python experiments/reference_weights/layout_checkpoint.py", __doc__)
def main(args) -> int:
    state = layout_state_dict(args.arch)
    torch.save(state, args.out)
    print(f"{args.out}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.1f} M values "
          f"(aliases counted per key), {Path(args.out).stat().st_size / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
