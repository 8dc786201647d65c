"""Run a set of experiment configs and write one results table (CSV and Markdown).

    python scripts/sweep.py experiments/synthetic                      # every YAML in the folder
    python scripts/sweep.py experiments/synthetic/flex_attn.yaml experiments/synthetic/xattn.yaml
    python scripts/sweep.py "experiments/synthetic/flex_attention_ratio.yaml+experiments/synthetic/eval/as_random.yaml"

Each entry is one YAML, or several joined by '+' that stack in that order on top of ``--base``.
An entry whose files set ``ckpt_path`` is evaluated (``test``); any other is trained and then
tested (``fit --test_after_fit true``). Every run goes into ``<logger save_dir>/<name>/sweep``,
so an evaluation entry can name a checkpoint of a training entry run before it. After each run the
script counts the FLOPs of a whole greedy generation per sample on the first test batch. A run
whose folder already holds its metrics is not trained again (unless ``--rerun``), so an
interrupted sweep picks up where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from flexvlm.cli import main as cli_main
from flexvlm.flops import generation_flops

VERSION = "sweep"  # every run's folder is <save_dir>/<name>/sweep: evaluation entries name checkpoints there
COLUMNS = ["config", "mode", "selection", "accuracy", "hr_fraction", "mflops_per_sample", "train_steps", "wall_s"]


def expand(entries: list[str]) -> list[list[str]]:
    runs = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            runs += [[str(p)] for p in sorted(path.glob("*.yaml"))]
        else:
            runs.append(entry.split("+"))
    for files in runs:
        for file in files:
            if not Path(file).is_file():
                raise SystemExit(f"no such config: {file}")
    return runs


def checkpoint_of(files: list[str]) -> str | None:
    """The ``ckpt_path`` the stacked files set (the last one wins), if any."""
    paths = [(yaml.safe_load(Path(f).read_text()) or {}).get("ckpt_path") for f in files]
    return next((p for p in reversed(paths) if p), None)


def is_evaluation(files: list[str]) -> bool:
    return checkpoint_of(files) is not None


def cli_args(base: str, files: list[str], extra: list[str]) -> list[str]:
    # absolute paths: jsonargparse changes into a config's folder while it reads it
    args = ["--config", str(Path(base).resolve())]
    for file in files:
        args += ["--config", str(Path(file).resolve())]
    return args + ["--trainer.logger.init_args.version", VERSION, *extra]


def run_folder(base: str, files: list[str]) -> Path:
    """<save_dir>/<name>/sweep of the stacked configs' logger."""
    logger: dict = {}
    for file in [base, *files]:
        config = yaml.safe_load(Path(file).read_text()) or {}
        logger.update(config.get("trainer", {}).get("logger", {}).get("init_args", {}))
    return Path(logger["save_dir"]) / logger["name"] / VERSION


def run(files: list[str], args: argparse.Namespace) -> dict:
    label = "+".join(Path(f).stem for f in files)
    folder = run_folder(args.base, files)
    if (folder / "metrics.json").is_file() and not args.rerun:
        print(f"[sweep] {label}: finished before in {folder}, reused (--rerun trains again)", flush=True)
        return summarise(files, label, args)
    subcommand = "test" if is_evaluation(files) else "fit"
    command = [sys.executable, "-m", "flexvlm", subcommand, *cli_args(args.base, files, args.extra)]
    if subcommand == "fit":
        command += ["--test_after_fit", "true"]
    # each run keeps its config's thread count (`threads`): results depend on it, so a run of the
    # sweep and the same command run alone give the same figures
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = Path(args.out) / "logs" / f"{label}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] {label}: {' '.join(command)}", flush=True)
    with open(log, "w") as f:
        code = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        print(f"[sweep] {label} FAILED (exit {code}), see {log}", flush=True)
        return {"config": label}
    return summarise(files, label, args)


SUMMARY_LOCK = threading.Lock()  # building a CLI changes the working folder: one at a time


def summarise(files: list[str], label: str, args: argparse.Namespace) -> dict:
    with SUMMARY_LOCK:
        return _summarise(files, label, args)


def _summarise(files: list[str], label: str, args: argparse.Namespace) -> dict:
    """Metrics of the finished run, and FLOPs per sample of its model on the first test batch.
    Wall time: from the run's saved config (written as it starts) to its metrics (written last)."""
    ckpt = checkpoint_of(files)
    with tempfile.TemporaryDirectory() as tmp:
        # ckpt_path belongs to a subcommand: the parser built without one (run=False) rejects it
        stripped = []
        for i, file in enumerate(files):
            config = yaml.safe_load(Path(file).read_text()) or {}
            config.pop("ckpt_path", None)
            stripped.append(Path(tmp) / f"{i}.yaml")
            stripped[-1].write_text(yaml.safe_dump(config))
        with warnings.catch_warnings():  # LightningCLI warns that this script has its own argv
            warnings.simplefilter("ignore")
            cli = cli_main(cli_args(args.base, [str(p) for p in stripped], args.extra), run=False)
    log_dir = Path(cli.trainer.log_dir)
    metrics = json.loads((log_dir / "metrics.json").read_text())
    wall = (log_dir / "metrics.json").stat().st_mtime - (log_dir / "config.yaml").stat().st_mtime
    ckpt = ckpt or log_dir / "checkpoints" / "last.ckpt"
    cli.model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"])
    cli.datamodule.setup("test")
    batch = next(iter(cli.datamodule.test_dataloader()))
    model = cli.model.model.eval()
    flops = generation_flops(model, batch, cli.model.hparams.max_new_tokens, cli.datamodule.tokenizer.eos_id)
    selection = type(model.selection).__name__ if model.selection is not None else "-"
    steps = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    return {
        "config": label, "mode": model.mode, "selection": selection,
        "accuracy": round(metrics.get("test/accuracy", float("nan")), 4),
        "hr_fraction": round(metrics.get("test/hr_fraction", 1.0 if model.mode in ("hd", "xattn") else 0.0), 4),
        "mflops_per_sample": round(flops / 1e6, 2), "train_steps": steps, "wall_s": round(wall),
    }


def write_tables(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("entries", nargs="+", help="YAML files, folders of them, or a+b stacks")
    parser.add_argument("--base", default="configs/synthetic.yaml", help="config every entry stacks on")
    parser.add_argument("--out", default="runs/sweep", help="folder for results.csv / results.md and logs")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once (evaluations wait for them)")
    parser.add_argument("--rerun", action="store_true", help="train again runs that finished before")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="arguments passed to every run")
    args = parser.parse_args()
    runs = expand(args.entries)
    training = [files for files in runs if not is_evaluation(files)]
    evaluation = [files for files in runs if is_evaluation(files)]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda files: run(files, args), training))
    rows += [run(files, args) for files in evaluation]
    write_tables(rows, Path(args.out))


if __name__ == "__main__":
    main()
