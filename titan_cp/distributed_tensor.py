"""Helpers for parameters that may be FSDP2-sharded DTensors, shared by init and HF loading."""

import math
from typing import Callable

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard


def local_region(param: torch.Tensor) -> tuple[list[int], list[int]]:
    """(global offset, local shape) of the part of `param` this rank holds.

    DTensor's `Shard(d)` splits like `torch.chunk` (ceil-sized pieces, the last ones short or
    empty), nested in mesh-dimension order. Derived here from the public placements because
    the helper torch has for it is private.
    """
    shape = list(param.shape)
    offset = [0] * len(shape)
    if not isinstance(param, DTensor):
        return offset, shape
    mesh, coordinate = param.device_mesh, param.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise NotImplementedError(f"a DTensor placed as {placement} is not supported")
        dim, pieces = placement.dim, mesh.size(mesh_dim)
        piece = math.ceil(shape[dim] / pieces)
        start = min(coordinate[mesh_dim] * piece, shape[dim])
        offset[dim] += start
        shape[dim] = min(piece, shape[dim] - start)
    local_shape = list(param.to_local().shape)
    if local_shape != shape:
        raise RuntimeError(f"computed local shape {shape} but the DTensor holds {local_shape}")
    return offset, shape


@torch.no_grad()
def init_(param: torch.Tensor, init_fn: Callable[..., torch.Tensor], **kwargs) -> None:
    """Run `init_fn(tensor, **kwargs)` so that the values do not depend on how `param` is sharded.

    A sharded parameter is filled by generating the whole tensor (one parameter at a time) and
    keeping this rank's part. Every rank draws from the global RNG in the same order as an
    unsharded model does, so FSDP, HSDP and cp runs start from exactly the cp=1 weights
    (invariant 1 in docs/architecture.md). Random ops on DTensors would instead depend on the layout.
    """
    if not isinstance(param, DTensor):
        init_fn(param, **kwargs)
        return
    local = param.to_local()
    full = torch.empty(param.shape, dtype=local.dtype, device=local.device)
    init_fn(full, **kwargs)
    offset, shape = local_region(param)
    if 0 in shape:
        return
    index = tuple(slice(start, start + size) for start, size in zip(offset, shape))
    local.copy_(full[index])
