"""FSDP2 and DTensor, as far as flexvlm uses them (Lightning's ``ModelParallelStrategy``): sharding a
module, telling a shard from a plain tensor, gathering one. Public in ``torch.distributed.fsdp`` and
``torch.distributed.tensor`` from torch 2.6 / 2.5, under private names before."""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor, nn


def _dtensor_api() -> Any:
    import torch.distributed.tensor as api

    if not hasattr(api, "DTensor"):  # torch 2.4: under the private name
        import torch.distributed._tensor as api
    return api


def _dtensor_utils() -> Any:
    """The DTensor helpers beside its API (``compute_local_shape_and_global_offset``)."""
    return importlib.import_module(f"{_dtensor_api().__name__}._utils")


def _fsdp2_api() -> Any:
    from torch.distributed import fsdp as api

    if not hasattr(api, "fully_shard"):  # torch < 2.6: under the private name
        from torch.distributed._composable import fsdp as api
    return api


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor``: a weight (or a result computed from one) held in shards
    across processes."""
    return torch.distributed.is_available() and isinstance(tensor, _dtensor_api().DTensor)


def is_fully_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` has made ``module`` an FSDP2 unit."""
    return torch.distributed.is_available() and isinstance(module, _fsdp2_api().FSDPModule)


def _reduced(flags: Tensor, op: Any) -> Tensor:
    flags = flags.to(torch.int32)
    torch.distributed.all_reduce(flags, op=op)
    return flags.bool()


def all_processes(flag: Tensor) -> bool:
    """Whether a boolean ``flag`` holds on every process (a collective: every process calls it)."""
    return bool(_reduced(flag, torch.distributed.ReduceOp.MIN))


def on_any_process(flags: Tensor) -> Tensor:
    """Which of the boolean ``flags`` hold on at least one process (a collective: every process
    calls it with as many flags)."""
    return _reduced(flags, torch.distributed.ReduceOp.MAX)


def full_value(tensor: Tensor) -> Tensor:
    """The whole of a sharded tensor (a collective: every process calls it), e.g. a reduction's
    result; a plain tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def _local_part(tensor: Tensor, shard: Tensor) -> Tensor:
    """The part of a whole ``tensor`` that this process holds of ``shard``: a view, nothing read yet."""
    sizes, offsets = _dtensor_utils().compute_local_shape_and_global_offset(tensor.shape, shard.device_mesh,
                                                                            shard.placements)
    return tensor[tuple(slice(offset, offset + size) for offset, size in zip(offsets, sizes))]


def placed_like(tensor: Tensor, shard: Tensor) -> Tensor:
    """A whole ``tensor`` sharded as ``shard`` is: this process's part alone, cut on the host and then
    moved to the shard's device. Every process cuts its part from its own copy (each maps the same
    weights file), so a tensor of a memory-mapped file is read by each process only where its part
    lies, and nothing is sent between processes."""
    local = _local_part(tensor, shard).to(shard.device)
    return _dtensor_api().DTensor.from_local(local, shard.device_mesh, shard.placements, run_check=False,
                                             shape=shard.shape, stride=shard.stride())


def fully_shard(module: nn.Module, mesh: Any) -> None:
    """FSDP2's ``fully_shard``: ``module``'s parameters (those not in a sharded submodule already)
    become one unit, sharded over ``mesh`` and gathered for each call of its forward."""
    _fsdp2_api().fully_shard(module, mesh=mesh)


def register_forward_method(module: nn.Module, name: str) -> None:
    """Makes ``module.<name>()`` gather and free a sharded module's unit as its forward does."""
    _fsdp2_api().register_fsdp_forward_method(module, name)
