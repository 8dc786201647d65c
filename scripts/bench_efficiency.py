"""Cost of flex against the baselines it replaces: time and peak memory measured as ratios of
variants in one run, and FLOPs at the paper's scale.

    python scripts/bench_efficiency.py                        # everything, CPU (about 15 minutes on 2 cores)
    python scripts/bench_efficiency.py --sections flops       # the paper-scale FLOP table only (instant)
    python scripts/bench_efficiency.py --hidden 1024 --device cuda --json out.json

Geometry (the paper's, with a shrunk model): a 24 x 24 low-res grid, zoom 3 (72 x 72 = 5,184
high-res tokens), N_SA / N_FA in the release's proportion (2 / 6 of 8 layers), 10 % of the
high-res tokens selected per row on a 9 x 9 block grid, a 2-block ViT with patch 14, decoder
width 512. Sections:

- decode: decoder prefill of a 40-token prompt; one decode step (selection staying put: center;
  and attention); whole greedy generations of 1..63 tokens (vision included), with high-res K/V
  projected lazily or all at prefill, and the release-style layer; a batch-8 decode step against
  8 batch-1 steps. ``--compile`` adds flex with the compiled decode step of static shapes
  (``flex/compiled``, ``flexvlm.models.static_decode``; its compile is in the warm-up).
- train: one forward + backward at batch 2 with 64 and 256 answer rows, after a warm-up step:
  time, and peak memory (each in a fresh process; CPU: the peak RSS above the RSS before the step,
  glibc's mmap threshold fixed so that freed tensors leave the RSS; CUDA: peak allocated). Variants:
  lr_only, xattn, flex (fused), flex whose rows agree on a part of the image as a trained model's do
  (``flex_concentrated``: each row's best blocks among the ``--concentrated_union`` share of them that
  the rows rank highest; a random model's rows each look elsewhere, a union of nearly every block),
  and flex computed as the authors' training does (``flex_impl="release"``: every row scores every
  high-res key through a mask).
- flops: ``flexvlm.flops.paper_scale_table`` at LLaVA-1.5-7B shapes.

Times are medians over interleaved repeats; what carries over between machines are the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from flexvlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from flexvlm.flops import generation_flops, paper_scale_table
from flexvlm.models.llm import KVCache
from flexvlm.models.vision import TimmBackbone
from flexvlm.models.vlm import FlexVLM
from flexvlm.selection import AttentionSelection, CenterSelection
from flexvlm.selection.base import Budget, SelectionContext
from flexvlm.timing import generation_seconds

LENGTHS = (1, 2, 4, 8, 16, 32, 63)  # generation lengths reported (63: MagnifierBench's limit)
# variant -> (mode, selection, FlexVLM options)
VARIANTS = {
    "lr_only": ("lr_only", None, {}),
    "hd": ("hd", None, {}),
    "xattn": ("xattn", None, {}),
    "flex": ("flex", "attention", {}),
    "flex_center": ("flex", "center", {}),
    "flex_release": ("flex", "attention", {"flex_impl": "release"}),
    "flex_concentrated": ("flex", "concentrated", {}),
}
# the union of the answer rows' selections of a trained regions-task flex model at a 10 % budget
# (scripts/selection_union.py, docs/benchmarks.md): the share flex_concentrated's rows agree on
TRAINED_UNION = 0.165


class ConcentratedSelection(AttentionSelection):
    """Each row's best blocks by its own map, among the ``union`` share of the blocks that the sample's
    rows rank highest on average: rows that agree, as a trained model's do, where a random model's
    answer rows each look elsewhere (a union of nearly every block)."""

    def __init__(self, union: float, ratio: float, block_grid: int) -> None:
        super().__init__(ratio=ratio, block_grid=block_grid)
        self.pool = Budget(ratio=union)

    def select_blocks(self, attn_map: torch.Tensor, block_valid: torch.Tensor, ctx: SelectionContext) -> torch.Tensor:
        b, r, h, w = attn_map.shape
        pooled = torch.nn.functional.adaptive_max_pool2d((attn_map * ctx.lr_valid.unsqueeze(1)).view(b * r, h, w),
                                                         block_valid.shape[-2:]).view(b, r, *block_valid.shape[-2:])
        shared = self.pool.keep_best(pooled.mean(1, keepdim=True), block_valid, ctx)
        return self.budget.keep_best(pooled.masked_fill(~shared, float("-inf")), block_valid, ctx)


def build(variant: str, args: argparse.Namespace) -> FlexVLM:
    mode, selection, options = VARIANTS[variant]
    torch.manual_seed(0)
    backbone = TimmBackbone("vit_tiny_patch16_224", model_kwargs=dict(
        img_size=args.patch * 24, patch_size=args.patch, depth=2, embed_dim=192, num_heads=3))
    strategy = {None: None, "center": CenterSelection(ratio=0.1, block_grid=9),
                "attention": AttentionSelection(ratio=0.1, block_grid=9),
                "concentrated": ConcentratedSelection(args.concentrated_union, ratio=0.1, block_grid=9)}[selection]
    num_sa = {"flex": round(args.layers * 9 / 32), "xattn": 0}.get(mode)
    model = FlexVLM(
        backbone, llm="tiny", mode=mode, num_sa_layers=num_sa, selection=strategy, high_res_grad=False,
        llm_overrides=dict(vocab_size=1000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                           num_layers=args.layers, num_heads=args.hidden // 64, max_position_embeddings=8192),
        attn_backend=args.attn_backend, **options,
    )
    return model.to(args.device, getattr(torch, args.dtype))


def prompts(model: FlexVLM, batch: int, args: argparse.Namespace, answer: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` prompts of ``args.prompt_tokens`` (image first), plus ``answer`` labelled tokens."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 1000, (batch, args.prompt_tokens + answer), generator=generator)
    ids[:, 0] = IMAGE_TOKEN_INDEX
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, args.prompt_tokens:] = ids[:, args.prompt_tokens:]
    size = model.image_size
    images = torch.randn(batch, 3, size, size, generator=generator)
    dtype = next(model.parameters()).dtype
    return {"prompt_ids": ids.to(args.device), "prompt_mask": torch.ones_like(ids).to(args.device),
            "images": images.to(args.device, dtype), "labels": labels.to(args.device)}


def sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- decoding ------------------------------------------------------------------------------------
@torch.no_grad()
def prefill_seconds(model: FlexVLM, batch: dict, args: argparse.Namespace) -> float:
    """The decoder's prefill alone (vision and splicing done beforehand)."""
    inputs = model.prepare(batch["prompt_ids"], batch["prompt_mask"], batch["images"])
    sync(args)
    start = time.perf_counter()
    model.step(inputs.embeds, inputs.attention_mask, KVCache(), inputs.high_res)
    sync(args)
    return time.perf_counter() - start


def decode_section(args: argparse.Namespace) -> dict:
    names = ["lr_only", "hd", "xattn", "flex", "flex_center", "flex_release"]
    models = {name: build(name, args).eval() for name in names}
    one = {name: prompts(model, 1, args) for name, model in models.items()}
    eight = {name: prompts(models[name], 8, args) for name in ("lr_only", "flex", "flex_center")}
    batched = [("lr_only", "lazy"), ("flex", "lazy"), ("flex", "prefill"), ("flex_center", "lazy")]
    runs = [(name, kv) for name in names for kv in (["lazy", "prefill"] if name in ("flex", "flex_center") else ["lazy"])]
    if args.compile:  # "compiled" in place of a K/V mode: the compiled step projects them at prefill
        runs.append(("flex", "compiled"))
    curves: dict[str, list[list[float]]] = {f"{n}/{kv}": [] for n, kv in runs}
    prefill: dict[str, list[float]] = {name: [] for name in names}
    batch_steps: dict[str, dict[int, list[float]]] = {f"{n}/{kv}": {1: [], 8: []} for n, kv in batched}
    for name in names:  # warm-up
        generation_seconds(models[name], one[name], 2)
    if args.compile:  # the compile, for the shapes measured
        _generation_seconds(models["flex"], one["flex"], LENGTHS[-1], "compiled")
    for rep in range(args.repeats):
        print(f"decode: repeat {rep + 1}/{args.repeats}", flush=True)
        for name, kv in runs:
            curves[f"{name}/{kv}"].append(_generation_seconds(models[name], one[name], LENGTHS[-1], kv))
        for name in names:
            prefill[name].append(prefill_seconds(models[name], one[name], args))
        for name, kv in batched:
            for size, batch in ((1, one[name]), (8, eight[name])):
                batch_steps[f"{name}/{kv}"][size].append(_per_step(generation_seconds(models[name], batch, 24, kv)))
    curve = {key: [median([c[t - 1] for c in runs_]) for t in range(1, LENGTHS[-1] + 1)] for key, runs_ in curves.items()}
    step = {key: median([_per_step(c) for c in runs_]) for key, runs_ in curves.items()}
    flops = {name: generation_flops(models[name], one[name], 8, None) for name in ("lr_only", "hd", "xattn", "flex")}
    return {
        "prefill_s": {name: median(v) for name, v in prefill.items()},
        "decode_step_s": step,
        "generation_s": {key: {t: c[t - 1] for t in LENGTHS} for key, c in curve.items()},
        "generation_curve_s": curve,
        "batch_step_s": {key: {size: median(v) for size, v in sizes.items()} for key, sizes in batch_steps.items()},
        "gflops_8_tokens": {name: f / 1e9 for name, f in flops.items()},
    }


def _generation_seconds(model: FlexVLM, batch: dict, new_tokens: int, kv: str) -> list[float]:
    """``generation_seconds`` with ``kv`` a high-res K/V mode, or ``compiled``: the compiled decode step."""
    if kv == "compiled":
        return generation_seconds(model, batch, new_tokens, compiled=True)
    return generation_seconds(model, batch, new_tokens, kv)


def _per_step(cumulative: list[float]) -> float:
    """Median decode step of one generation (the steps after the prefill and the first decode step)."""
    return median([b - a for a, b in zip(cumulative[1:], cumulative[2:])])


# -- training ------------------------------------------------------------------------------------
def train_once(variant: str, rows: int, measure: str, args: argparse.Namespace) -> dict:
    """In this (fresh) process, after a warm-up step (gradients allocated, as in an optimizer loop):
    ``time``: the faster of two forward + backward steps; ``memory``: one step's peak above the memory
    held before it (run with a fixed glibc mmap threshold, so that freed tensors leave the RSS)."""
    model = build(variant, args).train()
    batch = prompts(model, 2, args, answer=rows)

    def step() -> float:
        """-> the fraction of the high-res tokens in the union of a sample's selections, mean over FA layers."""
        out = model(batch["prompt_ids"], batch["prompt_mask"], batch["images"], labels=batch["labels"])
        out.loss.backward()
        model.zero_grad(set_to_none=False)
        sync(args)
        unions = [m.any(1).flatten(1).float().mean() for m in out.selection_masks.values()]
        return float(torch.stack(unions).mean()) if unions else 0.0

    union = step()
    if measure == "time":
        times = []
        for _ in range(2):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return {"seconds": min(times), "union": union}
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base}
    base = _rss_reset_peak()
    step()
    return {"peak_bytes": _peak_rss() - base}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _rss_reset_peak() -> int:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0) and return the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _peak_rss() -> int:
    return _status_kb("VmHWM")


def train_section(args: argparse.Namespace) -> dict:
    names = ["lr_only", "xattn", "flex", "flex_concentrated", "flex_release"]
    results: dict[str, dict[int, list[dict]]] = {n: {r: [] for r in args.answer_rows} for n in names}
    # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, where they would hide
    # one variant's peak behind the last one's leftovers; a fixed threshold returns them
    memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for rep in range(args.train_repeats):
        for rows in args.answer_rows:
            for name in names:
                print(f"train: repeat {rep + 1}/{args.train_repeats}, {rows} rows, {name}", flush=True)
                run = {}
                for measure, env in (("time", None), ("memory", memory_env)):
                    command = [sys.executable, __file__, "--train_child", name, str(rows), measure, *_shared_args(args)]
                    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
                    run.update(json.loads(out.strip().splitlines()[-1]))
                results[name][rows].append(run)
    return {name: {rows: {key: median([r[key] for r in runs]) for key in runs[0]} for rows, runs in by_rows.items()}
            for name, by_rows in results.items()}


def _shared_args(args: argparse.Namespace) -> list[str]:
    return ["--hidden", str(args.hidden), "--layers", str(args.layers), "--patch", str(args.patch),
            "--prompt_tokens", str(args.prompt_tokens), "--device", args.device, "--dtype", args.dtype,
            "--attn_backend", args.attn_backend, "--concentrated_union", str(args.concentrated_union)]


# -- report --------------------------------------------------------------------------------------
def goals(result: dict) -> list[tuple[str, float, float, bool]]:
    """(goal, measured ratio, bound, holds) for every goal the run measured."""
    checks = []

    def check(name: str, value: float, bound: float) -> None:
        checks.append((name, value, bound, value <= bound))

    if "decode" in result:  # issue 22's CPU targets (width 512), then the earlier ones it did not tighten
        d = result["decode"]
        step, gen = d["decode_step_s"], d["generation_curve_s"]
        check("decode step, selection staying put (center): flex / lr_only", step["flex_center/lazy"] / step["lr_only/lazy"], 1.15)
        check("decode step, wandering selection (attention): flex / lr_only", step["flex/lazy"] / step["lr_only/lazy"], 1.5)
        if "flex/compiled" in step:  # the compiled step of static shapes (--compile), attention selection
            check("decode step, compiled, wandering selection (attention): flex / lr_only",
                  step["flex/compiled"] / step["lr_only/lazy"], 1.15)
        check("decoder prefill: flex / xattn", d["prefill_s"]["flex"] / d["prefill_s"]["xattn"], 0.35)
        check("generation of 8 tokens: flex (lazy K/V) / xattn", gen["flex/lazy"][7] / gen["xattn/lazy"][7], 0.45)
        worst = max(gen["flex/lazy"][t] / gen["xattn/lazy"][t] for t in range(LENGTHS[-1]))
        check("generation of 1..63 tokens: max flex (lazy) / xattn", worst, 1.0)
        check("generation of 63 tokens: flex (lazy) / hd", gen["flex/lazy"][-1] / gen["hd/lazy"][-1], 0.2)
        for key, sizes in d["batch_step_s"].items():
            if key.startswith("flex"):
                bound = 0.4 if key == "flex/lazy" else 0.35  # attention selection: issue 22's; the others: earlier
                check(f"decode step, batch 8 / 8 x batch 1 ({key} K/V)", sizes[8] / (8 * sizes[1]), bound)
    if "train" in result:
        t = result["train"]
        for rows in t["flex"]:
            flex, xattn, release = t["flex"][rows], t["xattn"][rows], t["flex_release"][rows]
            tight = int(rows) >= 256  # issue 22's targets are at 256 answer rows
            check(f"training step, {rows} rows: time flex / xattn", flex["seconds"] / xattn["seconds"], 0.45 if tight else 0.8)
            check(f"training step, {rows} rows: peak memory flex / xattn", flex["peak_bytes"] / xattn["peak_bytes"],
                  0.65 if tight else 1.0)
            if "flex_concentrated" in t:
                check(f"training step, {rows} rows: peak memory flex with a concentrated union / xattn",
                      t["flex_concentrated"][rows]["peak_bytes"] / xattn["peak_bytes"], 0.5 if tight else 1.0)
            check(f"training step, {rows} rows: time xattn / release-style flex", xattn["seconds"] / release["seconds"], 1.0)
            check(f"training step, {rows} rows: memory xattn / release-style flex", xattn["peak_bytes"] / release["peak_bytes"], 1.0)
    if "flops" in result:
        f = result["flops"]
        check("paper scale FLOPs: flex / xattn", f["tflops"]["flex"] / f["tflops"]["xattn"], 0.63)
        check("paper scale FLOPs: flex / hd_1008", f["tflops"]["flex"] / f["tflops"]["hd_1008"], 0.35)
        check("paper scale: selection overhead share of flex", f["selection_overhead_share"], 0.03)
    return checks


def report(result: dict) -> str:
    lines = [f"device: {result['device']}, torch {torch.__version__}, threads {torch.get_num_threads()}", ""]
    if "decode" in result:
        d = result["decode"]
        lines += ["| variant | decoder prefill (s) | decode step (ms) | " + " | ".join(f"gen {t} (s)" for t in LENGTHS) + " |",
                  "|---|---|---|" + "---|" * len(LENGTHS)]
        for key, gen in d["generation_s"].items():
            name = key.split("/")[0]
            prefill = f"{d['prefill_s'][name]:.3f}" if key.endswith("lazy") else ""
            lines.append(f"| {key} | {prefill} | {1e3 * d['decode_step_s'][key]:.1f} | "
                         + " | ".join(f"{gen[t]:.2f}" for t in LENGTHS) + " |")
        crossover = next((t + 1 for t, (a, b) in enumerate(zip(d["generation_curve_s"]["flex/lazy"],
                                                               d["generation_curve_s"]["flex/prefill"])) if b <= a), None)
        lines += ["", f"lazy vs prefill high-res K/V (attention selection): prefill is faster from "
                      f"{crossover} tokens on" if crossover else "lazy high-res K/V stays faster up to 63 tokens",
                  "decode step at batch 1 / batch 8 (first 24 tokens; batch 8 / 8 x batch 1): " + ", ".join(
                      f"{key} {1e3 * v[1]:.1f} / {1e3 * v[8]:.1f} ms ({v[8] / (8 * v[1]):.2f})"
                      for key, v in d["batch_step_s"].items()),
                  "GFLOPs per sample, 8-token generation: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in d["gflops_8_tokens"].items()), ""]
    if "train" in result:
        t = result["train"]
        lines += ["| variant | " + " | ".join(f"{r} rows: step (s) | peak (GB) | HR union" for r in t["flex"]) + " |",
                  "|---|" + "---|---|---|" * len(t["flex"])]
        for name, by_rows in t.items():
            lines.append(f"| {name} | " + " | ".join(f"{v['seconds']:.2f} | {v['peak_bytes'] / 1e9:.2f} | {v['union']:.0%}"
                                                    for v in by_rows.values()) + " |")
        lines.append("")
    if "flops" in result:
        f = result["flops"]
        lines += ["| TFLOPs / sample | " + " | ".join(f["tflops"]) + " | flex 672 / 1008 / 1344 |",
                  "|---|" + "---|" * len(f["tflops"]) + "---|",
                  "| paper scale | " + " | ".join(f"{v:.2f}" for v in f["tflops"].values()) + " | "
                  + " / ".join(f"{v:.2f}" for v in f["flex_by_size"].values()) + " |", ""]
    lines += ["| goal | measured | bound | holds |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.3f} | {bound} | {'yes' if ok else 'NO'} |" for name, value, bound, ok in goals(result)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=["decode", "train", "flops"], choices=["decode", "train", "flops"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--patch", type=int, default=14)
    parser.add_argument("--prompt_tokens", type=int, default=40)
    parser.add_argument("--answer_rows", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train_repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--attn_backend", default="sdpa", help="the decoder's attention kernel (flexvlm.attention)")
    parser.add_argument("--compile", action="store_true",
                        help="decode: also flex with the compiled decode step (flex/compiled)")
    parser.add_argument("--concentrated_union", type=float, default=TRAINED_UNION,
                        help="flex_concentrated: the share of the blocks its rows select from together")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--train_child", nargs=3, metavar=("VARIANT", "ROWS", "MEASURE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        variant, rows, measure = args.train_child
        print(json.dumps(train_once(variant, int(rows), measure, args)))
        return

    result: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                    "args": {k: v for k, v in vars(args).items() if k not in ("json", "train_child")}}
    if "flops" in args.sections:
        result["flops"] = paper_scale_table()
    if "decode" in args.sections:
        result["decode"] = decode_section(args)
    if "train" in args.sections:
        result["train"] = train_section(args)
    text = report(result)
    print(text)
    if args.json:
        result["goals"] = [dict(goal=n, measured=v, bound=b, holds=ok) for n, v, b, ok in goals(result)]
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
