"""Faults at run level, on tiny runs: bad samples in a LLaVA-format training set and its test pass,
the data check on the command line, a diverging loss, metrics that are not numbers, checkpoints
written atomically into a folder checked at startup, an evaluation restarted after a crash, a
resumed run's log."""

import csv
import errno
import re
import subprocess
import json
import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from flexvlm.cli import main
from flexvlm.data.check import main as check_data
from flexvlm.models.vision import OpenClipBackbone
from flexvlm.run_files import AtomicCheckpointIO, update_metrics_file
from flexvlm.weights import read_state_dict

from test_cli import BASE, ROOT, Crash, _small
from test_data_tokenizer import write_hf_tokenizer
from test_evaluation import _reader, _textvqa, _tiny_run_config
from test_evaluation import tokenizer_dir  # noqa: F401 (a fixture: a word-level tokenizer)

TURNS = [{"from": "human", "value": "<image>\nWhat is the colour of the sky?"}, {"from": "gpt", "value": "It is blue"}]


def _llava_run(root: Path, count: int = 60, bad: bool = True) -> dict:
    """A LLaVA-format folder of ``count`` samples (ids s0, s1, ...), with 3 bad ones if ``bad``: s5's
    image is missing, s20's is cut short, s40 has no conversation; and a tiny flex model's run config."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    entries = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(root / "img" / f"{i}.jpg")
        entries.append({"id": f"s{i}", "image": f"{i}.jpg", "conversations": TURNS})
    if bad:
        (root / "img" / "5.jpg").unlink()
        (root / "img" / "20.jpg").write_bytes((root / "img" / "20.jpg").read_bytes()[:300])
        entries[40]["conversations"] = []
    (root / "data.json").write_text(json.dumps(entries))
    write_hf_tokenizer(root / "tok")
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 3, "default_root_dir": str(root),
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "run", "version": "v"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"save_last": True}}],
        },
        "model": {
            "model": {"backbone": {"class_path": "flexvlm.models.vision.PatchMLPBackbone",
                                   "init_args": {"image_size": 16, "patch_size": 8, "embed_dim": 16, "hidden_dim": 16}},
                      "llm": "tiny", "mode": "flex", "num_sa_layers": 1,
                      "llm_overrides": {"vocab_size": 160, "hidden_size": 32, "intermediate_size": 64,
                                        "num_layers": 2, "num_heads": 2}},
            "max_new_tokens": 2,
        },
        "data": {"class_path": "flexvlm.data.datamodule.LlavaDataModule",
                 "init_args": {"train_json": str(root / "data.json"), "test_json": str(root / "data.json"),
                               "image_folder": str(root / "img"), "tokenizer_path": str(root / "tok"),
                               "batch_size": 20, "eval_batch_size": 30}},
    }


def _write_config(path: Path, config: dict) -> str:
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_llava_run_with_3_bad_samples_in_60_completes_reports_them_and_answers_every_question(tmp_path, capsys):
    config = _write_config(tmp_path / "run.yaml", _llava_run(tmp_path))
    with pytest.warns(UserWarning, match=r"skipped bad sample .*data.json entry 20 \(id s20\): cannot decode image"):
        main(["fit", "--config", config, "--test_after_fit", "true"])
    run = tmp_path / "run" / "v"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3  # a whole epoch
    skipped = _lines(run / "skipped.jsonl")
    for stage in ("train", "test"):
        assert sorted(r["sample_id"] for r in skipped if r["stage"] == stage) == ["s20", "s40", "s5"]
    reasons = {r["sample_id"]: r["what"] for r in skipped}
    assert reasons["s5"].startswith("image not found") and "conversations" in reasons["s40"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["skipped/train"], metrics["num_questions"], metrics["num_skipped"]) == (3, 57, 3)
    answers = _lines(run / "answers.jsonl")
    assert sorted(r["question_id"] for r in answers) == sorted(f"s{i}" for i in range(60))
    assert {r["question_id"] for r in answers if "error" in r} == {"s5", "s20", "s40"}
    out = capsys.readouterr().out
    assert "bad samples left out: 3 in training" in out and "cover 57 of 60 questions; 3 could not be asked" in out


def test_check_data_lists_every_problem_and_fails(tmp_path, capsys):
    config = _write_config(tmp_path / "run.yaml", _llava_run(tmp_path))
    assert check_data(["--config", config]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("error")]
    assert len(lines) == 6  # the 3 bad samples, in the train and the test split
    assert any("data.json entry 20 (id s20): cannot decode image" in line for line in lines)
    assert "6 errors, 0 warnings in 120 samples (train 60, test 60)" in out

    good = _llava_run(tmp_path / "good", count=4, bad=False)
    assert check_data(["--config", _write_config(tmp_path / "good.yaml", good)]) == 0
    assert "0 errors, 0 warnings in 8 samples" in capsys.readouterr().out


@pytest.mark.parametrize("skips", [0, 2])
def test_diverging_loss_stops_naming_the_step_and_no_checkpoint_holds_nan(skips, tmp_path):
    every_step = tmp_path / "every_step.yaml"
    every_step.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                          "      init_args:\n        save_last: true\n        every_n_train_steps: 1\n")
    args = ["fit", "--config", BASE, *_small(tmp_path), "--trainer.max_steps", "8", "--model.lr", "1e4",
            "--model.nonfinite_loss_skips", str(skips)]
    if not skips:  # a checkpoint every step: the weights' check stops it if the loss check has not
        args += ["--config", str(every_step)]
    with pytest.raises(FloatingPointError, match=r"not finite .*at step \d+") as error:
        main(args)
    if skips:
        assert f"after {skips} such batches skipped" in str(error.value)
    last = tmp_path / "run" / "v" / "checkpoints" / "last.ckpt"
    if last.exists():
        state = torch.load(last, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_metrics_file_is_strict_json_with_null_and_a_note(tmp_path):
    update_metrics_file(tmp_path, {"test/loss": float("nan"), "test/accuracy": 0.5, "skipped/train": 2})
    metrics = update_metrics_file(tmp_path, {"test/hr_fraction": float("inf")})
    text = (tmp_path / "metrics.json").read_text()
    strict = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert strict == metrics and strict["test/loss"] is None and strict["test/accuracy"] == 0.5
    assert set(strict["notes"]) == {"test/loss", "test/hr_fraction"} and "nan" in strict["notes"]["test/loss"]


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed mid-write")


def test_checkpoint_written_atomically_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))  # another filesystem, as far as the writer cares
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises(RuntimeError, match="killed mid-write"):
        io.save_checkpoint({"step": 2, "bad": _Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert not (tmp_path / "elsewhere").exists()


def test_image_size_the_model_does_not_take_fails_at_startup_naming_the_key(tmp_path):
    """A backbone without an image_size argument (CLIP) is not linked: the size is checked instead."""
    cli = main(["--config", BASE, *_small(tmp_path)], run=False)
    cli.datamodule.hparams.image_size = 48
    with pytest.raises(ValueError, match=r"images are 48 px \(data.init_args.image_size\), the model takes 96"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_unwritable_checkpoint_folder_fails_at_startup(tmp_path):
    (tmp_path / "a_file").write_text("")
    cli = main(["--config", BASE, *_small(tmp_path), "--trainer.max_steps", "2"], run=False)
    cli.trainer.checkpoint_callback.dirpath = str(tmp_path / "a_file" / "checkpoints")
    with pytest.raises(PermissionError, match=r"the checkpoint folder .*a_file/checkpoints is not writable"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def test_restarted_test_continues_after_the_answered_questions(tmp_path, tokenizer_dir):  # noqa: F811
    reader_args = _textvqa(tmp_path / "textvqa")
    data = json.loads(Path(reader_args["annotation_file"]).read_text())
    data["data"] += [{**data["data"][i % 2], "question_id": i} for i in range(3, 7)]
    Path(reader_args["annotation_file"]).write_text(json.dumps(data))
    args = ["test", "--config", str(_tiny_run_config(tmp_path)), "--data", json.dumps({
        "class_path": "flexvlm.data.benchmark_datamodule.BenchmarkDataModule",
        "init_args": {"benchmark": json.loads(_reader("TextVQA", reader_args)), "tokenizer_path": str(tokenizer_dir),
                      "eval_batch_size": 1}}), "--model.max_new_tokens", "2"]

    cli = main(args[1:], run=False)
    cli.trainer.callbacks.append(CrashInTest(at_batch=3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
    run = tmp_path / "run" / "v"
    assert [r["question_id"] for r in _lines(run / "answers.jsonl")] == ["1", "2", "3"]  # flushed as they came

    main(args)
    records = _lines(run / "answers.jsonl")
    assert sorted(r["question_id"] for r in records) == ["1", "2", "3", "4", "5", "6"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_questions"] == 6
    assert metrics["test/accuracy"] == pytest.approx(sum(r["score"] for r in records) / 6)

    with pytest.warns(UserWarning, match="came from other weights or settings: this test starts over"):
        main([*args, "--model.max_new_tokens", "3"])  # other settings: other answers
    assert len(_lines(run / "answers.previous.jsonl")) == 6 and len(_lines(run / "answers.jsonl")) == 6


class CrashInTest(L.Callback):
    def __init__(self, at_batch: int) -> None:
        self.at_batch = at_batch

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.at_batch:
            raise RuntimeError("simulated crash")


def test_resumed_run_continues_in_its_own_folder(tmp_path, recwarn):
    every_2_steps = tmp_path / "every_2_steps.yaml"
    every_2_steps.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                             "      init_args:\n        save_last: true\n        every_n_train_steps: 2\n")
    args = ["--config", BASE, "--config", str(every_2_steps), *_small(tmp_path), "--trainer.max_steps", "4",
            "--trainer.log_every_n_steps", "1", "--trainer.logger.init_args.version", "null"]
    cli = main(args, run=False)
    cli.trainer.callbacks.append(Crash(at_step=3))  # after the checkpoint of step 2, mid-epoch
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.logger.save()  # what the crashed run had logged
    run = tmp_path / "run" / "version_0"
    main(["fit", *args, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])

    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["version_0"]  # no second folder
    steps = {name: [int(r["step"]) for r in csv.DictReader(open(run / name)) if r.get("train/loss")]
             for name in ("metrics.before_step_2.csv", "metrics.csv")}
    assert steps == {"metrics.before_step_2.csv": [0, 1], "metrics.csv": [2, 3]}  # each step once
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def _checkpoint_every(tmp_path: Path, steps: int) -> str:
    config = tmp_path / f"checkpoint_every_{steps}_steps.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                      f"      init_args:\n        save_last: true\n        every_n_train_steps: {steps}\n")
    return str(config)


def test_last_checkpoint_holds_the_final_step_when_the_interval_does_not_divide_it(tmp_path):
    cli = main(["fit", "--config", BASE, "--config", _checkpoint_every(tmp_path, 3), *_small(tmp_path),
                "--trainer.max_steps", "5"])
    state = torch.load(tmp_path / "run" / "v" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 5
    for name, tensor in cli.model.state_dict().items():
        assert torch.equal(state["state_dict"][name], tensor), name


def test_answer_source_is_the_same_for_the_same_weights_and_settings_built_twice(tmp_path):
    """What a restarted test compares: two builds of one config (as two processes would make) agree;
    another strategy setting does not."""
    args = ["--config", BASE, "--config", str(ROOT / "experiments" / "synthetic" / "flex_attention_ratio.yaml"),
            *_small(tmp_path)]
    first, second = (main(args, run=False).model for _ in range(2))
    assert first.model.selection is not second.model.selection
    assert first._answer_source() == second._answer_source()
    assert "0x" not in repr(first.model.selection)
    other = main([*args, "--model.model.init_args.selection.init_args.ratio", "0.25"], run=False).model
    assert other._answer_source() != first._answer_source()


@pytest.mark.parametrize("override, message", [
    (["--model.model.init_args.num_sa_layers", "3"], r"num_sa_layers must be in \[1, 2\] for mode 'flex' .*no layer "
                                                     r"would attend to high-res tokens"),
    (["--config", str(ROOT / "experiments" / "synthetic" / "xattn.yaml"), "--model.model.init_args.selection",
      "random"], r"mode 'xattn' selects no high-res tokens, but a selection strategy is given"),
    (["--config", str(ROOT / "experiments" / "synthetic" / "lr_only.yaml"), "--model.model.init_args.selection",
      "attention"], r"mode 'lr_only' selects no high-res tokens"),
    (["--model.model.init_args.selection.init_args.ratio", "0.25"], r"a threshold or a budget, not both"),
])
def test_settings_that_contradict_each_other_are_refused_with_the_reason(override, message, tmp_path, capsys):
    with pytest.raises((ValueError, SystemExit)) as error:
        main(["--config", BASE, *_small(tmp_path), *override], run=False)
    text = str(error.value) + capsys.readouterr().err
    assert re.search(message, text), text[-2000:]


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 1 MiB filesystem of its own (tmpfs), where a checkpoint runs out of space for real."""
    folder = tmp_path / "tiny_fs"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_disk_too_small_for_one_checkpoint_fails_at_startup(tiny_filesystem):
    cli = main(["--config", BASE, *_small(tiny_filesystem), "--trainer.max_steps", "2"], run=False)
    with pytest.raises(OSError, match=r"the checkpoint folder .*tiny_fs.* free, and one checkpoint of this model "
                                      r"takes about \d+\.\d MiB") as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert error.value.errno == errno.ENOSPC and cli.trainer.global_step == 0


def test_running_out_of_space_while_saving_says_so_and_keeps_the_last_checkpoint(tiny_filesystem):
    io, path = AtomicCheckpointIO(), tiny_filesystem / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    with pytest.raises(OSError, match=r"no space left to save the checkpoint .*last.ckpt .*kept whole") as error:
        io.save_checkpoint({"step": 2, "weights": torch.zeros(2**19)}, path)  # 2 MiB
    assert error.value.errno == errno.ENOSPC
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_a_run_that_fails_at_startup_leaves_no_folder_holding_only_its_config(tmp_path):
    cli = main(["--config", BASE, *_small(tmp_path), "--trainer.max_steps", "2"], run=False)
    cli.datamodule.hparams.image_size = 48  # refused in the module's setup, after the config is saved
    with pytest.raises(ValueError, match="images are 48 px"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert not (tmp_path / "run" / "v").exists()

    kept = tmp_path / "run" / "v"  # a folder that holds more (a run resumed into it) stays
    kept.mkdir(parents=True)
    (kept / "checkpoints").mkdir()
    (kept / "checkpoints" / "last.ckpt").write_bytes(b"")
    cli = main(["--config", BASE, *_small(tmp_path), "--trainer.max_steps", "2"], run=False)
    cli.datamodule.hparams.image_size = 48
    with pytest.raises(ValueError, match="images are 48 px"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert (kept / "config.yaml").is_file() and (kept / "checkpoints" / "last.ckpt").is_file()


def test_progress_bar_of_a_step_bounded_run_names_its_steps_not_epoch_minus_two(tmp_path):
    pytest.importorskip("rich")  # Lightning's default bar is the rich one only where rich is installed
    cli = main(["--config", BASE, *_small(tmp_path), "--trainer.enable_progress_bar", "true"], run=False)
    cli.trainer.fit_loop.max_epochs = -1  # what Trainer.fit makes of max_epochs None with max_steps
    bar = cli.trainer.progress_bar_callback
    bar._trainer = cli.trainer
    assert bar._get_train_description(0).strip() == "Epoch 0 (of 600 steps)"


def test_loading_a_clip_tower_logs_no_random_initialisation(caplog):
    with caplog.at_level(logging.WARNING):
        OpenClipBackbone("ViT-B-16", model_kwargs=dict(device="meta"))
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes\), expected a Lightning checkpoint of a flexvlm run"),
    (b"not a checkpoint at all", r"was not written by torch.save \(it is no zip archive\), expected a Lightning"),
    ("tensors", r"is not a Lightning checkpoint of a flexvlm run \(e.g. .*\): no 'state_dict', it holds keys "
                r"\['weight'\]"),
])
@pytest.mark.parametrize("given_as", ["ckpt_path", "init_from"])
def test_a_file_that_is_no_run_checkpoint_is_named_with_what_was_expected(content, message, given_as, tmp_path):
    path = tmp_path / "given.ckpt"
    if content == "tensors":
        torch.save({"weight": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    args = ["--config", BASE, *_small(tmp_path), "--trainer.max_steps", "1"]
    if given_as == "ckpt_path":
        call = lambda: main(["fit", *args, "--ckpt_path", str(path)])  # noqa: E731
    else:
        call = lambda: main(["fit", *args, "--model.init_from", str(path)])  # noqa: E731
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name, content, message", [
    ("weights.bin", b"", r"weights.bin is empty \(0 bytes\), expected a state dict"),
    ("weights.bin", b"garbage", r"weights.bin was not written by torch.save"),
    ("weights.safetensors", b"garbage", r"weights.safetensors cannot be read as a state dict"),
])
def test_a_weights_file_that_holds_no_state_dict_is_named(name, content, message, tmp_path):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_state_dict(tmp_path / name)
