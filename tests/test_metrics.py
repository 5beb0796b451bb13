"""Metrics: records per run, progress and summary lines, validation records, TensorBoard events."""

import json

import pytest
import torch

from titan_cp import metrics_backends
from titan_cp.config.schema import Metrics
from titan_cp.metrics import FlopsPerToken, MetricsLogger, format_duration
from titan_cp.metrics_backends import build_backends

FLOPS = FlopsPerToken(causal=6e6, torchtitan=7e6)


def _logger(folder, start_step=0, total_steps=10, cfg=None) -> MetricsLogger:
    return MetricsLogger(
        str(folder), FLOPS, torch.device("cpu"), is_writer=True, world_size=2,
        total_steps=total_steps, start_step=start_step, cfg=cfg,
    )  # fmt: skip


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_new_run_keeps_the_earlier_runs_metrics_aside(tmp_path, capsys):
    earlier = '{"step": 1, "loss": 9.0}\n'
    (tmp_path / "metrics.jsonl").write_text(earlier)
    (tmp_path / "tb").mkdir()
    logger = _logger(tmp_path)
    logger.step_done(1)
    logger.count(128)
    logger.log(1, 5.0, 1.0, 1e-3, 128)
    kept = sorted(p.name for p in tmp_path.glob("metrics.*.jsonl"))
    assert len(kept) == 1 and (tmp_path / kept[0]).read_text() == earlier
    assert len(list(tmp_path.glob("tb.*"))) == 1 and not (tmp_path / "tb").exists()
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [1]
    assert kept[0] in capsys.readouterr().out


def test_resumed_run_appends_and_says_from_which_step(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss": 9.0}\n')
    logger = _logger(tmp_path, start_step=3)
    assert "resuming at step 4" in capsys.readouterr().out
    logger.step_done(4)
    logger.count(128)
    logger.log(4, 5.0, 1.0, 1e-3, 512)
    assert [r["step"] for r in _records(tmp_path / "metrics.jsonl")] == [3, 4]
    assert list(tmp_path.glob("metrics.*.jsonl")) == []


def test_progress_line_summary_and_validation_record(tmp_path, capsys):
    logger = _logger(tmp_path, total_steps=10)
    for step in (1, 2):
        logger.step_done(step)
    logger.count(512)
    record = logger.log(2, 5.0, 1.0, 1e-3, 512)
    logger.log_validation(2, 4.5, 640)
    summary = logger.finish()
    out = capsys.readouterr().out
    step_line = next(line for line in out.splitlines() if line.startswith("step  2/10  loss"))
    assert "eta" in step_line and record["eta_seconds"] >= 0
    assert "validation loss   4.5000 over 640 tokens" in out
    assert summary.startswith("done: 2 steps (1-2)") and "512 tokens" in summary and "peak memory" in summary
    assert summary in out
    records = _records(tmp_path / "metrics.jsonl")
    assert records[1] == {"step": 2, "validation_loss": 4.5, "validation_tokens": 640}


def test_format_duration():
    assert [format_duration(s) for s in (None, 7.4, 185, 3723)] == ["?", "7s", "3m05s", "1h02m"]


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tmp_path / "tb").mkdir()  # an earlier run's: moved aside before this run's events are written
    logger = _logger(tmp_path, cfg=Metrics(enable_tensorboard=True))
    for step in (1, 2):
        logger.step_done(step)
        logger.count(128)
        logger.log(step, 6.0 - step, 1.5, 1e-3 * step, 128 * step)
    logger.log_validation(2, 4.25, 640)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 5.0), (2, 4.0)]
    assert [(e.step, e.value) for e in events.Scalars("validation_loss")] == [(2, 4.25)]
    assert [e.step for e in events.Scalars("lr")] == [1, 2]


@pytest.mark.parametrize("key, package", [("enable_tensorboard", "tensorboard"), ("enable_wandb", "wandb")])
def test_missing_optional_package_is_named_in_one_line(tmp_path, capsys, monkeypatch, key, package):
    real_find_spec = metrics_backends.importlib.util.find_spec
    monkeypatch.setattr(
        metrics_backends.importlib.util, "find_spec", lambda name: None if name == package else real_find_spec(name)
    )
    backends = build_backends(Metrics(**{key: True}), str(tmp_path / "tb"), str(tmp_path), {})
    assert backends == []
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and f"metrics.{key}" in lines[0] and f"titan_cp[{package}]" in lines[0]
