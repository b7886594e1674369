"""The parity table of docs/model.md: max abs difference between openseed and the reference's recorded outputs, per
stage and output, for the converted small model of each released architecture (../shared/reference).

    python experiments/reference_weights/parity_table.py [threads=2]

The same runs as tests/test_reference_parity.py (which asserts them at atol = rtol = 1e-4); here the figures.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from openseed.cli import Option, command, integer  # noqa: E402
from openseed.core.boxes import model_boxes_to_pixels  # noqa: E402
from tests._reference import ARCHITECTURES, centre_crop, load_npz, meta  # noqa: E402
from tests.test_reference_parity import Run  # noqa: E402


def worst(ours, expected) -> float:
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    return float(np.abs(ours - expected).max())


def rows_for(run: Run) -> dict[str, float]:
    expected, outputs, num_fg = run.expected, run.outputs, run.outputs.num_fg
    rows = {"text embeddings": worst(run.text, expected["text_embeddings"])}
    if run.arch == "swint_decouple":
        summary = load_npz("swint_decouple", "expected_features_summary.npz")
        maps = {f"backbone {key}": value[0] for key, value in run.features.items()}
        memory = run.memory
        for level, ((h, w), start) in enumerate(zip(memory.spatial_shapes.tolist(),
                                                    memory.level_start_index.tolist())):
            maps[f"encoder level {level}"] = memory.memory[0, start: start + h * w].t().reshape(-1, h, w)
        maps["mask features"] = memory.mask_features[0]
        names = {f"backbone {k}": f"backbone_{k}" for k in ("res2", "res3", "res4", "res5")}
        names |= {f"encoder level {i}": f"multi_scale_features_{i}" for i in range(4)}
        names["mask features"] = "mask_features"
        for label, value in maps.items():
            array = value.numpy()
            key = names[label]
            rows[f"{label} (means, stds, crops)"] = max(
                worst(array.mean((1, 2)), summary[f"{key}__mean_per_channel"]),
                worst(array.std((1, 2)), summary[f"{key}__std_per_channel"]),
                worst(array[:, :24, :24], summary[f"{key}__crop_topleft"]),
                worst(centre_crop(array), summary[f"{key}__crop_centre"]))
    rows["proposals: logits"] = worst(outputs.proposals.logits[0], expected["interm_pred_logits"][:num_fg])
    rows["proposals: boxes"] = worst(outputs.proposals.boxes[0], expected["interm_pred_boxes"][:num_fg])
    for layer, prediction in enumerate(outputs.aux):
        when = "before layer 1" if layer == 0 else f"after layer {layer}"
        rows[f"{when}: logits"] = worst(prediction.logits[0], expected[f"aux{layer}_pred_logits"])
        rows[f"{when}: boxes"] = worst(prediction.boxes[0], expected[f"aux{layer}_pred_boxes"])
    rows["after the last layer: logits"] = worst(outputs.final.logits[0], expected["pred_logits"])
    rows["after the last layer: boxes"] = worst(outputs.final.boxes[0], expected["pred_boxes"])
    rows["after the last layer: masks"] = worst(outputs.final.masks[0], expected["pred_masks"])
    if run.arch == "swint_decouple":
        conditioned = load_npz("swint_decouple", "expected_conditioned.npz")
        boxes = model_boxes_to_pixels(torch.from_numpy(conditioned["gt_boxes_cxcywh_norm"]),
                                      tuple(meta(expected)["padded_hw"]))
        decoded = run.model.decode_boxes(run.images, run.padding, run.vocabulary, [boxes],
                                         [torch.from_numpy(conditioned["gt_labels"])])
        final = decoded.conditioned.predictions[-1]
        rows["box prompts (18 GT boxes): logits, all layers"] = max(
            worst(p.logits[0], conditioned[key]) for p, key in zip(
                decoded.conditioned.predictions, ["dn_aux0_pred_logits", "dn_aux1_pred_logits",
                                                  "dn_aux2_pred_logits", "dn_pred_logits"]))
        rows["box prompts: boxes, all layers"] = max(
            worst(p.boxes[0], conditioned[key]) for p, key in zip(
                decoded.conditioned.predictions, ["dn_aux0_pred_boxes", "dn_aux1_pred_boxes",
                                                  "dn_aux2_pred_boxes", "dn_pred_boxes"]))
        rows["box prompts: final masks"] = worst(final.masks[0], conditioned["dn_pred_masks"])
    return rows


OPTIONS = {"threads": Option("torch threads", 2, integer(1))}


@command(OPTIONS, "python experiments/reference_weights/parity_table.py", __doc__)
def main(args) -> int:
    torch.set_num_threads(args.threads)
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for arch in ARCHITECTURES:
            work = Path(tmp) / arch
            work.mkdir()
            table[arch] = rows_for(Run(arch, work))
    labels = list(max(table.values(), key=len))  # the architecture with every stage recorded sets the order
    print(f"max abs difference to the reference ({args.threads} threads; - = not recorded for that architecture)\n")
    print("| stage / output | " + " | ".join(ARCHITECTURES) + " |\n|---|" + "---|" * len(ARCHITECTURES))
    for label in labels:
        cells = [f"{table[arch][label]:.1e}" if label in table[arch] else "-" for arch in ARCHITECTURES]
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
