"""Reading weight files and loading them strictly: the leaf that every loader of flexvlm uses
(the vision towers, ``flexvlm.checkpoints``). Nothing here knows a model family."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

from flexvlm.sharding import is_sharded, placed_like

__all__ = ["read_state_dict", "load_state_dict_strict", "listing"]

_MAX_LISTED = 20  # names per category in a mismatch message; a full CLIP has hundreds


def _sharded_as(state_dict: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors that go into sharded weights, sharded as they are: each process takes its own
    part of each (``placed_like``), and of a memory-mapped file reads that part alone."""
    return {name: placed_like(tensor, expected[name]) if is_sharded(expected[name]) else tensor
            for name, tensor in state_dict.items()}


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


STATE_DICT = "a state dict (a .safetensors file, or a file written by torch.save)"


def read_state_dict(path: str | Path, expected: str = STATE_DICT) -> dict[str, Tensor]:
    """Read a state dict from a safetensors file or a `torch.save` file (weights only), memory-mapped:
    a tensor's bytes are read from the file when it is used, so that a sharded load reads each
    process's part of each tensor alone (``load_state_dict_strict``) and what is never used (a
    checkpoint's optimizer state) is never read. A path that holds none is an error naming it and
    ``expected``."""
    path = Path(path)
    if (path / ".metadata").is_file():  # e.g. ModelParallelStrategy's last.ckpt by default
        raise ValueError(f"{path} is a sharded checkpoint folder (torch.distributed.checkpoint); make it one file "
                         f"first: python -m torch.distributed.checkpoint.format_utils dcp_to_torch {path} <file.ckpt>")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (expected {expected})")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes), expected {expected}")
    if _is_torchscript(path):  # e.g. OpenAI's CLIP .pt files: not readable with weights_only=True
        raise ValueError(
            f"{path} is a TorchScript archive; convert it to a state dict once with "
            f"torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'state_dict.pt')"
        )
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(path)  # safetensors maps the file itself
        # a file saved before torch 1.6 (not a zip archive) cannot be mapped: it is read whole
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, EOFError) as err:
        if path.suffix != ".safetensors" and not zipfile.is_zipfile(path):  # nor an old torch file: torch's own
            raise ValueError(f"{path} was not written by torch.save (it is no zip archive), expected {expected}") from err
        raise ValueError(f"{path} cannot be read as {expected}: {err}") from err
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} holds a {type(state_dict).__name__}, expected {expected}")
    return state_dict


def listing(title: str, lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = f"\n    ... and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
    return f"\n  {title} ({len(lines)}):\n    " + "\n    ".join(shown) + more


def load_state_dict_strict(module: nn.Module, state_dict: dict[str, Tensor], source: str) -> None:
    """Load `state_dict` into `module`; any missing, unexpected or mis-shaped tensor is an error."""
    expected = module.state_dict()
    missing = [f"{k} {tuple(v.shape)}" for k, v in expected.items() if k not in state_dict]
    unexpected = [f"{k} {tuple(v.shape)}" for k, v in state_dict.items() if k not in expected]
    mis_shaped = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        message = f"{source} does not match {type(module).__name__}:"
        for title, lines in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if lines:
                message += listing(title, lines)
        raise ValueError(message)
    module.load_state_dict(_sharded_as(state_dict, expected))
