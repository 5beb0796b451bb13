"""Fault injection for tests/test_early_checks.py, loaded by Python at start-up when this folder
is on PYTHONPATH: with TITAN_CP_TEST_FAIL_RANK=r, the trainer of rank r (alone) fails while it
builds its data loader, after the process group has started: on a user mistake, or with
TITAN_CP_TEST_FAIL_KIND=bug on an unexpected error."""

import os

if os.environ.get("RANK") is not None and os.environ.get("RANK") == os.environ.get("TITAN_CP_TEST_FAIL_RANK"):
    import titan_cp.data
    from titan_cp.errors import UserError

    def _fail(*args, **kwargs):
        if os.environ.get("TITAN_CP_TEST_FAIL_KIND") == "bug":
            raise RuntimeError(f"injected bug on rank {os.environ['RANK']} only")
        raise UserError(f"injected mistake on rank {os.environ['RANK']} only")

    titan_cp.data.build_dataloader = _fail
