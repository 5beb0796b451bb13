from titan_cp.parallel.distributed import init_distributed, pick_device, set_collective_timeout
from titan_cp.parallel.parallel_dims import Meshes, ParallelDims
from titan_cp.parallel.parallelize import parallelize_llama

__all__ = [
    "Meshes",
    "ParallelDims",
    "init_distributed",
    "parallelize_llama",
    "pick_device",
    "set_collective_timeout",
]
