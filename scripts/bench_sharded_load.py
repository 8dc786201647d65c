"""Host memory of a sharded load: two CPU processes (gloo) build the built-in model, widened, on the
meta device and load it from weight files as ``--empty_init true`` under Lightning's
``ModelParallelStrategy`` does (``FlexVLMModule.configure_model``: FSDP2 shards, each process
materialises and loads its shard).

    python scripts/bench_sharded_load.py --json docs/bench/sharded-load.json   # ~600 MB files
    python scripts/bench_sharded_load.py --hidden 384 --formats torch          # ~80 MB, one format

The weights of one randomly initialised model are saved twice: as a run's checkpoint (a
``torch.save`` file, read through ``--model.init_from``) and the decoder as a safetensors file
(read through ``PretrainedWeights(llm=...)``). Each format is loaded by two fresh processes; each
reports for its ``configure_model``:

- anonymous growth: the peak of its anonymous memory (RssAnon, polled every millisecond) above
  where it stood before: what the kernel cannot give back. Its budget: the process's shard of the
  parameters plus the largest tensor (one that a loader transforms whole, e.g. a concatenation).
- peak growth: the peak RSS (VmHWM, reset first) above the RSS before, which also counts the pages
  of the weight files mapped into the process (clean page cache: shared by the processes of a
  machine and dropped under memory pressure): its part of each tensor, and what the kernel read
  ahead around it.

The loaded weights are checked against the saved ones (the sum of every parameter).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh

from flexvlm.cli import main as flexvlm_cli
from flexvlm.sharding import full_value

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20
FORMATS = ("torch", "safetensors")


def model_args(hidden: int, layers: int) -> list[str]:
    """The built-in config's model with a decoder of this width and depth (4 x hidden MLP)."""
    llm = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_layers": layers, "num_heads": 8}
    return ["--config", str(ROOT / "configs" / "synthetic.yaml"), "--trainer.logger", "false",
            "--trainer.accelerator", "cpu", "--threads", "1",
            "--model.model.init_args.llm_overrides", json.dumps(llm)]


def load_args(fmt: str, folder: Path) -> list[str]:
    """Where each format's weights come in: a run's checkpoint, or the decoder's pretrained file."""
    if fmt == "torch":
        return ["--model.init_from", str(folder / "run.ckpt")]
    pretrained = {"class_path": "flexvlm.architectures.llava15.PretrainedWeights",
                  "init_args": {"llm": str(folder / "llm.safetensors")}}
    return ["--model.model.init_args.pretrained", json.dumps(pretrained)]


def parameter_sum(module: torch.nn.Module) -> float:
    return float(sum(full_value(p.detach().double().sum()) for p in module.parameters()))


def write_weights(args: argparse.Namespace, folder: Path) -> dict:
    """One random model's weights in both formats; their sizes, largest tensor and parameter sums."""
    module = flexvlm_cli(model_args(args.hidden, args.layers), run=False).model
    state = module.state_dict()
    torch.save({"state_dict": state}, folder / "run.ckpt")
    # safetensors keeps no tensor twice: the decoder's own copy of every tensor
    save_file({name: tensor.clone() for name, tensor in module.model.llm.state_dict().items()},
              folder / "llm.safetensors")
    return {"file_mib": {"torch": (folder / "run.ckpt").stat().st_size / MiB,
                         "safetensors": (folder / "llm.safetensors").stat().st_size / MiB},
            "largest_tensor_mib": max(t.nbytes for t in state.values()) / MiB,
            "parameter_sum": {"torch": parameter_sum(module.model), "safetensors": parameter_sum(module.model.llm)}}


# -- one process of a load ------------------------------------------------------------------------
def status_kib(field: str) -> int:
    """A field of /proc/self/status, in KiB (VmRSS, VmHWM, RssAnon)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


class AnonymousPeak(threading.Thread):
    """The highest RssAnon seen while it runs, polled every millisecond."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib, self.done = status_kib("RssAnon"), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.001):
            self.peak_kib = max(self.peak_kib, status_kib("RssAnon"))

    def stop(self) -> int:
        self.done.set()
        self.join()
        return max(self.peak_kib, status_kib("RssAnon"))


def held_mib(module: torch.nn.Module) -> float:
    """The bytes of the parameters this process holds: its shards."""
    return sum(p.to_local().nbytes for p in module.parameters()) / MiB


def worker(args: argparse.Namespace) -> None:
    """Process ``args.rank`` of a 2-process FSDP2 load of ``args.format``: its record into ``args.out``."""
    folder = Path(args.folder)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2)
    module = flexvlm_cli([*model_args(args.hidden, args.layers), "--empty_init", "true",
                          *load_args(args.format, folder)], run=False).model
    # the mesh that ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) hands configure_model
    module._device_mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM starts again from the RSS of now
    before, anonymous_before, anonymous = status_kib("VmRSS"), status_kib("RssAnon"), AnonymousPeak()
    anonymous.start()
    module.configure_model()
    peak, anonymous_peak = status_kib("VmHWM"), anonymous.stop()
    loaded = module.model if args.format == "torch" else module.model.llm
    record = {"rank": args.rank, "rss_before_mib": before / 1024, "peak_growth_mib": (peak - before) / 1024,
              "anonymous_growth_mib": (anonymous_peak - anonymous_before) / 1024, "shard_mib": held_mib(module),
              "parameter_sum": parameter_sum(loaded)}
    Path(args.out).write_text(json.dumps(record))
    # neither process tears the group down while the other is still in a collective (under load, gloo
    # then aborts the slower process: "terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


# -- the benchmark -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sharded_load(args: argparse.Namespace, fmt: str, folder: Path) -> list[dict]:
    """Both processes' records of one format's load."""
    port, outs = free_port(), [folder / f"{fmt}-rank{rank}.json" for rank in (0, 1)]
    common = [sys.executable, __file__, "--worker", "--format", fmt, "--folder", str(folder), "--port", str(port),
              "--hidden", str(args.hidden), "--layers", str(args.layers)]
    workers = [subprocess.Popen([*common, "--rank", str(rank), "--out", str(out)]) for rank, out in enumerate(outs)]
    try:
        for process in workers:
            if process.wait(timeout=args.timeout) != 0:
                raise RuntimeError(f"a {fmt} load process failed (exit {process.returncode})")
    finally:  # a failed process leaves the other waiting in a collective
        for process in workers:
            process.kill()
    return [json.loads(out.read_text()) for out in outs]


def benchmark(args: argparse.Namespace) -> dict:
    """The weights written once, then each format's load: sizes, and each process's record with its
    budget and whether it loaded the weights saved."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)
        result = {"hidden": args.hidden, "layers": args.layers, "torch": torch.__version__,
                  **write_weights(args, folder)}
        for fmt in args.formats:
            saved = result["parameter_sum"][fmt]
            records = sharded_load(args, fmt, folder)
            for record in records:
                record["budget_mib"] = record["shard_mib"] + result["largest_tensor_mib"]
                record["weights_match"] = abs(record.pop("parameter_sum") - saved) <= 1e-6 * (1 + abs(saved))
            result[f"load_{fmt}"] = records
    return result


def report(result: dict) -> str:
    lines = [f"decoder width {result['hidden']}, {result['layers']} layers; largest tensor "
             f"{result['largest_tensor_mib']:.1f} MiB",
             "| format | file | process | RSS before | anonymous growth | budget (shard + largest) | peak growth | "
             "weights |",
             "|---|---|---|---|---|---|---|---|"]
    for fmt in FORMATS:
        for r in result.get(f"load_{fmt}", []):
            lines.append(f"| {fmt} | {result['file_mib'][fmt]:.0f} | {r['rank']} | {r['rss_before_mib']:.0f} | "
                         f"{r['anonymous_growth_mib']:.0f} | {r['budget_mib']:.0f} | {r['peak_growth_mib']:.0f} | "
                         f"{'match' if r['weights_match'] else 'DIFFER'} |")
    lines.append("(MiB)")
    return "\n".join(lines)


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="decoder width (1024: ~600 MB of weights)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--tmp", help="where the weight files go (default: the system's temporary folder)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a load may take")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("--format", "--folder", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--rank", "--port"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = arguments()
    if args.worker:
        worker(args)
        return
    result = benchmark(args)
    print(report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
