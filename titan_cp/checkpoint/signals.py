"""Stopping on a signal: SIGTERM (preemption) and SIGINT (Ctrl-C), agreed by every rank at one step.

A cluster scheduler announces preemption with SIGTERM and follows with SIGKILL after a grace
period; a user at a terminal presses Ctrl-C. Saving inside the signal handler would start
collectives on one rank only and hang the job, so the handler only records the signal; the
trainer asks `should_stop()` once per step, which all-reduces the signal (MAX) so that every
rank sees it at the same step, saves together and exits. A second SIGINT ends the process at
once, without saving: the user does not want to wait for the checkpoint.
"""

import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

# The shell's exit code for a process ended by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT

# Agreement takes the highest code: Ctrl-C outranks preemption (same stop, other exit code).
_CODES = {None: 0, signal.SIGTERM: 1, signal.SIGINT: 2}
_SIGNALS = {code: signum for signum, code in _CODES.items()}


class StopFlag:
    """Set by SIGTERM or SIGINT (or `request()`), read collectively by `should_stop()`."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def install(self) -> "StopFlag":
        """Replace the handlers of SIGTERM and SIGINT (main thread only, as Python requires)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            os._exit(INTERRUPTED_EXIT_CODE)
        self.request(signal.Signals(signum))

    def request(self, signum: signal.Signals = signal.SIGTERM) -> None:
        if _CODES[signum] > _CODES[self.received]:
            self.received = signum

    def should_stop(
        self, device: torch.device | None = None, group: dist.ProcessGroup | None = None
    ) -> signal.Signals | None:
        """The signal any rank of `group` received, the same on every rank; None to go on.

        A collective: call it on all ranks. `device` holds the one-element flag for the
        all-reduce; it defaults to the CPU, or to the current CUDA device when the group is NCCL-only.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self.received
        if device is None:
            device = torch.device("cpu")
            if dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
        code = torch.tensor([_CODES[self.received]], dtype=torch.int32, device=device)
        dist.all_reduce(code, op=dist.ReduceOp.MAX, group=group)
        return _SIGNALS[int(code.item())]
