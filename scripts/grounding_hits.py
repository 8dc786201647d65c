"""Where a trained model looks: for each layer that selects (or would select, for a low-res-only
model), how often the top cell of an answer row's low-res attention map is the cell its answer token
is read from (the data's grounding target, ``aux_query_cell``), teacher-forced on validation
questions, by question kind and answer row; and how well the vision tower's dense objective reads
the high-res digits (what the decoder can read at all once it looks in the right place).

    python scripts/grounding_hits.py runs/regions/regions/stage1/seed0/checkpoints/last.ckpt \\
        --config configs/synthetic.yaml --config experiments/regions/task.yaml \\
        --config experiments/synthetic/protocol/stage1.yaml

The arguments after the checkpoint are the CLI's: the configs (and overrides) the run was trained with.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import torch

from flexvlm.constants import IGNORE_INDEX
from flexvlm.sweep import trained_on_validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a trained run's checkpoint")
    parser.add_argument("--num", type=int, default=200, help="validation questions to look at")
    args, overrides = parser.parse_known_args()
    cli, batch = trained_on_validation(args.checkpoint, overrides, args.num)
    model, aux = cli.model.model, cli.model.aux_objective
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch.get("content_box"),
                    labels=batch["labels"], map_grad=True)
        if aux is not None:
            lr, hr = out.lr_features, out.hr_features
            if hr is None:
                lr, hr = model.encoder.grid_features(batch["images"])
            digits = batch["aux_hr_digit"]
            read = digits != IGNORE_INDEX
            accuracy = (aux.hr_digit(hr).argmax(-1)[read] == digits[read]).float().mean()
            print(f"the tower's digit head reads {float(accuracy):.3f} of the {int(read.sum())} high-res tile tokens")
    if not out.selection_maps:
        raise SystemExit(f"{args.checkpoint}: a {model.mode} model gives no maps")
    targets = batch["aux_query_cell"]
    targets = targets[:, None] if targets.dim() == 1 else targets  # the tile task: the first row's
    kinds = [tags.get("question_kind", "all") for tags in batch.get("tags") or [{}] * len(targets)]
    print("| layer selected for | question kind | answer row | top cell is the target | rows |\n|---|---|---|---|---|")
    for layer, maps in out.selection_maps.items():  # (B, R, h, w)
        rows = min(maps.shape[1], targets.shape[1])
        top = maps[:, :rows].flatten(2).argmax(-1)
        hits: dict[tuple[str, int], list[bool]] = defaultdict(list)
        for b, kind in enumerate(kinds):
            for r in range(rows):
                if targets[b, r] != IGNORE_INDEX:
                    hits[kind, r].append(bool(top[b, r] == targets[b, r]))
        for (kind, row), found in sorted(hits.items()):
            print(f"| {layer} | {kind} | {row} | {sum(found) / len(found):.3f} | {len(found)} |")


if __name__ == "__main__":
    main()
