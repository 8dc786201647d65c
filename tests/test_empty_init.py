"""Large-model building as Lightning expects it: ``--empty_init true`` builds the model on the meta
device, ``configure_model`` gives it its tensors on each process's device (under FSDP2, only its
shard), then loads ``init_from``; proved in 2-process DDP and FSDP2 runs on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexvlm.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs" / "synthetic.yaml")
SMALL = [
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
    "--data.init_args.num_train", "64", "--data.init_args.batch_size", "16",
    "--data.init_args.num_val", "8", "--data.init_args.num_test", "8", "--data.init_args.eval_batch_size", "8",
]

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
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
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
    fsdp2 = json.dumps({"class_path": "lightning.pytorch.strategies.ModelParallelStrategy", "init_args": {
        "data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False}})
    runs = {"ddp": _two_process_run(tmp_path, source, "ddp", "--trainer.strategy", "ddp"),
            "fsdp2": _two_process_run(tmp_path, source, "fsdp2", "--trainer.strategy", fsdp2,
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
