"""Fine-tune a transformers-written Llama on packed chat data through the launcher, as a user would.

The folder has an explicit head_dim (12, not hidden 32 / 4 heads), tied embeddings and
attention and MLP biases (which FSDP shards like any parameter), so it matches no built-in flavor. The same packed chat fine-tuning job runs with cp = 1, 2 and 3 and
must report the same losses; its first loss must equal transformers' loss on the same first batch
(each packed conversation scored on its own, prompts masked); the exported folder must serve in
transformers.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.hf_utils import save_random_llama, save_tokenizer_files
from tests.train_utils import REPO, assert_close_losses, assert_one_error_line, read_metrics, run_train
from titan_cp.config.schema import Training
from titan_cp.data import Tokenizer, build_dataloader

SEQ_LEN, BATCH, STEPS = 96, 2, 3  # 96 splits into 2 * cp chunks for cp = 1, 2 and 3


def _conversations() -> list[dict]:
    """Multi-turn chats, some with a system message, built from the shipped corpus."""
    blocks = (REPO / "assets" / "data" / "tinyshakespeare.txt").read_text().split("\n\n")
    lines = [line for block in blocks[:60] for line in block.splitlines()[1:] if line.strip()]
    conversations = []
    for i in range(0, 120, 4):
        messages = [{"role": "system", "content": "Answer in verse."}] if i % 8 == 0 else []
        messages += [
            {"role": "user", "content": lines[i]},
            {"role": "assistant", "content": lines[i + 1]},
            {"role": "user", "content": lines[i + 2]},
            {"role": "assistant", "content": lines[i + 3]},
        ]
        conversations.append({"messages": messages})
    return conversations


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    folder = root / "hf_model"
    save_random_llama(folder, vocab_size=2048, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      head_dim=12, tied=True, rope_theta=500000.0,
                      attention_bias=True, mlp_bias=True)  # fmt: skip
    save_tokenizer_files(folder)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in _conversations()))
    return folder, data, root


def _overrides(folder, data, *extra: str) -> list[str]:
    return [
        "--model.hf_assets_path", str(folder), "--model.tokenizer_path", "",
        "--checkpoint.initial_load_path", str(folder), "--checkpoint.initial_load_in_hf", "true",
        "--training.dataset_path", str(data), "--training.sample_packing", "true",
        "--training.seq_len", str(SEQ_LEN), "--training.local_batch_size", str(BATCH),
        "--training.steps", str(STEPS), "--metrics.log_freq", "1", "--debug.deterministic", "true",
        "--lr_scheduler.warmup_steps", "1", "--training.dataset_cache_dir", str(data.parent / "cache"), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(job):
    folder, data, root = job
    results = {}
    for cp in (1, 2, 3):
        extra = ["--parallelism.context_parallel_degree", str(cp)]
        if cp == 1:
            extra += ["--checkpoint.last_save_in_hf", "true", "--checkpoint.export_dtype", "float32"]
        result = run_train(root / f"cp{cp}", *_overrides(folder, data, *extra), ngpu=cp)
        assert result.returncode == 0, result.stderr[-3000:]
        results[cp] = (result, read_metrics(root / f"cp{cp}"))
    return results


def test_startup_line_names_config_json(job, runs):
    folder = job[0]
    assert f"model llama3 (shape from {folder / 'config.json'})" in runs[1][0].stdout


def test_same_losses_with_cp_1_2_3(runs):
    losses = {cp: [record["loss"] for record in records] for cp, (_, records) in runs.items()}
    assert len(losses[1]) == STEPS
    assert_close_losses(losses[2], losses[1], rtol=1e-5)
    assert_close_losses(losses[3], losses[1], rtol=1e-5)


def _first_batch(folder, data, train_on_inputs: str):
    training = Training(dataset_path=str(data), dataset_cache_dir=str(data.parent / "cache"), seq_len=SEQ_LEN,
                        local_batch_size=BATCH, sample_packing=True, train_on_inputs=train_on_inputs)  # fmt: skip
    return next(iter(build_dataloader(training, Tokenizer(folder), dp_rank=0, dp_world_size=1, seed=0)))


def test_first_loss_equals_transformers_per_document(job, runs):
    import transformers

    folder, data, _ = job
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = _first_batch(folder, data, "false")
    loss_sum, count = 0.0, 0
    for tokens, labels, positions in zip(*batch.as_tuple()):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(tokens)]
        for start, end in zip(starts, starts[1:]):
            with torch.no_grad():
                logits = reference(tokens[None, start:end]).logits[0]
            target = labels[start:end]
            loss_sum += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    expected = loss_sum / count
    first = runs[1][1][0]
    assert abs(first["loss"] - expected) <= 1e-5 * expected, (first["loss"], expected)
    assert first["ntokens_seen"] == count  # the trainer counted exactly these targets


def test_prompts_masked_leave_fewer_targets(job):
    folder, data, _ = job
    masked, everything = _first_batch(folder, data, "false"), _first_batch(folder, data, "true")
    assert torch.equal(masked.tokens, everything.tokens)
    is_target = masked.labels != -100
    assert torch.equal(masked.labels[is_target], everything.labels[is_target])  # a subset of the same targets
    assert 0 < int(is_target.sum()) < int((everything.labels != -100).sum())


def test_export_serves_in_transformers(job, runs):
    import transformers

    export = job[2] / "cp1" / "hf"
    config = json.loads((export / "config.json").read_text())
    assert (config["head_dim"], config["tie_word_embeddings"], config["eos_token_id"]) == (12, True, 1)
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Speak."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def _folder_with(root, config_change: dict | None, with_tokenizer: bool = True, with_config: bool = True):
    """A copy of the shipped tiny model's folder, its config.json changed or files left out."""
    folder = root / "model"
    folder.mkdir()
    config = json.loads((REPO / "assets" / "tiny_llama" / "config.json").read_text())
    if with_config:
        (folder / "config.json").write_text(json.dumps({**config, **(config_change or {})}))
    if with_tokenizer:
        save_tokenizer_files(folder)
    return str(folder)


BAD_FOLDERS = {
    "no config.json": (lambda d: _folder_with(d, None, with_config=False), ["config.json", "missing"]),
    "no tokenizer": (lambda d: _folder_with(d, None, with_tokenizer=False), ["model.hf_assets_path", "tokenizer.json"]),
    "other model_type": (lambda d: _folder_with(d, {"model_type": "mistral"}), ["'model_type'", "mistral"]),
    "rope type": (
        lambda d: _folder_with(d, {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}),
        ["'rope_parameters'", "yarn"],
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_model_folder_gives_one_line(case, tmp_path):
    make_folder, words = BAD_FOLDERS[case]
    folder = make_folder(tmp_path)
    command = ["--model.hf_assets_path", folder, "--job.dump_folder", str(tmp_path / "out")]
    if case == "other model_type":  # one case through the user's launcher (torchrun)
        command = ["bash", "scripts/run_train.sh", "train_configs/finetune_example.toml", *command]
    else:
        command = [sys.executable, "-m", "titan_cp.train", "--job.config_file", "train_configs/finetune_example.toml", *command]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "NGPU": "1"})  # fmt: skip
    assert_one_error_line(result, words)
