"""The validation loss is one global token mean, the same for every parallel layout.

A tiny Llama (tests/cp_model_utils.py) validates on a small jsonl set, with and without packing,
at cp = 1 in this process and at cp = 2, cp = 3 and dp 2 x cp 2 on gloo ranks; every layout
must give the cp = 1 figure within 1e-5 relative, and cp = 1 must equal an independent mean of
cross entropies over every sample of the set, each read exactly once. The set's size does not
divide into whole validation steps, so the empty samples that fill the last step are covered.
The token cache is built here first; in the spawned runs local rank 0 opens it (and adds the
packing plan) while the other ranks wait for it, and a bad record met by local rank 0 reaches
every rank as the same one-line error. The trainer logs the figure in metrics.jsonl.
"""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests import cp_model_utils as cpm
from tests.dist_utils import run_distributed
from tests.train_utils import TINY, read_metrics, run_train
from titan_cp.config.schema import Parallelism, Training, Validation
from titan_cp.context_parallel import ContextParallel
from titan_cp.data import Tokenizer
from titan_cp.data.loader import build_samples
from titan_cp.errors import UserError
from titan_cp.parallel import ParallelDims
from titan_cp.validation import Validator

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "assets/tokenizer/tokenizer.json"
ARGS = dataclasses.replace(cpm.TINY_ARGS, vocab_size=2048)
CPU = torch.device("cpu")
RTOL = 1e-5
WORDS = "the quick brown fox jumps over a lazy dog while seven kings sing of old rivers".split()
STEPS = (-1, 2)  # validation.steps: the whole set once, and a part of it
# (data_parallel_shard_degree, context_parallel_degree) per spawned world size
LAYOUTS = {2: (1, 2), 3: (1, 3), 4: (2, 2)}


def training(dataset: str, cache_dir: str, packing: bool) -> Training:
    # global batch 4 = 2 x dp 2, or 2 micro-batches of 2 without dp
    return Training(
        dataset_path=dataset, dataset_cache_dir=cache_dir, seq_len=cpm.SEQ_LEN, local_batch_size=2,
        global_batch_size=4, sample_packing=packing, loss_chunk_size=20,
    )  # fmt: skip


def validation_losses(dims: ParallelDims, meshes, dataset: str, cache_dir: str) -> dict:
    """{(packing, steps): (loss, targets)} on this layout."""
    tokenizer = Tokenizer(TOKENIZER)
    results = {}
    for packing in (False, True):
        parallelism = Parallelism(data_parallel_shard_degree=dims.dp_shard, context_parallel_degree=dims.cp)
        cp = ContextParallel(meshes.cp if meshes else None, parallelism, "auto", packing, CPU)
        case = cpm.Case("validation", sample_packing=packing)
        model = cpm.build_model(cp, dims, meshes.fsdp if meshes else None, case, ARGS)
        cpm.sharpen_attention(model)
        rank = torch.distributed.get_rank() if meshes else 0
        for steps in STEPS:
            validator = Validator(
                Validation(enable=True, dataset_path=dataset, freq=1, steps=steps),
                training(dataset, cache_dir, packing), tokenizer, dims.dp_rank(rank), dims.dp, cp, CPU,
            )  # fmt: skip
            results[(packing, steps)] = validator.run(model)
            assert model.training  # the model is back in training mode
    return results


def _world(rank: int, world_size: int, dataset: str, cache_dir: str, bad_dataset: str) -> dict:
    torch.use_deterministic_algorithms(True)
    dp, cp = LAYOUTS[world_size]
    dims = ParallelDims.from_config(Parallelism(data_parallel_shard_degree=dp, context_parallel_degree=cp), world_size)
    results = validation_losses(dims, dims.build_meshes("cpu"), dataset, cache_dir)
    # Local rank 0 builds this cache and meets the bad record; the other ranks wait for it.
    try:
        build_samples(bad_dataset, "validation.dataset_path", training(bad_dataset, cache_dir, True), Tokenizer(TOKENIZER))
    except UserError as error:
        results["error"] = str(error)
    return results


def independent_mean(dataset: str, cache_dir: str, packing: bool, num_samples: int | None) -> tuple[float, int]:
    """Cross entropy over the first `num_samples` samples (all if None), in one unsharded pass."""
    samples = build_samples(dataset, "validation.dataset_path", training(dataset, cache_dir, packing), Tokenizer(TOKENIZER))
    rows = [samples[i] for i in range(len(samples) if num_samples is None else num_samples)]
    tokens, labels, positions = (torch.stack(column) for column in zip(*rows))
    parallelism = Parallelism()
    cp = ContextParallel(None, parallelism, "auto", packing, CPU)
    model = cpm.build_model(cp, ParallelDims.from_config(parallelism, 1), None, cpm.Case("ref", sample_packing=packing), ARGS)
    cpm.sharpen_attention(model)
    with torch.no_grad():
        tokens, labels, positions, context = cp.shard(tokens, labels, positions)
        logits = model(tokens, positions, context)
    loss = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100)
    return loss.item(), int((labels != -100).sum())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("validation")
    rng = random.Random(1)
    path = folder / "valid.jsonl"
    # Documents of 2 to 70 words: some longer than seq_len, so packing splits them.
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(2, 70)))}) + "\n" for _ in range(13)))
    (folder / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    return str(path), str(folder / "cache")


def test_validation_loss_is_the_same_for_every_layout(dataset) -> None:
    path, cache_dir = dataset
    torch.use_deterministic_algorithms(True)
    try:
        reference = validation_losses(ParallelDims.from_config(Parallelism(), 1), None, path, cache_dir)
    finally:
        torch.use_deterministic_algorithms(False)
    for packing in (False, True):
        samples = build_samples(path, "validation.dataset_path", training(path, cache_dir, packing), Tokenizer(TOKENIZER))
        assert len(samples) % 4 != 0  # the last whole-set step is partly empty
        expected = independent_mean(path, cache_dir, packing, None)
        loss, targets = reference[(packing, -1)]
        assert targets == expected[1]
        assert abs(loss - expected[0]) <= RTOL * expected[0], (packing, loss, expected)
        # Two steps of 4 samples: the first 8 samples in order.
        partial = independent_mean(path, cache_dir, packing, 8)
        assert reference[(packing, 2)][1] == partial[1]
        assert abs(reference[(packing, 2)][0] - partial[0]) <= RTOL * partial[0]
    bad = str(Path(path).parent / "bad.jsonl")
    for world_size in LAYOUTS:
        results = run_distributed(_world, world_size, path, cache_dir, bad)
        # Every rank reports the builder's one-line error, naming the file and line.
        assert {r["error"] for r in results} == {f"training.dataset_path: {bad} line 3 is not JSON (Expecting value)"}
        for rank_result in results:
            for key, (loss, targets) in reference.items():
                got_loss, got_targets = rank_result[key]
                assert got_targets == targets, (world_size, key)
                assert abs(got_loss - loss) <= RTOL * loss, (world_size, key, got_loss, loss)


def test_the_trainer_logs_the_validation_loss(dataset, tmp_path: Path) -> None:
    path, cache_dir = dataset
    overrides = ["--training.sample_packing", "true", "--training.dataset_cache_dir", cache_dir, "--training.steps", "2"]
    validation = ["--validation.enable", "true", "--validation.dataset_path", path, "--validation.freq", "1"]
    result = run_train(tmp_path, *TINY, *overrides, *validation)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    records = [r for r in read_metrics(tmp_path) if "validation_loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    training = Training(dataset_path=path, dataset_cache_dir=cache_dir, seq_len=64, sample_packing=True)
    samples = build_samples(path, "validation.dataset_path", training, Tokenizer(TOKENIZER))
    targets = sum(int((samples[i][1] != -100).sum()) for i in range(len(samples)))
    assert all(r["validation_tokens"] == targets for r in records)  # the whole set, once per run
    assert records[0]["validation_loss"] != records[1]["validation_loss"]  # after another optimizer step
