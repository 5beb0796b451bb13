"""pyproject.toml's torch floor is the first release that has every torch API titan_cp relies on.

FIRST_RELEASE records, for each torch API whose presence sets the floor, the torch release that
first shipped it. The test reads the floor from pyproject.toml, checks that it equals the newest
of those releases (not lower: the install would break; not higher: users would be refused for
nothing), that the installed torch has each API, and that every FSDP2 module setting titan_cp
calls is in the table, so a new one cannot slip in without its release being looked up.
"""

import re
import tomllib
from pathlib import Path

import pytest
import torch.distributed.fsdp as fsdp

REPO = Path(__file__).resolve().parent.parent

# FSDPModule.set_gradient_divide_factor (the rename of set_reduce_scatter_divide_factor) and
# set_force_sum_reduction_for_comms arrived together in pytorch pull request 155915 (June 2025),
# before the 2.8 branch cut; torch 2.7 has neither. The explicit prefetch settings are older than
# FSDP2's public home: torch.distributed.fsdp.FSDPModule exists since 2.6.
FIRST_RELEASE = {
    "FSDPModule.set_modules_to_forward_prefetch": (2, 6),
    "FSDPModule.set_modules_to_backward_prefetch": (2, 6),
    "FSDPModule.set_gradient_divide_factor": (2, 8),
    "FSDPModule.set_force_sum_reduction_for_comms": (2, 8),
}


def _torch_floor() -> tuple[int, ...]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (spec,) = [d for d in project["dependencies"] if re.match(r"torch\b", d)]
    match = re.fullmatch(r"torch>=(\d+)\.(\d+)", spec.replace(" ", ""))
    assert match, f"expected a plain 'torch>=X.Y' floor, found {spec!r}"
    return tuple(int(part) for part in match.groups())


def test_floor_is_the_first_release_with_every_api():
    assert _torch_floor() == max(FIRST_RELEASE.values())


@pytest.mark.parametrize("api", FIRST_RELEASE)
def test_installed_torch_has_the_api(api):
    owner, name = api.split(".")
    assert callable(getattr(getattr(fsdp, owner), name, None)), f"torch.distributed.fsdp.{api} is missing"


def test_every_fsdp_module_setting_titan_cp_calls_is_listed():
    called = set()
    for source in (REPO / "titan_cp").rglob("*.py"):
        called |= set(re.findall(r"\.(set_\w+)\(", source.read_text()))
    fsdp_settings = {name for name in called if hasattr(fsdp.FSDPModule, name)}
    assert fsdp_settings, "no FSDPModule setting found: the scan is broken"
    listed = {api.split(".")[1] for api in FIRST_RELEASE}
    assert fsdp_settings <= listed, f"look up the first torch release of {sorted(fsdp_settings - listed)}"
