"""FSDP2 and DTensor, as far as flexvlm uses them (Lightning's ``ModelParallelStrategy``): sharding a
module, telling a shard from a plain tensor, gathering one. Public in ``torch.distributed.fsdp`` and
``torch.distributed.tensor`` from torch 2.6 / 2.5, under private names before."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def _dtensor_api() -> Any:
    import torch.distributed.tensor as api

    if not hasattr(api, "DTensor"):  # torch 2.4: under the private name
        import torch.distributed._tensor as api
    return api


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


def all_processes(flag: Tensor) -> bool:
    """Whether a boolean ``flag`` holds on every process (a collective: every process calls it)."""
    flag = flag.to(torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


def full_value(tensor: Tensor) -> Tensor:
    """The whole of a sharded tensor (a collective: every process calls it), e.g. a reduction's
    result; a plain tensor as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def placed_like(tensor: Tensor, shard: Tensor) -> Tensor:
    """A whole ``tensor`` sharded as ``shard`` is (scattered from process 0): what this process keeps."""
    return _dtensor_api().distribute_tensor(tensor.to(shard.device), shard.device_mesh, shard.placements)


def fully_shard(module: nn.Module, mesh: Any) -> None:
    """FSDP2's ``fully_shard``: ``module``'s parameters (those not in a sharded submodule already)
    become one unit, sharded over ``mesh`` and gathered for each call of its forward."""
    _fsdp2_api().fully_shard(module, mesh=mesh)


def register_forward_method(module: nn.Module, name: str) -> None:
    """Makes ``module.<name>()`` gather and free a sharded module's unit as its forward does."""
    _fsdp2_api().register_fsdp_forward_method(module, name)
