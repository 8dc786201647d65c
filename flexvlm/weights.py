"""Reading weight files and loading them strictly: the leaf that every loader of flexvlm uses (the
vision towers, the decoder families, the architectures). Nothing here knows a model family. A folder
holds `model.safetensors`, `pytorch_model.bin` or either sharded with an `*.index.json`; pickled
files are read with `weights_only=True`. Every load is strict: a missing, unexpected or mis-shaped
tensor is a ValueError that lists the names and shapes."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn

from flexvlm.sharding import is_sharded, placed_like

__all__ = [
    "StateDict", "read_state_dict", "read_checkpoint", "read_config", "load_state_dict_strict", "listing", "take_parts",
    "put_parts", "raise_mismatches",
]

StateDict = dict[str, Tensor]

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
            raise ValueError(f"{path} was not written by torch.save (it is no zip archive), "
                             f"expected {expected}") from err
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


# in the order transformers prefers them
_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)


def read_checkpoint(path: str | Path) -> StateDict:
    """All tensors of a weights file, or of a HF-style folder (single file or index + shards)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        return read_state_dict(path)
    for name in _WEIGHT_FILES:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_state_dict(path / shard).items()}
        return read_state_dict(file)
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(_WEIGHT_FILES)}")


def read_config(path: str | Path) -> dict:
    """`config.json` beside the weights; empty for a bare weights file."""
    file = Path(path) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def read_model_config(folder: str | Path) -> dict:
    """A model folder's config.json, which its model is built from: a missing folder or file is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    config = read_config(folder)
    if not config:
        raise FileNotFoundError(f"no config.json in {folder}: the model is built from it")
    return config


def take_parts(state: StateDict, prefixes: dict[str, tuple[str, str]], source: str) -> dict[str, StateDict]:
    """Split `state` into parts by name prefix: `{checkpoint prefix: (part, new prefix)}`, longest
    prefix first. A tensor that no prefix claims is an error."""
    parts: dict[str, StateDict] = {part: {} for part, _ in prefixes.values()}
    longest_first = sorted(prefixes, key=len, reverse=True)
    unclaimed = []
    for name, tensor in state.items():
        match = next((p for p in longest_first if name.startswith(p)), None)
        if match is None:
            unclaimed.append(f"{name} {tuple(tensor.shape)}")
            continue
        part, new_prefix = prefixes[match]
        parts[part][new_prefix + name[len(match):]] = tensor
    if unclaimed:
        raise ValueError(f"{source}: tensors of no known part:" + listing("unclaimed", unclaimed))
    return parts


def put_parts(parts: dict[str, StateDict], prefixes: dict[str, tuple[str, str]], target: str) -> StateDict:
    """The inverse of `take_parts`, with the same table: each part's tensors under the checkpoint prefix of
    their flexvlm prefix (the first listed where several spellings read into one). A tensor that no
    prefix places is an error."""
    placed, unplaced = {}, []
    for part, state in parts.items():
        spellings: dict[str, str] = {}  # flexvlm prefix -> checkpoint prefix
        for checkpoint_prefix, (owner, new_prefix) in prefixes.items():
            if owner == part:
                spellings.setdefault(new_prefix, checkpoint_prefix)
        longest_first = sorted(spellings, key=len, reverse=True)
        for name, tensor in state.items():
            match = next((p for p in longest_first if name.startswith(p)), None)
            if match is None:
                unplaced.append(f"{part}: {name} {tuple(tensor.shape)}")
                continue
            placed[spellings[match] + name[len(match):]] = tensor
    if unplaced:
        raise ValueError(f"the {target} layout has no place for these tensors:" + listing("unplaced", unplaced))
    return placed


def raise_mismatches(problems: list[str], source: str, what: str) -> None:
    if problems:
        raise ValueError(f"{source}: config.json does not match the {what}:\n  " + "\n  ".join(problems))
