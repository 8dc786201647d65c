"""Sweeps: experiment configs crossed with grids of overrides and with seeds, run here or on a
cluster, summarised as one table (mean +- std over seeds) and a picture of accuracy against FLOPs.

    python -m flexvlm.sweep experiments/synthetic                      # every YAML in the folder
    python -m flexvlm.sweep experiments/synthetic/flex_attn.yaml experiments/synthetic/xattn.yaml \\
        --grid model.model.init_args.num_sa_layers=1,2 --seeds 0 1 2
    python -m flexvlm.sweep "experiments/synthetic/flex_attention_ratio.yaml+experiments/synthetic/eval/as_random.yaml"
    python -m flexvlm.sweep --file my_sweep.yaml --launcher submitit --cluster slurm \\
        --submitit slurm_partition=gpu timeout_min=120 gpus_per_node=1

An entry is one YAML, a folder of them, or several joined by '+' that stack in that order on top of
``--base``. Each entry runs once per grid point (``--grid key=v1,v2``, crossed) and per seed
(``--seeds``: ``seed_everything`` and the training order, ``data.init_args.shuffle_seed``). An
entry whose files set ``ckpt_path`` is evaluated (``test``) after the training runs, on the
checkpoint of the same grid point and seed (its ``/sweep/`` folder becomes the run's); any other
is trained and tested (``fit --test_after_fit true``). A run's folder is
``<logger save_dir>/<name>/<version>`` as its command line resolves (configs, grid point,
``--extra``), the version naming its grid point and seed; two runs of one sweep may not share one.

A finished run is reused only if it was given the same: each config's content, the grid point, the
seed, the extra arguments, and for an evaluation when its checkpoint was written
(``flexvlm.runs``, which also says what happens to a folder that is not reused, how a folder is
locked while its run trains, and that a run dies with its sweep on Linux, even one killed by
SIGKILL). So an interrupted sweep picks up where it stopped, and a changed config or ``--extra``
trains again; ``--rerun`` trains every run again. Jobs of ``--launcher submitit`` belong to the
scheduler: the lock cannot follow them, and a killed sweep leaves them running. After each run the
FLOPs of a whole greedy generation per sample are counted on the first test batch.

``--file`` reads the same settings from a YAML (``entries``, ``base``, ``grid`` {key: [values]},
``seeds``, ``extra``, ``out``, ``jobs``, ``launcher``, ``cluster``, ``submitit`` {parameter:
value}); options on the command line win. With ``--launcher submitit`` each run is a job of
submitit's executor (``--cluster slurm``, or ``local`` / ``debug`` to try it here), so one sweep
file runs here or on a cluster. Output in ``--out``: ``runs.csv`` (a row per run), ``results.csv``
and ``results.md`` (a row per entry and grid point), ``accuracy_vs_flops.png``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace

from flexvlm.cli import FlexVLMCLI, build
from flexvlm.flops import generation_flops
from flexvlm.lit_module import fit_data_to_model
from flexvlm.plots import accuracy_cost_plot
from flexvlm.run_files import read_run_checkpoint
from flexvlm.runs import config_contents, reuse_or_train, run_command, written
from flexvlm.timing import generation_latency

VERSION = "sweep"  # the version folder of a run without grid point or seed; evaluation entries name it
SUMMARY_COLUMNS = ["config", "mode", "selection", "accuracy", "accuracy_std", "seeds", "hr_fraction",
                   "mflops_per_sample", "train_steps", "wall_s"]
RUN_COLUMNS = ["config", "seed", "mode", "selection", "accuracy", "hr_fraction", "mflops_per_sample",
               "train_steps", "wall_s"]


@dataclass
class Run:
    files: list[str]
    overrides: dict[str, str] = field(default_factory=dict)  # a grid point: dotted key -> value
    seed: int | None = None

    @property
    def config(self) -> str:
        """The entry and grid point: what the summary groups seeds under."""
        label = "+".join(Path(f).stem for f in self.files)
        point = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.overrides.items())
        return f"{label}[{point}]" if point else label

    @property
    def version(self) -> str:
        parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.overrides.items()]
        parts += [f"seed{self.seed}"] if self.seed is not None else []
        return "-".join([VERSION, *parts])

    @property
    def label(self) -> str:
        return self.config + (f" seed {self.seed}" if self.seed is not None else "")

    def checkpoint(self) -> str | None:
        """The ``ckpt_path`` the stacked files set (the last one wins), moved to this run's version."""
        paths = [(yaml.safe_load(Path(f).read_text()) or {}).get("ckpt_path") for f in self.files]
        path = next((p for p in reversed(paths) if p), None)
        return path.replace(f"/{VERSION}/", f"/{self.version}/") if path else None

    def cli_args(self, base: str, extra: list[str]) -> list[str]:
        # absolute paths: jsonargparse changes into a config's folder while it reads it
        args = [a for f in [base, *self.files] for a in ("--config", str(Path(f).resolve()))]
        args += ["--trainer.logger.init_args.version", self.version]
        for key, value in self.overrides.items():
            args += [f"--{key}", value]
        if self.seed is not None:
            args += ["--seed_everything", str(self.seed), "--data.init_args.shuffle_seed", str(self.seed)]
        return args + extra

    def record(self, base: str, extra: list[str]) -> dict:
        """What the run is given, which a finished run must match to be reused
        (``flexvlm.runs.reuse_or_train``): each config's content, the grid point, the seed, the extra
        arguments, and when the checkpoint it evaluates was written (a retrained checkpoint is
        evaluated again)."""
        checkpoint = self.checkpoint()
        return {"configs": config_contents([base, *self.files]), "overrides": self.overrides, "seed": self.seed,
                "extra": list(extra), "checkpoint_written": written(checkpoint) if checkpoint else None}


def expand(entries: list[str], grid: dict[str, list[str]], seeds: list[int]) -> list[Run]:
    """Every entry crossed with every grid point and seed."""
    stacks = []
    for entry in entries:
        path = Path(entry)
        stacks += [[str(p)] for p in sorted(path.glob("*.yaml"))] if path.is_dir() else [entry.split("+")]
    missing = sorted({f for files in stacks for f in files if not Path(f).is_file()})
    if missing:
        raise SystemExit(f"no such config: {', '.join(missing)}")
    # absolute paths: the threads of a sweep read them while another builds a CLI, which changes
    # the working folder
    stacks = [[str(Path(f).absolute()) for f in files] for files in stacks]
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return [Run(files, point, seed) for files in stacks for point in points for seed in (seeds or [None])]


class Launcher:
    """Runs a command here (a subprocess) or as a submitit job; ``jobs`` threads call it at once."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.cwd = os.getcwd()  # read now: a thread building a CLI changes it for a while
        self.executor = None
        if args.launcher == "submitit":
            import submitit  # an optional dependency: pip install 'flexvlm[cluster]'

            self.executor = submitit.AutoExecutor(folder=Path(args.out) / "submitit", cluster=args.cluster)
            self.executor.update_parameters(**args.submitit)

    def run(self, command: list[str], log: Path, lock: int) -> int:
        """Runs ``command`` and waits for it; -> its exit status. A subprocess inherits the run folder's
        ``lock``, so that the lock lasts while it runs; a submitit job runs where it cannot."""
        if self.executor is None:
            return run_command(command, str(log), self.cwd, keep_open=(lock,))
        return self.executor.submit(run_command, command, str(log), self.cwd).result()


class Progress:
    """Prints run i of n with the time left, estimated from the runs that ran."""

    def __init__(self, total: int, jobs: int) -> None:
        self.total, self.jobs, self.done, self.walls = total, jobs, 0, []
        self.lock = threading.Lock()

    def finished(self, label: str, wall: float | None) -> None:
        with self.lock:
            self.done += 1
            if wall is not None:
                self.walls.append(wall)
            left = ""
            if self.walls:
                seconds = statistics.mean(self.walls) * (self.total - self.done) / self.jobs
                left = f", about {int(seconds // 60)} min {int(seconds % 60)} s left"
            print(f"[sweep] run {self.done} of {self.total} done ({label}){left}", flush=True)


CLI_LOCK = threading.Lock()  # building a CLI changes the working folder: one at a time


def execute(run: Run, folder: Path, args: argparse.Namespace, launcher: Launcher, progress: Progress) -> dict:
    """Reuses or trains ``run`` in ``folder``, holding the folder's lock throughout; -> its row."""
    def reuse() -> dict:
        progress.finished(run.label, None)
        return measure(run, args)

    return reuse_or_train(folder, run.record(args.base, args.extra), f"[sweep] {run.label}",
                          lambda lock: train(run, args, launcher, progress, lock), reuse, rerun=args.rerun)


def train(run: Run, args: argparse.Namespace, launcher: Launcher, progress: Progress, lock: int) -> dict:
    checkpoint = run.checkpoint()
    subcommand = "test" if checkpoint else "fit"
    command = [sys.executable, "-m", "flexvlm", subcommand, *run.cli_args(args.base, args.extra)]
    command += ["--ckpt_path", checkpoint] if checkpoint else ["--test_after_fit", "true"]
    # each run keeps its config's thread count (`threads`): results depend on it, so a run of the
    # sweep and the same command run alone give the same figures
    log = Path(args.out) / "logs" / f"{run.config}-{run.version}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] {run.label}: {' '.join(command)}", flush=True)
    start = time.monotonic()
    code = launcher.run(command, log, lock)
    progress.finished(run.label, time.monotonic() - start)
    if code != 0:
        print(f"[sweep] {run.label} FAILED (exit {code}), see {log}", flush=True)
        return {"config": run.config, "seed": run.seed}
    return measure(run, args)


class ConfigOnly(FlexVLMCLI):
    """The CLI that parses a run's arguments and builds nothing: its ``config`` is what the run
    resolves (no thread count set, no seed drawn in this process)."""

    def _set_seed(self) -> None:  # LightningCLI's step that would seed this process
        pass

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def run_cli(run: Run, args: argparse.Namespace, cli_class: type[FlexVLMCLI] = FlexVLMCLI) -> Any:
    """The CLI of the run's arguments built with run=False (the caller holds CLI_LOCK)."""
    with tempfile.TemporaryDirectory() as tmp:
        # ckpt_path belongs to a subcommand: the parser built without one (run=False) rejects it
        stripped = []
        for i, file in enumerate(run.files):
            config = yaml.safe_load(Path(file).read_text()) or {}
            config.pop("ckpt_path", None)
            stripped.append(str(Path(tmp) / f"{i}.yaml"))
            Path(stripped[-1]).write_text(yaml.safe_dump(config))
        return build_quietly(Run(stripped, run.overrides, run.seed).cli_args(args.base, args.extra), cli_class)


def run_folder(run: Run, args: argparse.Namespace) -> Path:
    """<save_dir>/<name>/<version> of the run's logger as its command line resolves it (absolute)."""
    with CLI_LOCK:
        logger = run_cli(run, args, ConfigOnly).config.trainer.logger
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is None or init.get("save_dir") is None or init.get("name") is None:
            raise SystemExit(f"{run.label}: a sweep's runs need a logger with save_dir and name (CSVLogger, "
                             f"TensorBoardLogger), not {logger}")
        return (Path(init.save_dir) / str(init.name) / init.version).absolute()


def run_folders(runs: list[Run], args: argparse.Namespace) -> list[Path]:
    """Each run's folder, checked to be its own."""
    folders = [run_folder(run, args) for run in runs]
    for folder in {f for f in folders if folders.count(f) > 1}:
        shared = [run.label for run, f in zip(runs, folders) if f == folder]
        raise SystemExit(f"runs {', '.join(shared)} would share the folder {folder}: give each entry its own "
                         f"trainer.logger.init_args.name")
    return folders


def measure(run: Run, args: argparse.Namespace) -> dict:
    with CLI_LOCK:
        return _measure(run, args)


def _measure(run: Run, args: argparse.Namespace) -> dict:
    """Metrics of the finished run, and FLOPs per sample of its model on the first test batch.
    Wall time: from the run's saved config (written as it starts) to its metrics (written last)."""
    cli = run_cli(run, args)
    log_dir = Path(cli.trainer.log_dir)
    metrics = json.loads((log_dir / "metrics.json").read_text())
    wall = (log_dir / "metrics.json").stat().st_mtime - (log_dir / "config.yaml").stat().st_mtime
    cost = trained_cost(cli, Path(run.checkpoint() or log_dir / "checkpoints" / "last.ckpt"))
    return {
        "config": run.config, "seed": run.seed, **cost,
        "accuracy": round(metrics.get("test/accuracy", float("nan")), 4),
        "hr_fraction": round(metrics.get("test/hr_fraction", 1.0 if cost["mode"] in ("hd", "xattn") else 0.0), 4),
        "wall_s": round(wall),
    }


def build_quietly(cli_args: list[str], cli_class: type[FlexVLMCLI] = FlexVLMCLI) -> Any:
    """The LightningCLI of a run's arguments, nothing run (its warning that this process has its own
    command line silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build(cli_class, cli_args, run=False)


def trained_on_validation(checkpoint: Path, cli_args: list[str], num: int) -> tuple[Any, dict]:
    """The LightningCLI of a run's configs (``cli_args``) with the checkpoint's weights, nothing run, and
    a batch of the first ``num`` validation questions: what the scripts that look inside a trained model
    start from (``scripts/grounding_hits.py``, ``scripts/selection_union.py``)."""
    cli = build_quietly([*cli_args, "--trainer.logger", "false", "--data.init_args.num_val", str(num),
                         "--data.init_args.eval_batch_size", str(num)])
    cli.model.load_state_dict(read_run_checkpoint(checkpoint)["state_dict"])
    cli.model.eval()
    cli.datamodule.setup("fit")
    return cli, next(iter(cli.datamodule.val_dataloader()))


def trained_cost(cli: Any, checkpoint: Path) -> dict:
    """What a trained run costs: the FLOPs of a whole greedy generation per sample on the first test
    batch, with the checkpoint's weights (attention selection depends on them), and its measured time
    per sample (``flexvlm.timing.generation_latency``: to the first token, and per later token, every
    run generating the model's ``max_new_tokens``); its mode, selection strategy and training steps."""
    state = read_run_checkpoint(checkpoint)
    cli.model.load_state_dict(state["state_dict"])
    model = cli.model.model.eval()
    cli.datamodule.setup("test")
    fit_data_to_model(cli.datamodule, model, cli.model.hparams.max_new_tokens)
    batch = next(iter(cli.datamodule.test_dataloader()))
    flops = generation_flops(model, batch, cli.model.hparams.max_new_tokens, cli.datamodule.tokenizer.eos_id)
    latency = generation_latency(model, batch, cli.model.hparams.max_new_tokens)
    selection = type(model.selection).__name__ if model.selection is not None else "-"
    return {"mode": model.mode, "selection": selection, "mflops_per_sample": round(flops / 1e6, 2),
            **{key: None if ms is None else round(ms, 3) for key, ms in latency.items()},
            "train_steps": state["global_step"]}


def summarise(rows: list[dict]) -> list[dict]:
    """A row per config (entry and grid point): means over its seeds, and the accuracy's sample std."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if "accuracy" in row:  # a failed run has no metrics
            groups.setdefault(row["config"], []).append(row)
    summary = []
    for config, group in groups.items():
        acc = [r["accuracy"] for r in group]
        first = group[0]
        summary.append({
            "config": config, "mode": first["mode"], "selection": first["selection"],
            "accuracy": round(statistics.mean(acc), 4),
            "accuracy_std": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0, "seeds": len(acc),
            "hr_fraction": round(statistics.mean(r["hr_fraction"] for r in group), 4),
            "mflops_per_sample": first["mflops_per_sample"], "train_steps": first["train_steps"],
            "wall_s": round(statistics.mean(r["wall_s"] for r in group)),
        })
    return summary


def write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_tables(rows: list[dict], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    write_csv(rows, RUN_COLUMNS, out / "runs.csv")
    write_csv(summary, SUMMARY_COLUMNS, out / "results.csv")
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in SUMMARY_COLUMNS) + " |" for row in summary]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if summary:
        accuracy_cost_plot(summary).save(out / "accuracy_vs_flops.png")
    return summary


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """["key=v1,v2", ...] -> {key: [v1, v2]}."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"--grid {item!r}: expected key=value1,value2")
        grid[key.lstrip("-")] = values.split(",")
    return grid


def _number(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("entries", nargs="*", help="YAML files, folders of them, or a+b stacks")
    parser.add_argument("--file", help="a sweep YAML with the settings below (the command line wins)")
    parser.add_argument("--base", help="config every entry stacks on (default configs/synthetic.yaml)")
    parser.add_argument("--out", help="folder for the tables, the plot and the logs (default runs/sweep)")
    parser.add_argument("--grid", action="append", default=[], help="key=v1,v2: one run per value, crossed")
    parser.add_argument("--seeds", type=int, nargs="+", help="one run per seed, aggregated as mean +- std")
    parser.add_argument("--jobs", type=int, help="runs at once (evaluations wait for the training runs)")
    parser.add_argument("--launcher", choices=["local", "submitit"], help="subprocesses here, or submitit jobs")
    parser.add_argument("--cluster", help="submitit's cluster: slurm (default), local or debug")
    parser.add_argument("--submitit", nargs="+", default=[], help="executor parameters, name=value")
    parser.add_argument("--rerun", action="store_true",
                        help="train again runs that finished before (each moved to <folder>.old<N> first)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, help="arguments passed to every run")
    args = parser.parse_args(argv)
    file = yaml.safe_load(Path(args.file).read_text()) if args.file else {}
    known = {"entries", "base", "out", "grid", "seeds", "jobs", "launcher", "cluster", "submitit", "extra"}
    if unknown := set(file) - known:
        raise SystemExit(f"{args.file}: unknown keys {sorted(unknown)}; valid: {sorted(known)}")
    defaults = {"base": "configs/synthetic.yaml", "out": "runs/sweep", "jobs": 1, "launcher": "local",
                "cluster": "slurm", "seeds": [], "extra": []}
    for key, default in defaults.items():
        if getattr(args, key) in (None, []):
            setattr(args, key, file.get(key, default))
    args.base, args.out = str(Path(args.base).absolute()), str(Path(args.out).absolute())  # as in expand()
    args.entries = args.entries or file.get("entries", [])
    if not args.entries:
        raise SystemExit("no entries: name configs on the command line or under `entries` in --file")
    args.grid = {**{k: [str(v) for v in vs] for k, vs in file.get("grid", {}).items()}, **parse_grid(args.grid)}
    submitit_params = dict(file.get("submitit", {}))
    for item in args.submitit:
        key, _, value = item.partition("=")
        submitit_params[key] = _number(value)
    args.submitit = submitit_params
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    runs = expand(args.entries, args.grid, args.seeds)
    planned = list(zip(runs, run_folders(runs, args)))
    training = [(run, folder) for run, folder in planned if run.checkpoint() is None]
    evaluation = [(run, folder) for run, folder in planned if run.checkpoint() is not None]
    launcher, progress = Launcher(args), Progress(len(runs), args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda planned_run: execute(*planned_run, args, launcher, progress), training))
    rows += [execute(run, folder, args, launcher, progress) for run, folder in evaluation]
    return write_tables(rows, Path(args.out))


if __name__ == "__main__":
    main()
