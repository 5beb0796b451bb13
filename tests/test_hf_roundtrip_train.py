"""Hugging Face weights through the trainer: export at the end of a run, start a run from them.

Run A trains 3 steps and exports (`checkpoint.last_save_in_hf`). transformers loads the export,
and run B, started from it (`checkpoint.initial_load_path`), reports as its first loss exactly
what transformers computes on the same first batch: the weights made the whole round trip.
"""

import json

import torch
import torch.nn.functional as F
import transformers

from titan_cp.config.schema import Training
from titan_cp.data import Tokenizer, build_dataloader
from tests.train_utils import REPO, read_metrics, run_train

SHAPE = ["--training.seq_len", "64", "--training.local_batch_size", "2", "--metrics.log_freq", "1"]


def test_export_then_initial_load_through_the_trainer(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    result = run_train(first, *SHAPE, "--training.steps", "3", "--checkpoint.last_save_in_hf", "true")
    assert result.returncode == 0, result.stderr[-2000:]
    export = first / "hf"
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export, torch_dtype=torch.float32).eval()

    result = run_train(
        second, *SHAPE, "--training.steps", "1",
        "--checkpoint.initial_load_path", str(export), "--checkpoint.initial_load_in_hf", "true",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    reported = read_metrics(second)[0]["loss"]

    tokenizer = Tokenizer(str(REPO / "assets/tokenizer/tokenizer.json"))
    training = Training(dataset_path=str(REPO / "assets/data/tinyshakespeare.txt"), seq_len=64, local_batch_size=2)
    batch = next(iter(build_dataloader(training, tokenizer, dp_rank=0, dp_world_size=1, seed=0)))
    with torch.no_grad():
        logits = hf_model(batch.tokens, position_ids=batch.positions).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100).item()
    assert abs(reported - expected) <= 1e-4 * expected, (reported, expected)
    # The run really started from the trained weights, not from a fresh initialisation.
    assert reported < read_metrics(first)[0]["loss"] - 0.05
