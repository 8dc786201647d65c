"""Cost of the four modes on the same images and prompts: FLOPs of a whole greedy generation per
sample (vision included) and wall time, reported as ratios to ``flex`` measured in one run.

    python scripts/bench_modes.py                      # a LLaVA-shaped model shrunk to run on a CPU
    python scripts/bench_modes.py --hidden 1024 --layers 16 --device cuda

The geometry is the paper's: a 24 x 24 low-res grid (576 tokens), zoom 3 (72 x 72 = 5184 high-res
tokens), N_SA / N_FA in the release's proportion, 10 % of the high-res tokens selected per
selecting row (a fixed budget: the threshold rule on an untrained model selects far more). Only
widths and depths are smaller, so ratios, not absolute numbers, are what carries over.
"""

from __future__ import annotations

import argparse
import time

import torch

from flexvlm.constants import IMAGE_TOKEN_INDEX
from flexvlm.flops import generation_flops
from flexvlm.generate import generate
from flexvlm.models.vision import TimmBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.selection import AttentionSelection

MODES = ("lr_only", "hd", "xattn", "flex")


def build(mode: str, args: argparse.Namespace) -> FlexVLM:
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", model_kwargs=dict(
        img_size=args.patch * 24, patch_size=args.patch, depth=args.vision_layers, embed_dim=192, num_heads=3))
    num_sa = round(args.layers * 9 / 32) if mode == "flex" else 0 if mode == "xattn" else None
    return FlexVLM(
        backbone, llm="tiny", mode=mode, num_sa_layers=num_sa, selection=AttentionSelection(ratio=0.1, block_grid=9),
        llm_overrides=dict(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                           num_layers=args.layers, num_heads=args.hidden // 64, max_position_embeddings=8192),
    ).eval().to(args.device)


def inputs(model: FlexVLM, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    size = model.image_size
    prompt = torch.randint(4, 1000, (args.batch, args.prompt_tokens), generator=generator)
    prompt[:, 0] = IMAGE_TOKEN_INDEX
    return {
        "prompt_ids": prompt.to(args.device), "prompt_mask": torch.ones_like(prompt).to(args.device),
        "images": torch.randn(args.batch, 3, size, size, generator=generator).to(args.device),
    }


@torch.no_grad()
def seconds(model: FlexVLM, batch: dict, args: argparse.Namespace) -> float:
    def once() -> None:
        generate(model, batch["prompt_ids"], batch["prompt_mask"], batch["images"], max_new_tokens=args.new_tokens)
        if args.device == "cuda":
            torch.cuda.synchronize()

    once()  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        once()
    return (time.perf_counter() - start) / args.repeats / args.batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vision_layers", type=int, default=2)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--prompt_tokens", type=int, default=40)
    parser.add_argument("--new_tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    rows = {}
    for mode in MODES:
        model = build(mode, args)
        batch = inputs(model, args)
        flops = generation_flops(model, batch, args.new_tokens, eos_token_id=None)
        rows[mode] = (flops, seconds(model, batch, args))
        print(f"{mode:8s} {flops / 1e9:9.2f} GFLOPs/sample {rows[mode][1]:8.3f} s/sample", flush=True)
    flex_flops, flex_time = rows["flex"]
    print("\n| mode | GFLOPs / sample | FLOPs / flex | time / flex |\n|---|---|---|---|")
    for mode, (flops, secs) in rows.items():
        print(f"| {mode} | {flops / 1e9:.2f} | {flops / flex_flops:.2f} | {secs / flex_time:.2f} |")


if __name__ == "__main__":
    main()
