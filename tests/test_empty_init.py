"""Large-model building as Lightning expects it: ``--empty_init true`` builds the model on the meta
device, ``configure_model`` gives it its tensors on each process's device, then loads ``init_from``;
proved in a 2-process DDP run on CPU."""

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

# records, per process, what the model was at setup (before configure_model) and when training starts
RECORDER = '''
import json, torch
import torch.distributed as dist
from lightning.pytorch import Callback

class RecordBuild(Callback):
    def __init__(self, folder: str):
        self.folder = folder

    def _write(self, trainer, pl_module, event):
        params = list(pl_module.model.parameters())
        record = {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                  "meta": all(p.is_meta for p in params) and len(params) > 0}
        if not record["meta"]:
            record["checksum"] = float(sum(p.detach().double().sum() for p in params))
        with open(f"{self.folder}/{event}-rank{trainer.global_rank}.json", "w") as f:
            json.dump(record, f)

    def setup(self, trainer, pl_module, stage):
        self._write(trainer, pl_module, "setup")

    def on_train_start(self, trainer, pl_module):
        self._write(trainer, pl_module, "train_start")
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


def test_two_process_ddp_run_of_a_model_built_on_the_meta_device(tmp_path):
    """Each process holds a meta model at setup, materialises it with init_from's weights (the same
    on both), and trains it under DDP to the same weights."""
    source, state, expected = _source_checkpoint(tmp_path)
    (tmp_path / "recorder.py").write_text(RECORDER)
    callback = json.dumps({"class_path": "recorder.RecordBuild", "init_args": {"folder": str(tmp_path)}})
    command = [
        sys.executable, "-m", "flexvlm", "fit", "--config", BASE, *SMALL, "--empty_init", "true",
        "--model.init_from", str(source), "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
        "--trainer.devices", "2", "--trainer.max_steps", "2", "--threads", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
        "--trainer.logger.init_args.name", "ddp", "--trainer.logger.init_args.version", "v",
        "--trainer.callbacks+", callback,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*-rank*.json")}
    assert sorted(records) == ["setup-rank0", "setup-rank1", "train_start-rank0", "train_start-rank1"]
    for rank in (0, 1):
        assert records[f"setup-rank{rank}"] == {"world_size": 2, "meta": True}
        start = records[f"train_start-rank{rank}"]
        assert start["world_size"] == 2 and not start["meta"]
        assert start["checksum"] == pytest.approx(expected, rel=1e-9)
    trained = torch.load(tmp_path / "ddp" / "v" / "checkpoints" / "last.ckpt", weights_only=True)
    assert trained["global_step"] == 2
    moved = [k for k, v in state.items() if not torch.equal(trained["state_dict"][k], v)]
    assert moved and all(torch.isfinite(v).all() for v in trained["state_dict"].values())
