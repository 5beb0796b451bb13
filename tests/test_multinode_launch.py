"""Two launches of `scripts/run_train.sh` on 127.0.0.1 act as two nodes.

`scripts/slurm_train.sbatch` starts them, with stand-ins for `srun` (one task per node of a
two-node allocation, all on this host) and `scontrol` (node 0 is 127.0.0.1). One process per
"node" and cp = 2 (static rendezvous at node 0), so the ring crosses between the nodes: the
per-step losses equal one process without cp (the hybrid Ulysses x ring math is checked against
cp = 1 in tests/test_ulysses_model.py). Two processes per "node" and cp = 4: FSDP shards within
each node and replicates across them (parallelism.fsdp_shard_within_node), and the losses and
gradient norms still equal one process's. A Ulysses group larger than a node is refused by both nodes in one
line (these two nodes meet through RDZV_ENDPOINT, torchrun's c10d rendezvous), and a multi-node
setting without a rendezvous address is refused before torchrun starts.
"""

import os
import subprocess

import pytest

from tests.dist_utils import free_port
from tests.train_utils import REPO, TINY, assert_close_curves, read_metrics, train_curves

STEPS = ["--training.steps", "3", "--training.local_batch_size", "1", "--training.global_batch_size", "1"]
CP2 = ["--parallelism.context_parallel_degree", "2"]
CP4 = ["--parallelism.context_parallel_degree", "4"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, list[float]]:
    """The reference: per-step losses and gradient norms of one process without cp."""
    return train_curves(tmp_path_factory.mktemp("one"), *STEPS)


def _curves(dump_folder) -> dict[str, list[float]]:
    records = [record for record in read_metrics(dump_folder) if "loss" in record]
    return {key: [record[key] for record in records] for key in ("loss", "grad_norm")}


def _two_nodes_c10d(dump_folder, *overrides: str) -> list[subprocess.CompletedProcess]:
    """Start two nodes of one job (NNODES=2, one process each) through torchrun's c10d rendezvous."""
    endpoint = f"127.0.0.1:{free_port()}"
    launches = []
    for _ in range(2):
        env = {**os.environ, "NGPU": "1", "OMP_NUM_THREADS": "1", "NNODES": "2", "RDZV_ENDPOINT": endpoint}
        launches.append(subprocess.Popen(
            ["bash", str(REPO / "scripts" / "run_train.sh"), "train_configs/debug_model.toml",
             "--job.dump_folder", str(dump_folder), *TINY, *STEPS, *overrides],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    results = []
    for launch in launches:
        try:
            stdout, stderr = launch.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in launches:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(launch.args, launch.returncode, stdout, stderr))
    return results


FAKE_SRUN = """#!/usr/bin/env bash
# srun stand-in: the command once per node of the allocation, all on this host.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do
  SLURM_NODEID=$node "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = "#!/usr/bin/env bash\necho 127.0.0.1\n"


def _slurm_job(tmp_path, dump_folder, *overrides: str, processes_per_node: int = 1) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_SUBMIT_DIR": str(REPO), "NGPU": str(processes_per_node),
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}  # fmt: skip
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm_train.sbatch"), "train_configs/debug_model.toml",
         "--job.dump_folder", str(dump_folder), *TINY, *STEPS, *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_two_localhost_nodes_give_the_losses_of_one_process(tmp_path, one_process):
    result = _slurm_job(tmp_path, tmp_path / "two", *CP2)
    assert result.returncode == 0, f"{result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    # Both nodes joined one world of 2 (rank 1 is the other node's only process).
    assert "world 2 = dp_replicate 1 x dp_shard 1 x cp 2" in result.stdout, result.stdout[-2000:]
    assert_close_curves(_curves(tmp_path / "two"), one_process, rtol=1e-5)


def test_fsdp_sharded_within_each_node_gives_the_losses_and_gradients_of_one_process(tmp_path, one_process):
    result = _slurm_job(tmp_path, tmp_path / "two", *CP4, processes_per_node=2)
    assert result.returncode == 0, f"{result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
    # cp spans both nodes; FSDP's all-gathers and reduce-scatters stay inside each.
    expected = "FSDP shards over 2 ranks (one node's share of dp_shard x cp = 4), replicated 2x (HSDP)"
    assert expected in result.stdout, result.stdout[-2000:]
    assert_close_curves(_curves(tmp_path / "two"), one_process, rtol=1e-5)


def test_ulysses_group_larger_than_a_node_is_refused_on_every_node(tmp_path):
    # This line needs a world of 2 with 1 process per node: the two launches met in one job.
    for result in _two_nodes_c10d(tmp_path, *CP2, "--parallelism.context_parallel_ulysses_degree", "2"):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-2000:]
        assert "cannot place its groups on nodes of 1 processes" in lines[-1], result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_multi_node_without_an_address_is_refused(tmp_path):
    result = subprocess.run(
        ["bash", "scripts/run_train.sh", "--job.dump_folder", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in {**os.environ, "NNODES": "2", "NODE_RANK": "0"}.items() if k != "MASTER_ADDR"},
    )  # fmt: skip
    assert result.returncode == 2
    expected = "error: NNODES=2 needs NODE_RANK and MASTER_ADDR (node 0's address), or RDZV_ENDPOINT"
    assert result.stderr.strip() == expected
