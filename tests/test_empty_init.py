"""Large-model building as Lightning expects it: ``--empty_init true`` builds the model on the meta
device, ``configure_model`` gives it its tensors on each process's device (under FSDP2, only its
shard, read from the mapped file), then loads ``init_from``; proved in 2-process DDP and FSDP2 runs
on CPU, with the host memory of a sharded load measured, and FSDP2 evaluation on uneven splits."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexvlm import lit_module
from flexvlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs" / "synthetic.yaml")
SMALL = [
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
    "--data.init_args.num_train", "64", "--data.init_args.batch_size", "16",
    "--data.init_args.num_val", "8", "--data.init_args.num_test", "8", "--data.init_args.eval_batch_size", "8",
]

# Lightning's ModelParallelStrategy as FSDP2 alone over 2 processes
FSDP2 = json.dumps({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": {
    "data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False}})

# records, per process, what the model was at setup (before configure_model) and at the start of the fit
# (after it, before any step):
# on the meta device or not, sharded (FSDP2's DTensors) or not, the elements this process holds and
# the whole model's, and the sum of the whole model's weights (gathered, for a sharded model)
RECORDER = '''
import json, torch
import torch.distributed as dist
from lightning.pytorch import Callback
from flexvlm.sharding import full_value, is_sharded

class RecordBuild(Callback):
    def __init__(self, folder: str):
        self.folder = folder

    def _write(self, trainer, pl_module, event):
        params = list(pl_module.model.parameters())
        record = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                  "meta": all(p.is_meta for p in params) and len(params) > 0,
                  "sharded": all(is_sharded(p) for p in params),
                  "held": sum(p.to_local().numel() if is_sharded(p) else p.numel() for p in params),
                  "total": sum(p.numel() for p in params)}
        if not record["meta"]:
            record["checksum"] = float(sum(full_value(p.detach().double().sum()) for p in params))
        with open(f"{self.folder}/{event}-rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)

    def setup(self, trainer, pl_module, stage):
        if stage == "fit":  # not the test after it
            self._write(trainer, pl_module, "setup")

    def on_fit_start(self, trainer, pl_module):  # after configure_model, before any step
        self._write(trainer, pl_module, "fit_start")
'''


def _source_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], float]:
    """A run's checkpoint to start from (the built-in model's weights, as ``init_from`` reads them),
    its tensors, and the sum of the model's parameters."""
    cli = main(["--config", BASE, *SMALL, "--trainer.logger", "false", "--seed_everything", "7"], run=False)
    state = {k: v.clone() for k, v in cli.model.state_dict().items()}
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": state}, path)
    return path, state, float(sum(p.detach().double().sum() for p in cli.model.model.parameters()))


def test_empty_init_builds_nothing_until_configure_model(tmp_path):
    source, state, _ = _source_checkpoint(tmp_path)
    cli = main(["--config", BASE, *SMALL, "--trainer.logger", "false", "--empty_init", "true",
                "--model.init_from", str(source)], run=False)
    module = cli.model
    assert all(t.is_meta for t in [*module.model.parameters(), *module.model.buffers()])
    assert not any(t.is_meta for t in module.aux_objective.parameters())  # only the model waits
    module.configure_model()
    assert not module.model.is_meta
    loaded = module.state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    module.configure_model()  # again, as Lightning may: nothing changes
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


def test_empty_init_without_weights_for_a_tower_lacking_reset_parameters_is_an_error(tmp_path):
    tower = ("--model.model.backbone", json.dumps({
        "class_path": "flexvlm.models.vision.TimmBackbone",
        "init_args": {"model_name": "vit_tiny_patch16_224",
                      "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3}},
    }))
    cli = main(["--config", BASE, *SMALL, "--trainer.logger", "false", "--empty_init", "true", *tower], run=False)
    with pytest.raises(TypeError, match="no reset_parameters.*pretrained"):
        cli.model.configure_model()


def test_empty_init_refuses_a_tower_checkpoint_it_could_not_read(tmp_path):
    path = tmp_path / "tower.pt"
    torch.save({}, path)
    with pytest.raises(ValueError, match="built on the meta device.*reads no weights"):
        main(["--config", BASE, *SMALL, "--trainer.logger", "false", "--empty_init", "true",
              "--model.model.backbone.init_args.checkpoint_path", str(path)], run=False)


def test_fsdp2_with_tensor_parallelism_is_refused():
    """flexvlm shards with FSDP2 alone: a ModelParallelStrategy mesh with a tensor-parallel dimension
    larger than 1 is an error naming the settings to use, before anything is sharded."""

    class Mesh:  # the part of a 2-D DeviceMesh that configure_model reads
        def __getitem__(self, name):
            return type("Dim", (), {"size": lambda self: {"tensor_parallel": 2, "data_parallel": 1}[name]})()

    cli = main(["--config", BASE, *SMALL, "--trainer.logger", "false", "--empty_init", "true"], run=False)
    cli.model._device_mesh = Mesh()
    with pytest.raises(ValueError, match="tensor_parallel_size: 1"):
        cli.model.configure_model()
    assert cli.model.model.is_meta and not cli.model.model.is_sharded


def _run_two_processes(command: list[str], modules: Path, timeout: float = 600) -> None:
    """``command`` (a 2-process Lightning run), its test modules in ``modules``; it fails rather than
    hangs when a process waits in a collective that another never enters."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")]))
    # a session of its own, so that a timeout ends the process Lightning starts for rank 1 as well
    run = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        _, stderr = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        _, stderr = run.communicate()
        pytest.fail(f"no end after {timeout} s (a deadlock?):\n{stderr[-3000:]}")
    assert run.returncode == 0, stderr[-3000:]


def _two_process_run(tmp_path: Path, source: Path, strategy: str, *extra: str) -> dict[str, dict]:
    """A 2-process run of 2 steps on CPU from ``source``, built on the meta device, then its test (8
    questions); what the recorder wrote, by event and process, the last checkpoint, the answers."""
    folder = tmp_path / strategy
    folder.mkdir()
    callback = json.dumps({"class_path": "recorder.RecordBuild", "init_args": {"folder": str(folder)}})
    command = [
        sys.executable, "-m", "flexvlm", "fit", "--config", BASE, *SMALL, "--empty_init", "true",
        "--model.init_from", str(source), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.max_steps", "2", "--threads", "1", "--trainer.default_root_dir", str(folder),
        "--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.name", "run",
        "--trainer.logger.init_args.version", "v", "--trainer.callbacks+", callback, "--test_after_fit", "true",
        *extra,
    ]
    _run_two_processes(command, tmp_path)
    records = {p.stem: json.loads(p.read_text()) for p in folder.glob("*-rank*.json")}
    assert sorted(records) == ["fit_start-rank0", "fit_start-rank1", "setup-rank0", "setup-rank1"]
    trained = torch.load(folder / "run" / "v" / "checkpoints" / "last.ckpt", weights_only=True)
    assert trained["global_step"] == 2
    lines = (folder / "run" / "v" / "answers.jsonl").read_text().splitlines()
    answers = {record["question_id"]: record["answer"] for record in map(json.loads, lines)}
    assert len(answers) == 8
    return {**records, "trained": trained["state_dict"], "answers": answers}


def test_two_process_runs_of_a_model_built_on_the_meta_device_ddp_and_fsdp2(tmp_path):
    """Each process holds a meta model at setup and init_from's weights when the fit starts: under
    DDP all of them; under FSDP2 (Lightning's ModelParallelStrategy) its half of them, sharded before
    they had memory. Both train 2 steps to the same weights and give the same test answers (FSDP2
    also answers a validation batch first, through the sharded model's generate)."""
    source, state, expected = _source_checkpoint(tmp_path)
    (tmp_path / "recorder.py").write_text(RECORDER)
    runs = {"ddp": _two_process_run(tmp_path, source, "ddp", "--trainer.strategy", "ddp"),
            "fsdp2": _two_process_run(tmp_path, source, "fsdp2", "--trainer.strategy", FSDP2,
                                      "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "1")}
    total = runs["ddp"]["setup-rank0"]["total"]  # the model's parameters, counted on the meta device
    for name, records in runs.items():
        for rank in (0, 1):
            setup, start = records[f"setup-rank{rank}"], records[f"fit_start-rank{rank}"]
            assert setup["world_size"] == start["world_size"] == 2
            assert setup["meta"] and not setup["sharded"] and not start["meta"]
            assert start["checksum"] == pytest.approx(expected, rel=1e-9)
            assert start["total"] == total
            assert start["sharded"] == (name == "fsdp2")
            assert start["held"] == (total if name == "ddp" else pytest.approx(total / 2, rel=0.01))
        trained = records["trained"]
        assert trained.keys() == state.keys()
        moved = [k for k, v in state.items() if not torch.equal(trained[k], v)]
        assert moved and all(torch.isfinite(v).all() for v in trained.values())
    for name, tensor in runs["ddp"]["trained"].items():
        torch.testing.assert_close(runs["fsdp2"]["trained"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert runs["fsdp2"]["answers"] == runs["ddp"]["answers"]


# questions 0-5 of the 10 of a split to process 0 (3 batches of 2), 6-9 to process 1: a batch, then a
# batch of bad samples only (Lightning's distributed sampler would give each process 5)
UNEVEN = '''
from torch.utils.data import Dataset
from flexvlm.data.datamodule import SyntheticVQADataModule
from flexvlm.data.problems import BadSample, Problem

BAD = {8, 9}

class WithBadSamples(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index in BAD:
            raise BadSample(Problem("the test's split", str(index), "made bad by the test"))
        return self.dataset[index]

class UnevenSplits(SyntheticVQADataModule):
    def read_split(self, split):
        return WithBadSamples(super().read_split(split))

    def _eval_sampler(self, dataset):
        if self.trainer.world_size == 1:
            return None
        return [range(6), range(6, 10)][self.trainer.global_rank]
'''


def _evaluation_outcome(folder: Path) -> dict:
    """A run's validation scores (metrics.csv), test metrics and answers."""
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    validation = {key: float(row[key]) for row in rows for key in ("val/accuracy", "val/loss") if row.get(key)}
    lines = (folder / "answers.jsonl").read_text().splitlines()
    answers = {r["question_id"]: r.get("answer") for r in map(json.loads, lines)}
    return {"val": validation, "test": json.loads((folder / "metrics.json").read_text()), "answers": answers}


def test_fsdp2_evaluation_on_uneven_splits_matches_one_process(tmp_path):
    """Under FSDP2 every forward is a collective. With a sampler that gives process 0 three batches and
    process 1 one batch and one of bad samples only, process 1 takes part in process 0's forwards
    with a question it answered before, unscored: validation and test end, with the scores and
    answers of one process (weights unchanged by the step before: lr 0)."""
    source, _, _ = _source_checkpoint(tmp_path)
    (tmp_path / "uneven.py").write_text(UNEVEN)

    def run(name: str, *extra: str) -> list[str]:
        folder = tmp_path / name
        return ["fit", "--config", BASE, *SMALL, "--data.class_path", "uneven.UnevenSplits",
                "--data.init_args.num_val", "10", "--data.init_args.num_test", "10",
                "--data.init_args.eval_batch_size", "2", "--trainer.limit_val_batches", "1.0",
                "--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--model.lr", "0",
                "--model.init_from", str(source), "--trainer.accelerator", "cpu", "--threads", "1",
                "--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder),
                "--trainer.logger.init_args.name", "run", "--trainer.logger.init_args.version", "v",
                "--test_after_fit", "true", *extra]

    _run_two_processes([sys.executable, "-m", "flexvlm", *run("fsdp2", "--empty_init", "true", "--trainer.devices",
                        "2", "--trainer.strategy", FSDP2, "--trainer.use_distributed_sampler", "false")],
                       tmp_path, timeout=300)
    sys.path.insert(0, str(tmp_path))
    try:
        main(run("one"))
    finally:
        sys.path.remove(str(tmp_path))
    sharded, one = (_evaluation_outcome(tmp_path / name / "run" / "v") for name in ("fsdp2", "one"))
    assert sharded["answers"] == one["answers"] and len(one["answers"]) == 10  # 8 answers, 2 errors
    assert (sharded["test"]["num_questions"], sharded["test"]["num_skipped"]) == (8, 2)
    for key in ("test/accuracy", "test/loss"):
        assert sharded["test"][key] == pytest.approx(one["test"][key], rel=1e-5), key
    assert sharded["val"].keys() == {"val/accuracy", "val/loss"}
    assert sharded["val"] == pytest.approx(one["val"], rel=1e-5)


def test_a_sharded_evaluation_round_that_a_process_cannot_take_part_in_is_an_error(monkeypatch):
    """A process with no question in a round and none answered before: the error that every process
    raises together (each sees the flags of all), rather than a deadlock."""
    module = main(["--config", BASE, *SMALL, "--trainer.logger", "false"], run=False).model
    module._start_evaluation_epoch()
    monkeypatch.setattr(lit_module, "on_any_process", lambda flags: flags)  # one process's flags are all
    with pytest.raises(RuntimeError, match="no question in this batch.*none answered before.*use_distributed_sampler"):
        module._round(has_batch=True)
    assert not module._round(has_batch=False)  # no process has a batch: the rounds are over, no error


def test_a_sharded_checkpoint_folder_is_named_with_the_command_that_makes_it_one_file(tmp_path):
    """``init_from`` a torch.distributed.checkpoint folder (ModelParallelStrategy's default) is an
    error that gives the conversion command; the file that command writes starts a run."""
    import torch.distributed.checkpoint as dcp

    source, state, _ = _source_checkpoint(tmp_path)
    folder = tmp_path / "last.ckpt"
    dcp.save({"state_dict": state}, checkpoint_id=folder)
    args = ["--config", BASE, *SMALL, "--trainer.logger", "false"]
    with pytest.raises(ValueError, match="sharded checkpoint folder.*format_utils dcp_to_torch") as error:
        main([*args, "--model.init_from", str(folder)], run=False)
    command = str(error.value).split("first: ", 1)[1].replace("<file.ckpt>", str(tmp_path / "one.ckpt")).split()
    subprocess.run([sys.executable, *command[1:]], check=True, capture_output=True)
    module = main([*args, "--model.init_from", str(tmp_path / "one.ckpt")], run=False).model
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_sharded_load_holds_its_shard_of_the_checkpoint_not_the_file(tmp_path):
    """Two FSDP2 processes load a run's checkpoint (36 MiB) through configure_model, as ``--empty_init``
    under ModelParallelStrategy does (scripts/bench_sharded_load.py, its benchmark at a small size).
    The file is memory-mapped and each process cuts its part of each tensor, so its anonymous memory
    grows by its shard of the weights and at most one tensor more; a reader of the whole file
    grows by the file (and each tensor scattered from process 0, by the shard again)."""
    bench = _script("bench_sharded_load")
    result = bench.benchmark(bench.arguments(["--hidden", "256", "--formats", "torch", "--tmp", str(tmp_path),
                                              "--timeout", "300"]))
    file = result["file_mib"]["torch"]
    for record in result["load_torch"]:
        assert record["weights_match"]
        assert record["budget_mib"] < 0.6 * file  # a shard of half the weights, plus a 1 MiB tensor
        assert record["anonymous_growth_mib"] <= record["budget_mib"] + 8, record  # 8 MiB of allocator slack
