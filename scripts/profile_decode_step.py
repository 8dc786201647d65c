"""Where a decoding step's CPU time goes: ``torch.profiler`` over 20 decode steps (after 10 warm-up ones)
of the benchmark's models (scripts/bench_efficiency.py: width 512, the paper's geometry), one table of
the most expensive operators per variant.

    python scripts/profile_decode_step.py lr_only flex xattn
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from flexvlm.models.generation import generation_steps

BENCH = Path(__file__).resolve().parent / "bench_efficiency.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="benchmark variants (bench_efficiency.VARIANTS)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rows", type=int, default=12, help="operators listed per variant")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("bench_efficiency", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = argparse.Namespace(hidden=args.hidden, layers=8, patch=14, prompt_tokens=40, device="cpu",
                                  dtype="float32", attn_backend="sdpa", concentrated_union=bench.TRAINED_UNION)
    for name in args.variants:
        model = bench.build(name, settings).eval()
        batch = bench.prompts(model, 1, settings)
        with torch.no_grad():
            steps = generation_steps(model, batch["prompt_ids"], batch["prompt_mask"], batch["images"],
                                     max_new_tokens=40)
            for _ in range(10):  # the prefill and the first steps: allocations, lazily projected tokens
                next(steps)
            with profile(activities=[ProfilerActivity.CPU]) as profiled:
                for _ in range(20):
                    next(steps)
        print(f"{name}: 20 decode steps\n" + profiled.key_averages().table(sort_by="self_cpu_time_total",
                                                                          row_limit=args.rows))


if __name__ == "__main__":
    main()
