"""A rank that dies mid-run ends the whole job quickly, with a message, instead of a hang."""

import os
import signal
import time

from tests.train_utils import TINY, start_training, trainer_ranks


def test_killing_one_rank_ends_all_of_them(tmp_path):
    launcher = start_training(
        tmp_path, *TINY, "--training.steps", "100000", "--comm.train_timeout_seconds", "20", ngpu=2
    )
    try:
        ranks = trainer_ranks(tmp_path)
        assert set(ranks) >= {0, 1}, ranks
        killed_at = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=90)
        assert time.monotonic() - killed_at < 90
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert "Signal 9" in output or "SIGKILL" in output, output[-2000:]
    assert not trainer_ranks(tmp_path)
