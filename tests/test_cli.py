"""The command line on the built-in task: configs parse, every mode trains, runs resume exactly,
DDP runs on CPU processes, and typos fail with the valid names."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from flexvlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs" / "synthetic.yaml")
EXPERIMENTS = sorted((ROOT / "experiments" / "synthetic").glob("*.yaml"))
EVALUATIONS = sorted((ROOT / "experiments" / "synthetic" / "eval").glob("*.yaml"))


def _small(tmp_path: Path, name: str = "run") -> list[str]:
    """Shrinks the built-in task to seconds: 64 training samples (4 steps an epoch), 8 val / test."""
    return [
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "v",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.val_check_interval", "1.0", "--trainer.check_val_every_n_epoch", "1",
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--data.init_args.num_train", "64", "--data.init_args.batch_size", "16",
        "--data.init_args.num_val", "8", "--data.init_args.num_test", "8", "--data.init_args.eval_batch_size", "8",
    ]


@pytest.mark.parametrize("config", EXPERIMENTS + EVALUATIONS, ids=lambda p: p.stem)
def test_shipped_yaml_parses(config, capsys):
    stack = ["--config", BASE]
    if config in EVALUATIONS:  # evaluations stack on the training config whose checkpoint they read
        stack += ["--config", str(ROOT / "experiments" / "synthetic" / "flex_attention_ratio.yaml")]
    subcommand = "test" if config in EVALUATIONS else "fit"
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *stack, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path: flexvlm.models.vlm.FlexVLM" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["lr_only", "hd", "xattn", "flex_attn", "pyramid_drop"])
def test_fit_then_test_each_mode(mode, tmp_path):
    config = ROOT / "experiments" / "synthetic" / f"{mode}.yaml"
    main(["fit", "--config", BASE, "--config", str(config), *_small(tmp_path), "--trainer.max_steps", "2",
          "--test_after_fit", "true"])
    run = tmp_path / "run" / "v"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_questions"] == 8 and 0.0 <= metrics["test/accuracy"] <= 1.0
    answers = [json.loads(line) for line in (run / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 8 and {"question_id", "answer", "hr_fraction"} <= set(answers[0])
    assert (run / "config.yaml").is_file()  # the resolved config is saved with the run
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    if mode == "flex_attn":
        assert (run / "selections.png").is_file()
        assert 0.0 < metrics["test/hr_fraction"] <= 1.0


class Crash(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path):
    """8 steps in one go, against 8 steps that crash at step 5 and resume from the last checkpoint,
    written at step 3: in the middle of an epoch (4 steps an epoch)."""
    every_3_steps = tmp_path / "checkpoint_every_3_steps.yaml"
    every_3_steps.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args:\n        save_last: true\n        every_n_train_steps: 3\n"
    )
    common = ["--config", BASE, "--config", str(every_3_steps), "--trainer.max_steps", "8"]
    straight = main(["fit", *common, *_small(tmp_path / "straight")])

    cli = main([*common, *_small(tmp_path / "crashed")], run=False)
    cli.trainer.callbacks.append(Crash(at_step=5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = tmp_path / "crashed" / "run" / "v" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3
    resumed = main(["fit", *common, *_small(tmp_path / "crashed"), "--ckpt_path", str(checkpoint)])

    assert resumed.trainer.global_step == straight.trainer.global_step == 8
    expected = straight.model.state_dict()
    for name, tensor in resumed.model.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name


@pytest.mark.slow  # the default run trains two DDP processes in test_empty_init (meta-device build, init_from)
def test_ddp_with_two_cpu_processes(tmp_path):
    command = [sys.executable, "-m", "flexvlm", "fit", "--config", BASE, *_small(tmp_path),
               "--trainer.max_steps", "3", "--trainer.strategy", "ddp", "--trainer.devices", "2",
               "--trainer.accelerator", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(tmp_path / "run" / "v" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3


def test_typos_fail_naming_the_valid_options(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", BASE, "--model.model.init_args.selction", "random"])
    err = capsys.readouterr().err
    assert "valid names here" in err and "selection" in err
    with pytest.raises(SystemExit):
        main(["fit", "--config", BASE, "--trainer.max_stepz", "3"])
    assert "did you mean 'max_steps'" in capsys.readouterr().err


def test_typos_in_a_yaml_and_abbreviations_fail_naming_the_valid_options(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", BASE, "--config", str(typo)])
    err = capsys.readouterr().err
    assert "does not accept option 'trainer.max_stepz'" in err and "did you mean 'max_steps'" in err
    with pytest.raises(SystemExit):
        main(["fit", "--config", BASE, "--trainer.max_step", "2"])  # not taken as max_steps
    assert "unrecognized arguments: --trainer.max_step" in capsys.readouterr().err


def test_bad_sample_policy_is_checked_by_the_parser(tmp_path, capsys):
    data = {"class_path": "flexvlm.data.datamodule.LlavaDataModule",
            "init_args": {"train_json": "t.json", "image_folder": "i", "tokenizer_path": "tok", "on_bad_sample": "skp"}}
    with pytest.raises(SystemExit):
        main(["fit", "--config", BASE, "--data", json.dumps(data)])
    assert "on_bad_sample" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["command line", "stacked yaml"])
def test_model_values_reach_every_user(where, tmp_path):
    """Zoom, patch size and backbone width are set once, on the model: the data and the auxiliary
    objective follow an override from the command line or from a YAML stacked later."""
    overrides = {"model.model.zoom": 5, "model.model.backbone.init_args.embed_dim": 32,
                 "model.model.backbone.init_args.patch_size": 16}
    if where == "command line":
        args = [item for key, value in overrides.items() for item in (f"--{key}", str(value))]
    else:
        stacked = tmp_path / "stacked.yaml"
        stacked.write_text("model:\n  model:\n    zoom: 5\n    backbone:\n      init_args:\n        embed_dim: 32\n"
                           "        patch_size: 16\n")
        args = ["--config", str(stacked)]
    cli = main(["--config", BASE, *_small(tmp_path), *args], run=False)
    data = cli.datamodule.hparams
    assert (data.zoom, data.patch_size, data.image_size) == (5, 16, 5 * 32)
    assert cli.model.aux_objective.lr_colour.in_features == 32
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    out = cli.model.model(batch["input_ids"], batch["attention_mask"], batch["images"], labels=batch["labels"])
    assert torch.isfinite(out.loss) and cli.model._aux_loss(out, batch).isfinite()


TOWERS = sorted((ROOT / "experiments" / "synthetic" / "towers").glob("*.yaml"))


@pytest.mark.parametrize("tower", TOWERS, ids=lambda p: p.stem)
def test_every_tower_config_gives_the_data_and_objective_its_own_geometry(tmp_path, tower):
    """Whatever the tower (its patch size in timm's model_kwargs, a conv stage's reduction, open_clip's
    vision_cfg), the data is drawn at zoom x its input size on its patch grid, normalised with its
    mean / std, and the auxiliary objective reads its width; a training batch gives a finite loss."""
    cli = main(["--config", BASE, "--config", str(tower), *_small(tmp_path)], run=False)
    backbone, data = cli.model.model.encoder.backbone, cli.datamodule.hparams
    assert (data.patch_size, data.image_size) == (backbone.patch_size, data.zoom * backbone.image_size)
    assert (tuple(data.mean), tuple(data.std)) == (tuple(backbone.mean), tuple(backbone.std))
    assert cli.model.aux_objective.lr_colour.in_features == backbone.embed_dim
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    out = cli.model._forward(batch)
    assert torch.isfinite(out.loss) and cli.model._aux_loss(out, batch).isfinite()


def test_unknown_strategy_name_lists_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match="valid names: .*attention.*center.*random"):
        main(["--config", BASE, *_small(tmp_path), "--model.model.init_args.selection", "atention"], run=False)


def test_alpha_warmup_follows_training_progress_and_is_logged(tmp_path):
    main(["fit", "--config", BASE, *_small(tmp_path), "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
          "--model.alpha_warmup", "0.5"])
    rows = list(csv.DictReader(open(tmp_path / "run" / "v" / "metrics.csv")))
    logged = {int(r["step"]): r for r in rows if r.get("train/alpha")}
    # alpha = step / (0.5 * 4 steps), capped at 1
    assert [float(logged[s]["train/alpha"]) for s in range(4)] == [0.0, 0.5, 1.0, 1.0]
    for column in ("train/loss", "train/lr", "train/hr_fraction/layer1", "train/hr_fraction/layer2"):
        assert logged[3][column] != "", column


def test_strategy_from_outside_the_package_by_class_path(tmp_path, monkeypatch):
    (tmp_path / "my_strategies.py").write_text(
        "import torch\n"
        "from flexvlm.selection import SelectionStrategy\n\n"
        "class FirstRow(SelectionStrategy):\n"
        "    def select(self, attn_map, ctx):\n"
        "        mask = torch.zeros(*attn_map.shape[:2], ctx.hr_grid, ctx.hr_grid, dtype=torch.bool)\n"
        "        mask[..., 0, :] = True\n"
        "        return mask\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = main(["--config", BASE, *_small(tmp_path), "--model.model.init_args.selection.class_path",
                "my_strategies.FirstRow"], run=False)
    assert type(cli.model.model.selection).__name__ == "FirstRow"
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    out = cli.model.model(batch["input_ids"], batch["attention_mask"], batch["images"], labels=batch["labels"])
    assert all(abs(float(f) - 12 / 144) < 1e-6 for f in out.selected_fraction.values())


def test_init_from_another_run_starts_from_its_weights_not_its_optimizer(tmp_path):
    """Stage 2 of the paper's protocol: every mode starts from one low-res-only run's weights."""
    lr_only = ROOT / "experiments" / "synthetic" / "lr_only.yaml"
    main(["fit", "--config", BASE, "--config", str(lr_only), *_small(tmp_path, "stage1"), "--trainer.max_steps", "2"])
    source = tmp_path / "stage1" / "v" / "checkpoints" / "last.ckpt"
    trained = torch.load(source, weights_only=True)["state_dict"]

    flex = ROOT / "experiments" / "synthetic" / "flex_attn.yaml"
    stage2 = ["--config", BASE, "--config", str(flex), *_small(tmp_path, "stage2"), "--model.init_from", str(source)]
    module = main(stage2, run=False).model
    state = module.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in trained.items())  # VLM and aux objective
    for i in module.model.flex_layers:  # W_K', W_V' the low-res run lacks start as its W_K, W_V
        prefix = f"model.llm.model.layers.{i}.self_attn."
        assert torch.equal(state[prefix + "k_hr_proj.weight"], trained[prefix + "k_proj.weight"])
        assert torch.equal(state[prefix + "v_hr_proj.weight"], trained[prefix + "v_proj.weight"])

    main(["fit", *stage2, "--trainer.max_steps", "1"])
    assert torch.load(tmp_path / "stage2" / "v" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1

    with pytest.raises(ValueError, match=r"projector.0.weight: checkpoint \(64, 64\) vs model \(64, 32\)"):
        main([*stage2, "--model.model.backbone.init_args.embed_dim", "32"], run=False)


def test_fit_and_test_with_bf16_weights(tmp_path):
    """trainer.precision bf16-true: the whole model and its inputs in bf16, as on a GPU."""
    main(["fit", "--config", BASE, *_small(tmp_path), "--trainer.max_steps", "2", "--trainer.precision", "bf16-true",
          "--test_after_fit", "true"])
    metrics = json.loads((tmp_path / "run" / "v" / "metrics.json").read_text())
    assert metrics["num_questions"] == 8 and torch.isfinite(torch.tensor(metrics["test/loss"]))


def test_same_config_seed_and_threads_give_the_same_weights(tmp_path):
    """Reproducibility: the thread count is part of the config (torch sums in another order with
    another count, which training amplifies), and with it pinned two runs agree bit for bit."""
    states, before = [], torch.get_num_threads()
    try:
        for name in ("a", "b"):
            main(["fit", "--config", BASE, *_small(tmp_path, name), "--trainer.max_steps", "3", "--threads", "1"])
            assert torch.get_num_threads() == 1
            run = tmp_path / name / "v"
            states.append(torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
            assert "threads: 1" in (run / "config.yaml").read_text()  # recorded with the run
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
