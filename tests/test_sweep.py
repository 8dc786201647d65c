"""Sweeps (flexvlm.sweep): runs crossed from entries, grids and seeds by hand-computed cases; a
two-run grid sweep end to end through submitit's local executor (a few steps per run)."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from flexvlm.sweep import Run, expand, main, parse_args, summarise

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ROOT / "experiments" / "synthetic"


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
    tiny = {"trainer": {"max_steps": 2, "val_check_interval": 2, "callbacks": [{
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "every_n_train_steps": 2}}],
                "logger": {"init_args": {"save_dir": "runs", "name": "tiny"}}},
            "data": {"init_args": {"num_train": 16, "num_val": 8, "num_test": 8, "batch_size": 8, "eval_batch_size": 8}}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    (tmp_path / "base.yaml").write_text((ROOT / "configs" / "synthetic.yaml").read_text())
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
