"""Sweeps (flexvlm.sweep): runs crossed from entries, grids and seeds by hand-computed cases; a
two-run grid sweep end to end through submitit's local executor; reuse keyed on what a run was
given, the run folder's lock, runs that die with a killed sweep (a few steps per run)."""

import csv
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import flexvlm.sweep as sweep
from flexvlm.runs import LOCK, RECORD, not_reusable
from flexvlm.sweep import expand, main, parse_args, summarise

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "experiments" / "synthetic"
# a tiny run's folder: its logger's save_dir comes from the command line, not from tiny.yaml
TINY_ARGS = ["tiny.yaml", "--base", "base.yaml", "--out", "out", "--extra", "--trainer.enable_progress_bar", "false",
             "--trainer.logger.init_args.save_dir", "elsewhere"]
TINY_FOLDER = Path("elsewhere") / "tiny" / "sweep"


def write_tiny_configs(folder: Path) -> None:
    """base.yaml (the built-in task's) and tiny.yaml (2 steps on 16 samples) in ``folder``."""
    tiny = {"trainer": {"max_steps": 2, "val_check_interval": 2, "callbacks": [{
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "every_n_train_steps": 2}}],
                "logger": {"init_args": {"save_dir": "runs", "name": "tiny"}}},
            "data": {"init_args": {"num_train": 16, "num_val": 8, "num_test": 8, "batch_size": 8, "eval_batch_size": 8}}}
    (folder / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    (folder / "base.yaml").write_text((ROOT / "configs" / "synthetic.yaml").read_text())


def test_entries_cross_grid_points_and_seeds():
    flex, as_random = str(SYNTHETIC / "flex_attention_ratio.yaml"), str(SYNTHETIC / "eval" / "as_random.yaml")
    runs = expand([flex, f"{flex}+{as_random}"], {"model.model.init_args.num_sa_layers": ["1", "2"]}, [0, 1])
    assert len(runs) == 2 * 2 * 2
    first = runs[0]
    assert (first.config, first.version) == ("flex_attention_ratio[num_sa_layers=1]", "sweep-num_sa_layers=1-seed0")
    args = first.cli_args("configs/synthetic.yaml", ["--trainer.max_steps", "5"])
    assert args[-10:] == ["--trainer.logger.init_args.version", "sweep-num_sa_layers=1-seed0",
                          "--model.model.init_args.num_sa_layers", "1", "--seed_everything", "0",
                          "--data.init_args.shuffle_seed", "0", "--trainer.max_steps", "5"]
    assert first.checkpoint() is None
    evaluation = runs[-1]  # the stacked evaluation entry, grid point 2, seed 1: its checkpoint moves with it
    assert evaluation.checkpoint() == "runs/synthetic/flex_attention_ratio/sweep-num_sa_layers=2-seed1/checkpoints/last.ckpt"
    plain = expand([flex], {}, [])[0]
    assert (plain.config, plain.version, plain.seed) == ("flex_attention_ratio", "sweep", None)
    with pytest.raises(SystemExit, match="no such config"):
        expand([flex + "+nope.yaml"], {}, [])


def test_settings_come_from_the_sweep_file_and_the_command_line_wins(tmp_path):
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump({"entries": ["a.yaml"], "grid": {"model.lr": [0.1, 0.2]}, "seeds": [0, 1, 2],
                                    "launcher": "submitit", "submitit": {"timeout_min": 60}}))
    args = parse_args(["--file", str(file), "--seeds", "5", "--grid", "model.zoom=2,3", "--submitit", "gpus_per_node=1"])
    assert args.entries == ["a.yaml"] and args.seeds == [5] and args.launcher == "submitit"
    assert args.grid == {"model.lr": ["0.1", "0.2"], "model.zoom": ["2", "3"]}
    assert args.submitit == {"timeout_min": 60, "gpus_per_node": 1}
    file.write_text(yaml.safe_dump({"entries": ["a.yaml"], "seed": [0]}))
    with pytest.raises(SystemExit, match="unknown keys \\['seed'\\]"):
        parse_args(["--file", str(file)])
    with pytest.raises(SystemExit, match="key=value1,value2"):
        parse_args(["a.yaml", "--grid", "model.lr"])


def test_summary_means_over_seeds():
    row = {"mode": "flex", "selection": "AttentionSelection", "mflops_per_sample": 2.0, "train_steps": 5}
    rows = [{**row, "config": "f", "accuracy": a, "hr_fraction": h, "wall_s": w}
            for a, h, w in [(0.5, 0.1, 10), (0.7, 0.3, 20)]] + [{"config": "failed", "seed": 0}]
    (summary,) = summarise(rows)
    assert summary["accuracy"] == pytest.approx(0.6) and summary["accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert summary["hr_fraction"] == pytest.approx(0.2) and summary["wall_s"] == 15 and summary["seeds"] == 2


def test_a_grid_sweep_runs_through_submitit_and_writes_its_tables_and_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the runs' logger folder is relative
    write_tiny_configs(tmp_path)
    summary = main(["tiny.yaml", "--base", "base.yaml", "--out", "out", "--grid", "model.model.init_args.num_sa_layers=1,2",
                    "--launcher", "submitit", "--cluster", "local", "--extra", "--trainer.enable_progress_bar", "false"])
    assert [row["config"] for row in summary] == ["tiny[num_sa_layers=1]", "tiny[num_sa_layers=2]"]
    for n in (1, 2):
        folder = tmp_path / "runs" / "tiny" / f"sweep-num_sa_layers={n}"
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["model"]["model"]["init_args"]["num_sa_layers"] == n
        metrics = json.loads((folder / "metrics.json").read_text())
        row = next(r for r in summary if r["config"] == f"tiny[num_sa_layers={n}]")
        assert row["accuracy"] == round(metrics["test/accuracy"], 4) and row["train_steps"] == 2
        assert row["mflops_per_sample"] > 0
    with open(tmp_path / "out" / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert Image.open(tmp_path / "out" / "accuracy_vs_flops.png").size == (720, 480)
    assert list((tmp_path / "out" / "submitit").glob("*_result.pkl"))  # the runs went through submitit


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A folder where a sweep of tiny.yaml ran (``TINY_ARGS``): its run finished in ``TINY_FOLDER``."""
    folder = tmp_path_factory.mktemp("finished")
    write_tiny_configs(folder)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        main(TINY_ARGS)
    return folder


@pytest.fixture
def copied_sweep(finished_sweep, tmp_path, monkeypatch):
    """A copy of ``finished_sweep`` to change, as the working folder; its runs' launches are listed in
    ``launched`` rather than made."""
    copy = tmp_path / "sweep"
    shutil.copytree(finished_sweep, copy)
    monkeypatch.chdir(copy)
    return copy


@pytest.fixture
def launched(monkeypatch):
    commands = []
    monkeypatch.setattr(sweep, "run_command", lambda command, *args, **kwargs: commands.append(command) or 1)
    return commands


def test_a_finished_run_whose_save_dir_comes_from_extra_is_reused(copied_sweep, launched, capsys):
    (row,) = main(TINY_ARGS)
    assert launched == []
    assert "with the same arguments, reused" in capsys.readouterr().out
    metrics = json.loads((TINY_FOLDER / "metrics.json").read_text())
    assert row["accuracy"] == round(metrics["test/accuracy"], 4) and row["train_steps"] == 2


def test_a_finished_run_is_reused_only_for_the_same_config_contents(copied_sweep):
    run = expand(["tiny.yaml"], {}, [])[0]
    args = parse_args(TINY_ARGS)
    assert not_reusable(TINY_FOLDER, run.record(args.base, args.extra), rerun=False) is None
    tiny = Path("tiny.yaml")
    tiny.write_text("# a comment changes nothing\n" + tiny.read_text())
    assert not_reusable(TINY_FOLDER, run.record(args.base, args.extra), rerun=False) is None
    tiny.write_text(tiny.read_text().replace("max_steps: 2", "max_steps: 4"))
    reason = not_reusable(TINY_FOLDER, run.record(args.base, args.extra), rerun=False)
    assert "configs.1.trainer.max_steps: 2 -> 4" in reason
    assert "rerun" in not_reusable(TINY_FOLDER, run.record(args.base, args.extra), rerun=True)


def test_changed_extra_arguments_train_again_and_the_old_run_is_kept(copied_sweep, launched, capsys):
    main([*TINY_ARGS, "--trainer.max_steps", "4"])
    (command,) = launched
    assert command[-4:-2] == ["--trainer.max_steps", "4"]
    out = capsys.readouterr().out
    assert "finished with other arguments (extra: " in out and "'--trainer.max_steps', '4'" in out
    assert f"moved to {(TINY_FOLDER.parent / 'sweep.old1').absolute()}, training again" in out
    old = torch.load(TINY_FOLDER.parent / "sweep.old1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert old["global_step"] == 2 and (TINY_FOLDER.parent / "sweep.old1" / "metrics.json").is_file()
    assert sorted(p.name for p in TINY_FOLDER.iterdir()) == sorted([RECORD, LOCK])  # the new run starts clean
    assert json.loads((TINY_FOLDER / RECORD).read_text())["extra"][-2:] == ["--trainer.max_steps", "4"]


def test_a_sweep_waits_for_a_run_folder_another_process_holds(copied_sweep, launched, capsys):
    """Another sweep trains the run (it holds the folder's lock, no metrics yet): this one neither
    trains it at once nor skips it, but waits, and reuses the run once that has finished."""
    metrics = TINY_FOLDER / "metrics.json"
    metrics.rename("metrics.json")
    lock = os.open(TINY_FOLDER / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    rows = []
    waiting = threading.Thread(target=lambda: rows.extend(main(TINY_ARGS)))
    waiting.start()
    out = ""
    while waiting.is_alive() and "waiting for it to end" not in out:
        time.sleep(0.2)
        out += capsys.readouterr().out
    assert "another process holds" in out and launched == []
    Path("metrics.json").rename(metrics)  # the other sweep's run finishes and lets go of the folder
    os.close(lock)
    waiting.join(timeout=60)
    assert "with the same arguments, reused" in capsys.readouterr().out
    assert launched == [] and rows[0]["train_steps"] == 2


def test_runs_of_one_sweep_may_not_share_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_tiny_configs(tmp_path)
    (tmp_path / "same_name.yaml").write_text((tmp_path / "tiny.yaml").read_text())
    with pytest.raises(SystemExit, match="runs tiny, same_name would share the folder .*runs/tiny/sweep"):
        main(["tiny.yaml", "same_name.yaml", "--base", "base.yaml"])


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError):
            continue  # gone meanwhile
        if parent == pid:
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="runs die with their sweep on Linux only")
def test_a_run_dies_with_its_sweep_killed_by_sigkill(tmp_path):
    write_tiny_configs(tmp_path)
    command = [sys.executable, "-m", "flexvlm.sweep", *TINY_ARGS, "--trainer.max_steps", "100000"]
    parent = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not runs and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.2)
            runs = [pid for pid in _children(parent.pid) if b"flexvlm" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert runs, "the sweep started no run"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while _alive(runs[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(runs[0]), "the run outlived its sweep by more than 5 s"
    finally:
        parent.kill()
        for pid in runs:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
