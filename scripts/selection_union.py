"""How much of the image a trained flex model's answer rows select together: per FA layer, the union of
the high-res tokens that the selecting rows of a sample select in a teacher-forced forward pass (what
a training step projects and keeps for the backward pass), as a share of the image's high-res tokens,
mean over the validation questions. ``scripts/bench_efficiency.py --concentrated_union`` takes it.

    python scripts/selection_union.py runs/regions/regions/flex_attention_ratio@0.1/seed0/checkpoints/last.ckpt \
        --config configs/synthetic.yaml --config experiments/regions/task.yaml \
        --config experiments/synthetic/flex_attention_ratio.yaml --model.model.init_args.selection.init_args.ratio 0.1

The arguments after the checkpoint are the CLI's: the configs (and overrides) the run was trained with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flexvlm.sweep import trained_on_validation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a trained run's checkpoint")
    parser.add_argument("--num", type=int, default=200, help="validation questions to look at")
    args, overrides = parser.parse_known_args()
    cli, batch = trained_on_validation(args.checkpoint, overrides, args.num)
    model = cli.model.model
    with torch.no_grad():
        out = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch.get("content_box"),
                    labels=batch["labels"])
    if not out.selection_masks:
        raise SystemExit(f"{args.checkpoint}: a {model.mode} model selects nothing")
    rows = out.row_fraction.shape[1]
    print(f"{args.num} questions, up to {rows} selecting rows a sample; per-row selection "
          f"{float(torch.stack(list(out.selected_fraction.values())).mean()):.3f} of the high-res tokens")
    unions = []
    for layer, masks in out.selection_masks.items():  # (B, R, H, W); rows that do not select are all False
        union = masks.any(1).flatten(1).float().sum(-1) / masks[0, 0].numel()
        unions.append(union.mean())
        print(f"FA layer {layer}: union {float(union.mean()):.3f} (max {float(union.max()):.3f})")
    print(f"mean union over FA layers: {float(torch.stack(unions).mean()):.3f}")


if __name__ == "__main__":
    main()
