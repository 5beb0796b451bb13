"""Move what activation checkpointing keeps to pinned host memory (`activation_checkpoint.offload`).

With full checkpointing every block keeps its input until its backward: `L x seq x dim` values,
32 GiB for the 1B model at a million tokens in bf16. Each block's forward runs inside
`torch.autograd.graph.saved_tensors_hooks`: every tensor autograd saves there (the checkpoint's
inputs, which torch's non-reentrant checkpoint saves through these hooks, and under selective
checkpointing also what attention keeps) is copied to pinned host memory on a side stream and
its device memory is released once the copy is done. In backward, the first tensor a block asks
for starts copying the previous block's tensors back on another side stream, so they arrive while
this block computes; at most two blocks' saved tensors are on the device at a time.

The RoPE tables (a block's other tensor arguments, shared by every block) and parameters (FSDP
re-gathers them anyway) stay where they are. On CPU the "host copy" is a plain copy, so the same
code path runs and is tested without a GPU.
"""

from functools import wraps

import torch
import torch.nn as nn


def _is_dense(t: torch.Tensor) -> bool:
    """True when the strides cover exactly `numel` elements (contiguous up to a permutation)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)
    return t.numel() > 0 and span == t.numel()


class _Saved:
    """One saved tensor: its host copy, and its device copy while fetched back."""

    __slots__ = ("host", "device_copy", "ready", "shape", "stride", "dense")

    def __init__(self, host: torch.Tensor, shape, stride, dense: bool):
        self.host = host
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        self.shape, self.stride, self.dense = shape, stride, dense


class _Group:
    """The tensors one block saved in forward; `previous` is the block before it."""

    __slots__ = ("saved", "previous", "fetched")

    def __init__(self, previous: "_Group | None"):
        self.saved: list[_Saved] = []
        self.previous = previous
        self.fetched = False


class ActivationOffloader:
    """Saved-tensor hooks shared by all blocks of a model, with one copy stream each way."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:
            self.to_host = torch.cuda.Stream(device)
            self.to_device = torch.cuda.Stream(device)
        self._last_group: _Group | None = None

    def wrap_block(self, block: nn.Module, first: bool) -> None:
        """Offload what `block`'s forward saves; `first` marks the model's first block.

        Wraps the instance's forward (outside activation checkpointing's wrapper, so the
        checkpoint's saved inputs pass through the hooks), keeping parameter names unchanged.
        """
        inner = block.forward

        @wraps(inner)
        def forward(x: torch.Tensor, *args, **kwargs):
            if not torch.is_grad_enabled():
                return inner(x, *args, **kwargs)
            group = _Group(None if first else self._last_group)
            self._last_group = group
            shared = {
                a.untyped_storage().data_ptr()
                for a in (*args, *kwargs.values())
                if isinstance(a, torch.Tensor)
            }
            with torch.autograd.graph.saved_tensors_hooks(
                lambda t: self._pack(t, group, shared), lambda saved: self._unpack(saved, group)
            ):
                return inner(x, *args, **kwargs)

        block.forward = forward

    def _keeps_in_place(self, t: torch.Tensor, shared: set[int]) -> bool:
        return (
            (t.is_leaf and t.requires_grad)  # a parameter
            or t.device.type != self.device.type
            or t.numel() == 0
            or t.untyped_storage().data_ptr() in shared
        )

    def _pack(self, t: torch.Tensor, group: _Group, shared: set[int]):
        if self._keeps_in_place(t, shared):
            return t
        dense = _is_dense(t)
        if not self.on_cuda:
            saved = _Saved(t.clone(), t.shape, t.stride(), dense)
        else:
            if dense:
                host = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, pin_memory=True)
            else:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            compute = torch.cuda.current_stream(self.device)
            self.to_host.wait_stream(compute)
            with torch.cuda.stream(self.to_host):
                host.copy_(t, non_blocking=True)
            # The caching allocator reuses t's memory only after the copy stream has read it.
            t.record_stream(self.to_host)
            saved = _Saved(host, t.shape, t.stride(), dense)
        group.saved.append(saved)
        return saved

    def _fetch(self, group: _Group) -> None:
        """Start copying `group` back to the device (a no-op after the first call)."""
        if group.fetched:
            return
        group.fetched = True
        if self.on_cuda:
            for saved in group.saved:
                self._copy_back(saved)

    def _copy_back(self, saved: _Saved) -> None:
        compute = torch.cuda.current_stream(self.device)
        # The destination is allocated on the compute stream, so the copy waits for the compute
        # work queued so far (which may still use that memory) and for the copy to the host.
        self.to_device.wait_stream(compute)
        self.to_device.wait_stream(self.to_host)
        if saved.dense:
            saved.device_copy = torch.empty_strided(saved.shape, saved.stride, dtype=saved.host.dtype, device=self.device)
        else:
            saved.device_copy = torch.empty(saved.shape, dtype=saved.host.dtype, device=self.device)
        with torch.cuda.stream(self.to_device):
            saved.device_copy.copy_(saved.host, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(self.to_device)

    def _unpack(self, saved, group: _Group) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        self._fetch(group)
        # This block's backward has started: bring the previous block's tensors back meanwhile.
        if group.previous is not None:
            self._fetch(group.previous)
        if not self.on_cuda:
            return saved.host
        if saved.device_copy is None:  # asked for a second time: copy it again
            self._copy_back(saved)
        torch.cuda.current_stream(self.device).wait_event(saved.ready)
        tensor, saved.device_copy = saved.device_copy, None
        return tensor


def apply_activation_offload(blocks: list[nn.Module], device: torch.device) -> ActivationOffloader:
    offloader = ActivationOffloader(device)
    for index, block in enumerate(blocks):
        offloader.wrap_block(block, first=index == 0)
    return offloader
