"""Bad samples over a run's life: skipped.jsonl holds each once (epochs, a resumed run), and the
data check on the command line prints only its report."""

import json
import subprocess
import sys
import warnings

import pytest

from flexvlm.cli import main
from flexvlm.run_files import SkipLog, read_lines

from test_faults import _llava_run, _write_config

BAD = {"where": "data.json entry 2", "sample_id": "s2", "what": "cannot decode image img/2.jpg", "fix": "replace it"}
OTHER = {**BAD, "where": "data.json entry 5", "sample_id": "s5"}


def test_skip_log_writes_and_warns_about_a_sample_once_per_stage_also_after_a_resume(tmp_path):
    log = SkipLog(tmp_path)
    with pytest.warns(UserWarning, match=r"train: skipped bad sample data.json entry 2 \(id s2\)"):
        log.add("train", [BAD])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # met again (the next epoch): neither written nor warned about
        log.add("train", [BAD])
    log.add("val", [BAD], warn=False)  # another stage: a line of its own
    SkipLog(tmp_path).add("train", [BAD, OTHER], warn=False)  # a resumed run reads what is there
    records = read_lines(tmp_path / "skipped.jsonl")
    assert [(r["stage"], r["sample_id"]) for r in records] == [("train", "s2"), ("val", "s2"), ("train", "s5")]
    assert records[0] == {"stage": "train", **BAD}


def test_two_epochs_and_a_resumed_fit_write_each_bad_sample_once(tmp_path):
    """60 samples in batches of 20, three of them bad (s5, s20, s40): 3 steps an epoch."""
    config = _write_config(tmp_path / "run.yaml", _llava_run(tmp_path))
    run = tmp_path / "run" / "v"
    with pytest.warns(UserWarning):
        main(["fit", "--config", config, "--trainer.max_steps", "6"])  # two epochs
        main(["fit", "--config", config, "--trainer.max_steps", "9",
              "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    train = [r["sample_id"] for r in read_lines(run / "skipped.jsonl") if r["stage"] == "train"]
    assert sorted(train) == ["s20", "s40", "s5"]
    assert json.loads((run / "metrics.json").read_text())["skipped/train"] == 3


def test_check_data_on_the_command_line_prints_no_lightning_warning_about_its_arguments(tmp_path):
    config = _write_config(tmp_path / "good.yaml", _llava_run(tmp_path, count=4, bad=False))
    done = subprocess.run([sys.executable, "-m", "flexvlm", "check-data", "--config", config],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "0 errors, 0 warnings in 8 samples" in done.stdout
    output = done.stdout + done.stderr
    assert "args parameter" not in output and "command line arguments" not in output
