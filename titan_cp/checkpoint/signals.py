"""Preemption: turn SIGTERM into a flag that every rank agrees on at the same step.

A cluster scheduler announces preemption with SIGTERM and follows with SIGKILL after a grace
period. Saving inside the signal handler would start collectives on one rank only and hang the
job, so the handler only records the signal; the trainer asks `should_stop()` once per step, which
all-reduces the flag (MAX) so that every rank sees True at the same step, saves together and exits 0.
"""

import signal
from types import FrameType

import torch
import torch.distributed as dist


class PreemptionFlag:
    """Set by SIGTERM (or `request()`), read collectively by `should_stop()`."""

    def __init__(self) -> None:
        self.requested = False

    def install(self, signum: signal.Signals = signal.SIGTERM) -> "PreemptionFlag":
        """Replace the handler of `signum` (main thread only, as Python requires)."""
        signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request()

    def request(self) -> None:
        self.requested = True

    def should_stop(
        self, device: torch.device | None = None, group: dist.ProcessGroup | None = None
    ) -> bool:
        """True on every rank of `group` once any rank was signalled: a collective, call it on all ranks.

        `device` holds the one-element flag for the all-reduce; it defaults to the CPU, or to the
        current CUDA device when the group is NCCL-only.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        if device is None:
            device = torch.device("cpu")
            if dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([int(self.requested)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())


def install_sigterm_handler() -> PreemptionFlag:
    """A fresh flag that SIGTERM sets."""
    return PreemptionFlag().install()
