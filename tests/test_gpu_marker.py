"""`@pytest.mark.gpu(n)` skips, with the reason, on a machine with fewer than n GPUs (tests/conftest.py)."""

from pathlib import Path

import torch


def test_gpu_test_needing_more_gpus_than_present_is_skipped_with_the_reason(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    too_many = torch.cuda.device_count() + 1
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.gpu({too_many})
        def test_needs_gpus():
            raise AssertionError("must not run")

        def test_cpu():
            pass
        """
    )
    result = pytester.runpytest("-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"*needs {too_many} CUDA GPU(s); this machine has {too_many - 1}*"])
