"""Optional places for the metrics besides metrics.jsonl: TensorBoard and Weights & Biases.

Each is used only when its config key is on and its package is installed; a missing package is
named in one line (with the extra that installs it) and the run goes on without that backend.
"""

import importlib.util
import os
from typing import Any, Protocol

from titan_cp.config.schema import Metrics


class MetricsBackend(Protocol):
    def write(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardBackend:
    """Event files under `folder`, one scalar per metric (`tensorboard --logdir {folder}`)."""

    def __init__(self, folder: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=folder)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbBackend:
    """One W&B run per training run; project from WANDB_PROJECT (default titan_cp), files under `folder`."""

    def __init__(self, folder: str, config: dict[str, Any]):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "titan_cp"), dir=folder, config=config)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def build_backends(cfg: Metrics, tensorboard_folder: str, dump_folder: str, run_config: dict[str, Any]) -> list[MetricsBackend]:
    """The backends `cfg` asks for whose packages are installed (call on the writing rank only)."""
    backends: list[MetricsBackend] = []
    if cfg.enable_tensorboard and _installed("metrics.enable_tensorboard", "tensorboard", "tensorboard"):
        backends.append(TensorBoardBackend(tensorboard_folder))
    if cfg.enable_wandb and _installed("metrics.enable_wandb", "wandb", "wandb"):
        backends.append(WandbBackend(dump_folder, run_config))
    return backends


def _installed(key: str, package: str, extra: str) -> bool:
    if importlib.util.find_spec(package) is not None:
        return True
    print(
        f"{key} is on but the {package} package is not installed; training goes on without it"
        f" (install it with: pip install 'titan_cp[{extra}]')",
        flush=True,
    )
    return False
