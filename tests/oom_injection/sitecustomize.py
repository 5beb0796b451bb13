"""Makes one trainer rank run out of memory in its first step (tests/test_long_sequence.py).

On PYTHONPATH, Python imports this module at start-up. In the process whose RANK equals
TITAN_CP_TEST_OOM_RANK, gradient clipping (called once per step, after backward) raises the
error a CUDA allocation failure raises, so the out-of-memory path runs without a GPU.
"""

import os

if os.environ.get("RANK", "0") == os.environ.get("TITAN_CP_TEST_OOM_RANK"):
    import torch

    def _out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)")

    torch.nn.utils.clip_grad_norm_ = _out_of_memory
