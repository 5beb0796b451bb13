"""CheckpointManager and StopFlag: exact resume, atomic saves, pruning and clear errors.

The reference for "restored" is always the live objects of the run that saved (their full
parameters, raw optimizer state, scheduler, loader and RNG), never the checkpoint API itself.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.optim.lr_scheduler import LambdaLR

from tests.dist_utils import run_distributed
from titan_cp.checkpoint.manager import CheckpointManager, list_checkpoint_steps
from titan_cp.checkpoint.signals import StopFlag
from titan_cp.config.schema import Checkpoint
from titan_cp.errors import UserError

REPO = Path(__file__).resolve().parents[1]


class CounterLoader:
    """A data loader whose batches depend on its position and its dp rank, like the real one."""

    def __init__(self, dp_rank: int) -> None:
        self.dp_rank = dp_rank
        self.counter = 0

    def next_batch(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1000 * self.dp_rank + self.counter)
        self.counter += 1
        return torch.randn(4, 8, generator=generator)

    def state_dict(self) -> dict:
        return {"counter": self.counter, "dp_rank": self.dp_rank}

    def load_state_dict(self, state: dict) -> None:
        self.counter = state["counter"]


def _cfg(**overrides) -> Checkpoint:
    return Checkpoint(**{"enable": True, "interval": 1, "keep_latest_k": 0, **overrides})


def _build(seed: int, dp_rank: int, mesh=None, hidden: int = 16):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 4))
    if mesh is not None:
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, optimizer, scheduler, CounterLoader(dp_rank)


def _train_step(model, optimizer, scheduler, loader) -> torch.Tensor:
    # The noise draws on the global RNG, so only a restored RNG reproduces the run.
    x = loader.next_batch() + 0.01 * torch.randn(4, 8)
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _snapshot(model, optimizer, scheduler, loader) -> dict:
    """Everything resume must restore, read straight from the live objects."""
    optim_state = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})  # .get: indexing would add an entry
            optim_state.append({k: _full(v) for k, v in sorted(state.items())})
    return {
        "params": {name: _full(p) for name, p in model.named_parameters()},
        "optim": optim_state,
        "lrs": [group["lr"] for group in optimizer.param_groups],
        "sched": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "loader": loader.state_dict(),
        "rng": torch.get_rng_state(),
    }


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _folder_listing(folder: str) -> list:
    return sorted(
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).rglob("*")
    )


# ------------------------------------------------------------ FSDP2 over 2 gloo ranks


def _resume_fsdp(rank: int, world_size: int, dump: str) -> None:
    mesh = init_device_mesh("cpu", (world_size,))
    parts = _build(seed=0, dp_rank=rank, mesh=mesh)
    manager = CheckpointManager(_cfg(interval=3), dump, *parts, dp_rank=rank)
    assert manager.load() == 0
    losses = []
    for step in range(1, 7):
        losses.append(_train_step(*parts))
        manager.extra_state["tokens"] = step * 100
        manager.maybe_save(step)
        if step == 3:
            at_step3 = _snapshot(*parts)
    final = _snapshot(*parts)
    assert list_checkpoint_steps(os.path.join(dump, "checkpoint")) == [3, 6]

    fresh = _build(seed=1, dp_rank=rank, mesh=mesh)
    for _ in range(2):  # a different history: other weights, optimizer state, RNG, position
        _train_step(*fresh)
    resumed = CheckpointManager(_cfg(interval=3, load_step=3), dump, *fresh, dp_rank=rank)
    before = _folder_listing(dump)
    assert resumed.load() == 3
    assert _folder_listing(dump) == before, "load wrote into the checkpoint folder"
    assert resumed.extra_state == {"tokens": 300}
    _assert_same(at_step3, _snapshot(*fresh), "step3")
    for step in range(4, 7):
        assert torch.equal(_train_step(*fresh), losses[step - 1]), f"loss of step {step}"
    _assert_same(final, _snapshot(*fresh), "step6")

    # A dp rank the checkpoint does not know, whose peers' loader states differ, is refused on
    # every rank (no rank is left waiting in a collective).
    stranger = CheckpointManager(_cfg(), dump, *_build(seed=2, dp_rank=rank + 2, mesh=mesh), dp_rank=rank + 2)
    with pytest.raises(UserError, match=r"dp ranks \[0, 1\] but not for dp rank"):
        stranger.load()

    # Rank 1's shard of step 6 is damaged but keeps its size, so only reading it fails, on rank 1
    # alone: both ranks must fall back to step 3 together and hold exactly its state.
    shard = os.path.join(dump, "checkpoint", "step-6", "__1_0.distcp")
    if rank == 0:
        _scramble_middle(shard)
    torch.distributed.barrier()
    damaged = Path(shard).read_bytes()
    fallback = _build(seed=3, dp_rank=rank, mesh=mesh)
    assert CheckpointManager(_cfg(), dump, *fallback, dp_rank=rank).load() == 3
    _assert_same(at_step3, _snapshot(*fallback), "fallback to step3")
    assert Path(shard).read_bytes() == damaged, "the damaged checkpoint was changed"


def _scramble_middle(file: str) -> None:
    """Overwrite the middle third of `file` with zeros, keeping its size."""
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.seek(size // 3)
        f.write(bytes(size // 3))


def _fsdp_then_preemption(rank: int, world_size: int, dump: str) -> list[bool]:
    # One group of processes for both checks: starting processes is the slow part of these tests.
    _resume_fsdp(rank, world_size, dump)
    return _sigterm_on_rank1(rank)


def test_fsdp_resume_and_sigterm_agreement(tmp_path):
    """FSDP2 resume is exact (see _resume_fsdp); a SIGTERM on one rank stops all at one step."""
    decisions = run_distributed(_fsdp_then_preemption, 2, str(tmp_path), timeout=180)
    assert decisions == [[False, False, True, True]] * 2


# ------------------------------------------------------------ single process, no process group


def _plain(seed: int = 0, hidden: int = 16):
    return _build(seed=seed, dp_rank=0, hidden=hidden)


def test_single_process_resume_is_exact(tmp_path):
    parts = _plain()
    manager = CheckpointManager(_cfg(interval=2), str(tmp_path), *parts, dp_rank=0)
    for step in range(1, 3):
        _train_step(*parts)
        manager.maybe_save(step)
    expected = _snapshot(*parts)
    later = [_train_step(*parts) for _ in range(2)]

    fresh = _plain(seed=5)
    assert CheckpointManager(_cfg(), str(tmp_path), *fresh, dp_rank=0).load() == 2
    _assert_same(expected, _snapshot(*fresh))
    assert all(torch.equal(_train_step(*fresh), loss) for loss in later)


def test_meta_json_is_written(tmp_path):
    manager = CheckpointManager(_cfg(), str(tmp_path), *_plain(), dp_rank=0, model_args={"dim": 16})
    manager.save(7)
    meta = json.loads((tmp_path / "checkpoint" / "step-7" / "meta.json").read_text())
    assert meta["step"] == 7 and meta["model_args"] == {"dim": 16} and meta["titan_cp_version"]


def test_leftover_tmp_folder_is_ignored_then_removed(tmp_path):
    parts = _plain()
    manager = CheckpointManager(_cfg(), str(tmp_path), *parts, dp_rank=0)
    _train_step(*parts)
    manager.save(1)
    expected = _snapshot(*parts)
    # What a save killed half-way leaves: a later step, junk shards, even a .metadata.
    dead = tmp_path / "checkpoint" / "step-9.tmp-deadbeef"
    dead.mkdir()
    (dead / "__0_0.distcp").write_bytes(os.urandom(1000))
    (dead / ".metadata").write_bytes(b"garbage")

    fresh = _plain(seed=3)
    fresh_manager = CheckpointManager(_cfg(), str(tmp_path), *fresh, dp_rank=0)
    assert fresh_manager.load() == 1
    _assert_same(expected, _snapshot(*fresh))
    assert dead.exists(), "load must never write to (or clean) the checkpoint folder"
    fresh_manager.save(2)
    assert not dead.exists()
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-1", "step-2"]


def test_keep_latest_k_prunes_oldest(tmp_path):
    manager = CheckpointManager(_cfg(keep_latest_k=2, interval=2), str(tmp_path), *_plain(), dp_rank=0)
    for step in range(1, 8):
        manager.maybe_save(step, last_step=step == 7)
    assert list_checkpoint_steps(str(tmp_path / "checkpoint")) == [6, 7]
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-6", "step-7"]

    keep_all = CheckpointManager(_cfg(folder="all"), str(tmp_path), *_plain(), dp_rank=0)
    for step in range(1, 5):
        keep_all.maybe_save(step)
    assert list_checkpoint_steps(str(tmp_path / "all")) == [1, 2, 3, 4]


def test_resume_from_earlier_step_keeps_later_checkpoints_and_resaves(tmp_path):
    manager = CheckpointManager(_cfg(keep_latest_k=1), str(tmp_path), *_plain(), dp_rank=0)
    manager.save(2)
    manager.save(4)
    assert list_checkpoint_steps(str(tmp_path / "checkpoint")) == [4]
    keep = CheckpointManager(_cfg(keep_latest_k=0), str(tmp_path), *_plain(), dp_rank=0)
    keep.save(2)
    parts = _plain(seed=4)
    again = CheckpointManager(_cfg(keep_latest_k=1, load_step=2), str(tmp_path), *parts, dp_rank=0)
    assert again.load() == 2
    _train_step(*parts)
    again.save(3)  # prunes step 2 (older), never step 4 (a later step of an earlier run)
    assert list_checkpoint_steps(str(tmp_path / "checkpoint")) == [3, 4]
    again.save(4)  # the same step again replaces it
    assert list_checkpoint_steps(str(tmp_path / "checkpoint")) == [4]
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-4"]
    expected = _snapshot(*parts)
    fresh = _plain(seed=6)
    assert CheckpointManager(_cfg(), str(tmp_path), *fresh, dp_rank=0).load() == 4
    _assert_same(expected["params"], _snapshot(*fresh)["params"])


def test_missing_load_step_lists_existing_steps(tmp_path):
    manager = CheckpointManager(_cfg(), str(tmp_path), *_plain(), dp_rank=0)
    manager.save(2)
    manager.save(4)
    wanted = CheckpointManager(_cfg(load_step=3), str(tmp_path), *_plain(), dp_rank=0)
    with pytest.raises(UserError, match=r"checkpoint.load_step 3: .*complete steps there: 2, 4"):
        wanted.load()
    empty = CheckpointManager(_cfg(load_step=3, folder="nothing"), str(tmp_path), *_plain(), dp_rank=0)
    with pytest.raises(UserError, match="complete steps there: none"):
        empty.load()
    assert CheckpointManager(_cfg(load_step=2), str(tmp_path), *_plain(), dp_rank=0).load() == 2


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    CheckpointManager(_cfg(), str(tmp_path), *_plain(hidden=16), dp_rank=0).save(1)
    other = CheckpointManager(_cfg(), str(tmp_path), *_plain(hidden=32), dp_rank=0)
    with pytest.raises(UserError) as error:
        other.load()
    message = str(error.value)
    assert "'model.0.weight'" in message and "[16, 8]" in message and "[32, 8]" in message
    assert "\n" not in message


def test_missing_and_extra_tensors_are_named(tmp_path):
    CheckpointManager(_cfg(), str(tmp_path), *_plain(), dp_rank=0).save(1)
    model, optimizer, scheduler, loader = _plain()
    bigger = nn.Sequential(*model, nn.Linear(4, 4))
    with pytest.raises(UserError, match=r"no tensor 'model.3.weight'"):
        CheckpointManager(_cfg(), str(tmp_path), bigger, None, None, None, dp_rank=0).load()
    smaller = nn.Sequential(model[0])
    with pytest.raises(UserError, match=r"has tensor 'model.2.(weight|bias)' that this model lacks"):
        CheckpointManager(_cfg(), str(tmp_path), smaller, None, None, None, dp_rank=0).load()


def _two_checkpoints(dump: Path) -> tuple:
    parts = _plain()
    manager = CheckpointManager(_cfg(), str(dump), *parts, dp_rank=0)
    _train_step(*parts)
    manager.save(1)
    at_step1 = _snapshot(*parts)
    _train_step(*parts)
    manager.save(2)
    return at_step1, dump / "checkpoint" / "step-2"


def _cut_short(file: Path) -> None:
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)


@pytest.mark.parametrize("damage", ["cut_distcp", "cut_metadata", "scrambled_distcp"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys, damage):
    at_step1, newest = _two_checkpoints(tmp_path)
    if damage == "cut_distcp":
        damaged = newest / "__0_0.distcp"
        _cut_short(damaged)
    elif damage == "cut_metadata":
        damaged = newest / ".metadata"
        _cut_short(damaged)
    else:  # same size: found only when DCP reads it
        damaged = newest / "__0_0.distcp"
        _scramble_middle(str(damaged))
    before = _folder_listing(str(tmp_path))
    content = damaged.read_bytes()

    fresh = _plain(seed=5)
    assert CheckpointManager(_cfg(), str(tmp_path), *fresh, dp_rank=0).load() == 1
    _assert_same(at_step1, _snapshot(*fresh))
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    named = str(newest) if damage == "scrambled_distcp" else str(damaged)
    assert len(warnings) == 1 and named in warnings[0], warnings
    assert _folder_listing(str(tmp_path)) == before and damaged.read_bytes() == content


def test_no_loadable_checkpoint_names_the_file_and_what_to_do(tmp_path):
    _, newest = _two_checkpoints(tmp_path)
    _cut_short(tmp_path / "checkpoint" / "step-1" / ".metadata")
    _cut_short(newest / "__0_0.distcp")
    with pytest.raises(UserError, match=r"step-1/\.metadata is damaged .*move the damaged step folder"):
        CheckpointManager(_cfg(), str(tmp_path), *_plain(), dp_rank=0).load()
    with pytest.raises(UserError, match=r"step-2/__0_0\.distcp is damaged .*choose another checkpoint.load_step"):
        CheckpointManager(_cfg(load_step=2), str(tmp_path), *_plain(), dp_rank=0).load()


def test_disabled_does_nothing(tmp_path):
    CheckpointManager(_cfg(), str(tmp_path), *_plain(), dp_rank=0).save(1)
    off = CheckpointManager(_cfg(enable=False), str(tmp_path), *_plain(), dp_rank=0)
    assert off.load() == 0
    assert not off.maybe_save(5, last_step=True) and not off.save(5)
    assert list_checkpoint_steps(str(tmp_path / "checkpoint")) == [1]
    assert CheckpointManager(_cfg(folder="fresh"), str(tmp_path), *_plain(), dp_rank=0).load() == 0


# ------------------------------------------------------------ kill -9 in the middle of saving


def save_forever(dump: str) -> None:
    """Child process of the kill test: ~8 MB per save, every value equal to the step number."""
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    loader = CounterLoader(dp_rank=0)
    manager = CheckpointManager(_cfg(keep_latest_k=2), dump, model, None, None, loader, dp_rank=0)
    step = manager.load()
    print(f"resumed {step}", flush=True)
    while True:
        step += 1
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float(step))
        loader.counter = step
        manager.extra_state["step"] = step
        manager.save(step)
        print(f"saved {step}", flush=True)


def _kill_during_saves(dump: str, rng: random.Random) -> int:
    """Start the saver, let it finish two saves, SIGKILL it at a random moment; return its last printed step."""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from tests.test_checkpoint import save_forever; save_forever({dump!r})"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    seen = []
    try:
        while len([line for line in seen if line.startswith("saved")]) < 2:
            line = proc.stdout.readline()
            assert line, "saver exited early"
            seen.append(line.strip())
        time.sleep(rng.uniform(0.0, 0.4))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    seen += [line.strip() for line in proc.stdout.read().splitlines()]
    return max(int(line.split()[1]) for line in seen if line.startswith("saved"))


def _check_latest_intact(dump: str, at_least: int) -> int:
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    loader = CounterLoader(dp_rank=0)
    manager = CheckpointManager(_cfg(), dump, model, None, None, loader, dp_rank=0)
    step = manager.load()
    assert step >= at_least
    assert all(torch.all(p == float(step)) for p in model.parameters()), "torn checkpoint"
    assert loader.counter == step and manager.extra_state == {"step": step}
    return step


def test_sigkill_during_save_leaves_latest_complete_checkpoint_intact(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    dump = str(tmp_path)
    last_reported = _kill_during_saves(dump, rng)
    first = _check_latest_intact(dump, at_least=last_reported)
    # A second run resumes from it, saves over any leftover, and is killed again.
    last_reported = _kill_during_saves(dump, rng)
    second = _check_latest_intact(dump, at_least=last_reported)
    assert second > first, f"seed {seed}"
    leftovers = [n for n in os.listdir(tmp_path / "checkpoint") if ".tmp-" in n]
    assert len(leftovers) <= 1, f"seed {seed}: {leftovers}"


# ------------------------------------------------------------ preemption


def _sigterm_on_rank1(rank: int) -> list[bool]:
    """Rank 1 alone is signalled at step 2; every rank must decide to stop at that same step."""
    flag = StopFlag().install()
    decisions = []
    try:
        for step in range(4):
            if rank == 1 and step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            decisions.append(flag.should_stop() == signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return decisions


def test_stop_flag_without_process_group():
    flag = StopFlag()
    assert flag.should_stop() is None
    flag.request()
    assert flag.should_stop() == signal.SIGTERM
    flag.request(signal.SIGINT)  # Ctrl-C outranks preemption: same stop, exit code 130
    flag.request(signal.SIGTERM)
    assert flag.should_stop() == signal.SIGINT


def test_second_sigint_ends_the_process_at_once():
    """The first SIGINT only sets the flag; the second exits with 130 before the flag is read."""
    script = (
        "import os, signal, time\n"
        "from titan_cp.checkpoint.signals import StopFlag\n"
        "flag = StopFlag().install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "assert flag.received == signal.SIGINT\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130, result.stderr
    assert result.stderr == ""
