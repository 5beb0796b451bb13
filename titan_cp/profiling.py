"""Per-step traces with torch.profiler: where a step's time goes, kernel by kernel.

Every `profiling.profile_freq` steps the step is traced after one warm-up step (the profiler's
first recorded step carries its own start-up cost). Each rank writes, under
`{job.dump_folder}/{profiling.save_traces_folder}/iteration_{step}/` (torchtitan's layout):

- `rank{r}_trace.json`: a Chrome trace, to open in Perfetto (ui.perfetto.dev) or chrome://tracing;
- `rank{r}_ops.txt`: the ops and kernels that took the most time in the step, as a table, so the
  answer to "what is slow" needs no trace viewer (device time on CUDA, CPU time on CPU).

The loop never waits for the GPU outside logging steps, so the GPU would still be running the
warm-up step's kernels when the traced step begins; the profiler waits for them there (one
device sync per trace), so the trace and the table hold the traced step's kernels alone.
"""

import os
import time
from contextlib import AbstractContextManager

import torch
from torch.profiler import ProfilerActivity, profile, schedule

# Rows of the op table: enough to cover a block's kernels and the loss and optimizer.
_TABLE_ROWS = 40


class StepProfiler(AbstractContextManager):
    """Call `step(n)` after training step `n`; steps divisible by `profile_freq` are traced."""

    def __init__(self, cfg, dump_folder: str, rank: int, device: torch.device):
        self.enabled = cfg.enable_profiling
        self.freq = cfg.profile_freq
        self.folder = os.path.join(dump_folder, cfg.save_traces_folder)
        self.rank = rank
        self.on_cuda = device.type == "cuda"
        self._profiler: profile | None = None
        # Seconds the last save took after the traced step's kernels had finished: not training.
        self.last_save_seconds = 0.0

    def __exit__(self, *exc) -> None:
        if self._profiler is not None:  # a run that stopped between a trace's start and its save
            self._profiler.stop()
            self._profiler = None

    def step(self, step: int) -> str | None:
        """After training step `step`: start tracing before a traced step's warm-up step, end
        the warm-up, or save the trace of a traced step. Returns the folder of a saved trace."""
        if not self.enabled:
            return None
        written = None
        if self._profiler is not None and (step + 1) % self.freq == 0:
            if self.on_cuda:
                torch.cuda.synchronize()  # the warm-up step's kernels stay out of the trace
            self._profiler.step()  # the warm-up step is over: record the next one
        elif self._profiler is not None and step % self.freq == 0:
            written = self._save(step)
        if (step + 2) % self.freq == 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
            self._profiler = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=1, repeat=1))
            self._profiler.start()
        return written

    def _save(self, step: int) -> str:
        profiler, self._profiler = self._profiler, None
        if self.on_cuda:
            torch.cuda.synchronize()  # the traced step's kernels end inside the recorded window
        started = time.perf_counter()
        profiler.stop()
        folder = os.path.join(self.folder, f"iteration_{step}")
        os.makedirs(folder, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(folder, f"rank{self.rank}_trace.json"))
        sort_by = "self_device_time_total" if self.on_cuda else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort_by, row_limit=_TABLE_ROWS)
        with open(os.path.join(folder, f"rank{self.rank}_ops.txt"), "w") as f:
            f.write(f"step {step}, rank {self.rank}, sorted by {sort_by}\n{table}\n")
        self.last_save_seconds = time.perf_counter() - started
        return folder
