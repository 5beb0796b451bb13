"""profiling.*: the traced steps, their Chrome traces and op tables, from a real launcher run."""

import json

from tests.train_utils import TINY, read_metrics, run_train


def test_every_profile_freq_th_step_is_traced_with_its_ops(tmp_path):
    result = run_train(
        tmp_path, *TINY, "--training.steps", "5", "--profiling.enable_profiling", "true",
        "--profiling.profile_freq", "2", "--profiling.save_traces_folder", "traces",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    traces = tmp_path / "traces"
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_2", "iteration_4"]
    for step in (2, 4):
        assert f"profiling: step {step} traced to {traces / f'iteration_{step}'}" in result.stdout
        events = json.loads((traces / f"iteration_{step}" / "rank0_trace.json").read_text())["traceEvents"]
        names = {event.get("name") for event in events}
        # One recorded step: one optimizer step, and the model's linear layers ran.
        assert sum(1 for event in events if event.get("name", "").startswith("ProfilerStep#")) == 1
        assert names & {"aten::mm", "aten::addmm"}, sorted(n for n in names if n)[:50]
        assert "Optimizer.step#AdamW.step" in names
        table = (traces / f"iteration_{step}" / "rank0_ops.txt").read_text()
        assert table.startswith(f"step {step}, rank 0, sorted by self_cpu_time_total")
        assert "aten::mm" in table or "aten::addmm" in table
    # Every step still has its metrics record.
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]

