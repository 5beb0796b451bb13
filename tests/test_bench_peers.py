"""The peer benchmarks' CPU-side parts: torchtitan's config, log parsing, the driver, table and chart data.

torchtitan itself needs triton (GPU machines only), so its run is not exercised here; everything
around it is, and the driver runs real titan_cp rows on CPU end to end.
"""

import json
import re
import statistics
import sys

import pytest

from tests.chat_utils import record_texts
from tests.script_utils import SCRIPTS, load_script
from titan_cp.metrics import flops_per_token
from titan_cp.models.llama3.args import RopeScaling, TransformerModelArgs, llama3_flavors

peers = load_script("bench_peers")
tt = load_script("bench_torchtitan_peer")
plot_peers = load_script("plot_peers")
REPO = SCRIPTS.parent
TOKENIZER = REPO / "assets" / "tokenizer" / "tokenizer.json"
CORPUS = REPO / "assets" / "data" / "tinyshakespeare.txt"


def test_torchtitan_flavor_has_titan_cp_shapes():
    """The fields given to torchtitan rebuild titan_cp's 1B: same FFN width and non-embedding size."""
    ours = llama3_flavors["1B"]
    fields = tt.torchtitan_model_fields("1B")
    scaling = fields["rope_scaling"]
    rebuilt = TransformerModelArgs(
        **fields["model"],
        rope_scaling=RopeScaling(
            factor=scaling["scaling_factor"], low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        ),
    )  # fmt: skip
    assert rebuilt.ffn_hidden_dim == ours.ffn_hidden_dim == 8192
    assert rebuilt.num_params(exclude_embedding=True) == ours.num_params(exclude_embedding=True)
    assert rebuilt.rope_scaling == ours.rope_scaling and scaling["scaling_factor"] == 32.0


def test_assets_and_command_line(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "a"}\n')
    assets, dataset = tt.write_assets(tmp_path / "work", str(TOKENIZER), str(data))
    config = json.loads((assets / "tokenizer_config.json").read_text())
    assert config == {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    assert (assets / "tokenizer.json").read_bytes() == TOKENIZER.read_bytes()
    assert (dataset / "train.jsonl").read_text() == data.read_text()

    args = tt.parse_args(["--seq-len", "131072", "--ac", "full", "--data", str(data), "--float8"])
    argv = tt.torchtitan_argv(args, assets, dataset, tmp_path / "dump")
    options = dict(zip(argv[::2], argv[1::2]))
    assert options["--training.seq_len"] == "131072" and options["--training.dataset"] == "c4_test"
    assert options["--model.flavor"] == "1B" and options["--activation_checkpoint.mode"] == "full"
    assert "--compile.enable" in argv and argv[argv.index("--compile.enable") + 1].startswith("--")
    assert argv[-2:] == ["--model.converters", "float8"]
    eager = tt.torchtitan_argv(tt.parse_args(["--data", str(data), "--no-compile"]), assets, dataset, tmp_path)
    assert "--compile.enable" not in eager and "op" in eager
    assert "--parallelism.context_parallel_degree" not in eager
    split = tt.torchtitan_argv(tt.parse_args(["--data", str(data), "--cp", "2"]), assets, dataset, tmp_path)
    assert split[split.index("--parallelism.context_parallel_degree") + 1] == "2"


def _torchtitan_line(step: int, loss: float, reserved: float, tps: int) -> str:
    """A step line as torchtitan 0.2.2 prints it (colours included)."""
    return (
        f"[rank0]:[titan] 2026-11-29 12:00:00,000 - root - INFO - \x1b[31mstep: {step:2}  \x1b[32mloss: {loss:8.5f}  "
        f"\x1b[33mgrad_norm:  1.2345  \x1b[34mmemory: {reserved:5.2f}GiB(61.84%)  \x1b[34mtps: {tps:,}  "
        f"\x1b[36mtflops: 400.00  \x1b[35mmfu: 40.00%\x1b[39m"
    )


def test_torchtitan_log_parsing_and_median():
    lines = []
    for step, tps in enumerate([1000, 19000, 19500, 19700, 19600], start=1):
        lines.append(_torchtitan_line(step, 10.0 - step, 80.0 + step, tps))
        lines.append(f"[rank0]:{tt.PEAK_LINE} step {step}: {40 + step:.2f} GiB")
    result = tt.summarize(tt.parse_log("\n".join(lines)), first_timed_step=3, expected_steps=5)
    assert result["status"] == "ok" and result["tokens_per_s"] == 19600 and result["tokens_per_s_range"] == [19500, 19700]
    assert result["peak_memory_gib"] == 45.0 and result["peak_reserved_gib"] == 85.0
    assert result["losses"] == [9.0, 8.0, 7.0, 6.0, 5.0]

    oom = tt.parse_log(lines[0] + "\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert tt.summarize(oom, 3, 5)["status"] == "OOM"
    assert tt.summarize(tt.parse_log("\n".join(lines[:4])), 3, 5)["status"] == "failed"


def test_run_logged_times_out_and_keeps_the_output(tmp_path):
    log = tmp_path / "log"
    code = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    assert tt.run_logged(code, log, timeout=3) is None
    assert "started" in log.read_text()
    assert tt.run_logged([sys.executable, "-c", "raise SystemExit(3)"], log, timeout=30) == 3


def test_dataset_holds_the_corpus_documents(tmp_path):
    path = peers.write_dataset(CORPUS, tmp_path / "corpus.jsonl")
    assert record_texts(path) == record_texts(CORPUS)


def test_rows_and_dry_run(tmp_path, capsys):
    rows = peers.peer_rows([65536, 131072], steps=6)
    settings = {(r.trainer, r.seq_len): r for r in rows}
    assert len({r.label for r in rows}) == len(rows) and rows[0].label == "titan_cp_64K_default"
    assert settings[("titan_cp", 65536)].options == []
    assert settings[("torchtitan", 65536)].options == ["--ac", "selective_op"]
    assert settings[("torchtitan", 131072)].options == ["--ac", "full"]
    assert "--liger" in settings[("hf", 131072)].options
    peers.main(["--dry-run", "--out-dir", str(tmp_path)])
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == len(rows)
    assert commands[0].startswith("./scripts/run_train.sh train_configs/debug_model.toml --model.flavor 1B")
    assert "activation_checkpoint" not in commands[0] and "bench_torchtitan_peer.py" in commands[1]
    peers.main(["--suite", "float8", "--float8-batch", "4", "--dry-run", "--out-dir", str(tmp_path)])
    float8 = capsys.readouterr().out.strip().splitlines()
    assert len(float8) == 3 and all("--training.local_batch_size 4 " in c for c in float8)
    assert "--model.converters float8" in float8[1] and "converters" not in float8[0]
    assert float8[2].endswith("--model.converters float8 --float8.filter_fqns output") and "filter_fqns" not in float8[1]
    two = peers.peer_rows([65536], steps=6, cp=2, torchtitan_ac=["full", "selective_op"])
    assert [r.trainer for r in two] == ["titan_cp", "torchtitan", "torchtitan"]
    assert two[0].options == ["--parallelism.context_parallel_degree", "2"]
    assert [r.options for r in two[1:]] == [["--ac", "full", "--cp", "2"], ["--ac", "selective_op", "--cp", "2"]]
    modes = peers.peer_rows([65536], steps=6, titan_cp_ac=["none", "selective"])
    assert [r.options for r in modes if r.trainer == "titan_cp"] == [
        ["--activation_checkpoint.mode", "none"],
        ["--activation_checkpoint.mode", "selective"],
    ]


def test_mfu_uses_both_formulas():
    args = llama3_flavors["1B"]
    result = peers.add_mfu({"tokens_per_s": 10000.0}, "1B", 131072)
    flops = flops_per_token(args.num_params(exclude_embedding=True), args.n_layers, args.n_heads, args.head_dim, 131072)
    assert result["mfu_causal"] == pytest.approx(100 * 1e4 * flops.causal / 989e12)
    assert result["mfu_torchtitan"] > result["mfu_causal"]


def test_loss_parity():
    parity = peers.loss_parity([2.0] * 20, [2.0] * 18 + [2.02, 1.99])
    assert parity["steps"] == 20 and parity["max_rel_diff_last"] == pytest.approx(0.01)
    assert parity["rel_diff_final"] == pytest.approx(0.005)


def test_driver_runs_titan_cp_rows_on_cpu(tmp_path):
    """Real titan_cp runs through the driver: metrics read back, JSON and table written, chart data."""
    out = tmp_path / "peers"
    results = peers.main([
        "--flavor", "debugmodel", "--seq-lens", "64", "--steps", "4", "--only", "titan_cp",
        "--titan-cp-ac", "full_except_attention",
        "--out-dir", str(out),
    ])  # fmt: skip
    assert [(r["trainer"], r["seq_len"], r["status"]) for r in results] == [("titan_cp", 64, "ok")]
    metrics = [json.loads(line) for line in (out / "titan_cp_64_full_except_attention" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert results[0]["tokens_per_s"] == statistics.median(r["tps"] for r in metrics[2:])
    assert results[0]["losses"] == [r["loss"] for r in metrics]
    assert json.loads((out / "peers.json").read_text()) == results
    table = (out / "peers.md").read_text()
    assert re.search(r"^\| 64 \| titan_cp \| full_except_attention \| [\d,]+ \|", table, re.M)

    other = {**results[0], "setting": "none"}
    assert plot_peers.drawn_rows(results + [other], "full_except_attention") == results
    lines = plot_peers.series(results + [{"trainer": "hf", "seq_len": 128, "status": "OOM", "setting": "x"}])
    assert lines["titan_cp"]["seq_len"] == [64] and lines["hf"]["oom"] == [128]


def test_plot_without_matplotlib_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as info:
        plot_peers.plot([], tmp_path / "x.png", "t")
    assert "needs matplotlib" in str(info.value)
