"""Model converters (`model.converters`): rewrites of the model before it is parallelised.

The key and its one value follow torchtitan: `float8` swaps the model's linear layers for
torchao's Float8 training linears (dynamic tensorwise scaling): their matmuls run in float8 on
Hopper-class GPUs, with bf16 inputs and outputs and master weights unchanged. Layers named in
`float8.filter_fqns` (none by default) stay in bf16, as do linears whose sizes are not multiples
of 16, which float8 matmuls cannot take. torchtitan keeps the output projection in bf16 by
default; here it is converted too: on the 1B it is the largest matmul, and in Float8 it kept the
losses within 1% of bf16 (docs/performance.md, "Float8 against bf16"). Parameter names do not
change, so checkpoints and HF export are the same with and without the converter.
Float8 pays off with `compile.enable` (on by default on CUDA), which fuses the scaling and casts;
without it, keep the output projection in bf16 (`--float8.filter_fqns output`): run eagerly,
its casts made a step slower than bf16.
"""

import torch
from torch import nn

from titan_cp.config.schema import Float8
from titan_cp.errors import UserError
from titan_cp.extras import install_hint

_KEY = "model.converters"


def float8_filter(module: nn.Module, fqn: str, filter_fqns: list[str]) -> bool:
    """Whether the linear `fqn` becomes Float8: both its sizes are multiples of 16 and its name
    contains none of `filter_fqns`."""
    if not isinstance(module, nn.Linear) or any(name in fqn for name in filter_fqns):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _import_torchao_float8():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError(
            f"{_KEY} = float8 needs torchao, which is not installed; {install_hint('float8')}"
            " or remove float8 from model.converters"
        ) from None
    return Float8LinearConfig, convert_to_float8_training


def convert_to_float8(model: nn.Module, device: torch.device, float8: Float8) -> None:
    linears = [fqn for fqn, module in model.named_modules() if isinstance(module, nn.Linear)]
    unmatched = [name for name in float8.filter_fqns if not any(name in fqn for fqn in linears)]
    if unmatched:  # a misspelt name would otherwise leave its layer in Float8 silently
        raise UserError(
            f"float8.filter_fqns: {', '.join(unmatched)} names no linear layer of the model;"
            f" use parts of names such as {', '.join(linears[:3])} or output"
        )
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
        raise UserError(
            f"{_KEY} = float8 needs a CUDA GPU with float8 matmuls (compute capability 8.9 or newer,"
            f" e.g. H100/H200/L40S), but this run is on {where}; remove float8 from model.converters"
        )
    config_cls, convert = _import_torchao_float8()
    convert(
        model, config=config_cls(), module_filter_fn=lambda module, fqn: float8_filter(module, fqn, float8.filter_fqns)
    )


CONVERTERS = {"float8": convert_to_float8}


def apply_converters(model: nn.Module, names: list[str], device: torch.device, float8: Float8) -> None:
    """Apply each converter named in `names` in order (the config loader checked the names)."""
    for name in names:
        CONVERTERS[name](model, device, float8)
