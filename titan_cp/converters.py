"""Model converters (`model.converters`): rewrites of the model before it is parallelised.

The key and its one value follow torchtitan: `float8` swaps the transformer blocks' linear layers
for torchao's Float8 training linears (dynamic tensorwise scaling): their matmuls run in float8
on Hopper-class GPUs, with bf16 inputs and outputs and master weights unchanged. The output
projection stays in bf16 (its logits feed the loss, where precision matters most), as do
linears whose sizes are not multiples of 16, which float8 matmuls cannot take. Parameter names
do not change, so checkpoints and HF export are the same with and without the converter.
Float8 pays off with `compile.enable` (on by default on CUDA), which fuses the scaling and casts.
"""

import torch
from torch import nn

from titan_cp.errors import UserError

_KEY = "model.converters"


def float8_filter(module: nn.Module, fqn: str) -> bool:
    """Whether the linear `fqn` becomes Float8: block linears whose both sizes are multiples of 16."""
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _import_torchao_float8():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError(
            f"{_KEY} = float8 needs torchao, which is not installed; pip install 'titan_cp[float8]'"
            " or remove float8 from model.converters"
        ) from None
    return Float8LinearConfig, convert_to_float8_training


def convert_to_float8(model: nn.Module, device: torch.device) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise UserError(
            f"{_KEY} = float8 needs a CUDA GPU with float8 matmuls (compute capability 8.9 or newer,"
            f" e.g. H100/H200/L40S), but this run is on {where}; remove float8 from model.converters"
        )
    config_cls, convert = _import_torchao_float8()
    convert(model, config=config_cls(), module_filter_fn=float8_filter)


CONVERTERS = {"float8": convert_to_float8}


def apply_converters(model: nn.Module, names: list[str], device: torch.device) -> None:
    """Apply each converter named in `names` in order (the config loader checked the names)."""
    for name in names:
        CONVERTERS[name](model, device)
