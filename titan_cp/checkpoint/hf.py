"""Hugging Face safetensors in and out.

Loading reads, for every parameter, only the part this rank holds: an FSDP2 parameter is a
DTensor sharded on dim 0, so each rank slices its rows straight out of the memory-mapped
safetensors file and the full model never exists on one rank. Exporting gathers one tensor at a
time onto rank 0, writes one shard file at a time into a temporary folder, and renames that
folder into place only when everything is written.
"""

import json
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import safetensors
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from titan_cp.checkpoint.hf_serving import SERVING_FILE_NAMES, ServingFiles
from titan_cp.distributed_tensor import local_region
from titan_cp.errors import UserError, raise_on_every_rank
from titan_cp.models.llama3.args import TransformerModelArgs
from titan_cp.models.llama3.model import Transformer
from titan_cp.models.llama3.state_dict_adapter import (
    expected_hf_names,
    is_ignored_hf_name,
    to_hf,
    to_hf_name,
)

CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3
# Files a Hugging Face model folder may hold; export only replaces folders made of these.
_HF_FOLDER_FILES = {CONFIG_NAME, INDEX_NAME, *SERVING_FILE_NAMES}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed config.json of a Hugging Face model folder."""
    config_path = Path(path) / CONFIG_NAME
    if not Path(path).is_dir():
        raise UserError(f"{path}: not a folder; expected a Hugging Face model folder with {CONFIG_NAME}")
    try:
        return json.loads(config_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{config_path}: missing; a Hugging Face model folder needs {CONFIG_NAME}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{config_path}: unreadable JSON ({e})") from None


def load_hf_args(path: str | os.PathLike) -> TransformerModelArgs:
    """Model arguments from a Hugging Face folder's config.json."""
    return TransformerModelArgs.from_hf_config(read_hf_config(path), source=str(Path(path) / CONFIG_NAME))


def check_hf_config_matches(path: str | os.PathLike, args: TransformerModelArgs) -> None:
    """Raise naming the first config.json field whose value differs from `args`.

    Both sides go through `to_hf_config`, so transformers v4 and v5 spellings compare equal.
    `max_position_embeddings` is not compared: it changes no weight and no math.
    """
    source = Path(path) / CONFIG_NAME
    theirs = TransformerModelArgs.from_hf_config(read_hf_config(path), source=str(source)).to_hf_config()
    ours = args.to_hf_config()
    for key, value in ours.items():
        if key in ("max_position_embeddings", "torch_dtype"):
            continue
        if theirs[key] != value:
            raise UserError(
                f"{source}: field {key!r} is {theirs[key]!r} but the model being trained has {value!r}"
                " (from model.hf_assets_path, else model.flavor)"
            )


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Which file holds each tensor: from the index when sharded, else the single file's keys."""
    single, index = folder / SINGLE_FILE_NAME, folder / INDEX_NAME
    if single.is_file():
        return {name: single for name in _read_keys(single)}
    if not index.is_file():
        raise UserError(f"{folder}: no {SINGLE_FILE_NAME} or {INDEX_NAME}; expected Hugging Face safetensors weights")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{index}: unreadable index, expected JSON with a 'weight_map' ({e})") from None
    files = {name: folder / file_name for name, file_name in weight_map.items()}
    for file in sorted(set(files.values())):
        present = _read_keys(file)
        for name in sorted(n for n, f in files.items() if f == file and n not in present):
            raise UserError(f"{file}: missing tensor {name!r} that {INDEX_NAME} places there")
    return files


def _read_keys(file: Path) -> set[str]:
    with _open_safetensors(file) as handle:
        return set(handle.keys())


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except FileNotFoundError:
        raise UserError(f"{file}: missing safetensors file") from None
    except (safetensors.SafetensorError, OSError) as e:
        raise UserError(f"{file}: unreadable or truncated safetensors file ({e})") from None


def load_hf_weights(model: Transformer, path: str | os.PathLike) -> None:
    """Copy a Hugging Face Llama checkpoint into `model`, each rank reading only its own shard.

    `model`'s parameters may be plain tensors or FSDP2 DTensors; shapes are checked against the
    files before anything is copied. Nothing is ever written to `path`.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; expected a Hugging Face model folder")
    args = model.args
    model.init_buffers()
    files = _tensor_files(folder)
    expected = expected_hf_names(args)
    for name in expected:
        if name not in files:
            raise UserError(f"{folder}: missing tensor {name!r} for a {args.n_layers}-layer Llama")
    for name in sorted(files):
        if name not in expected and not is_ignored_hf_name(name, args):
            raise UserError(f"{files[name]}: unexpected tensor {name!r}, not part of a {args.n_layers}-layer Llama")

    params = dict(model.named_parameters())
    with ExitStack() as stack:
        handles = {file: stack.enter_context(_open_safetensors(file)) for file in sorted(set(files.values()))}
        slices = {}
        for titan_name, param in params.items():
            hf_name = to_hf_name(titan_name)
            tensor_slice = handles[files[hf_name]].get_slice(hf_name)
            found = list(tensor_slice.get_shape())
            if found != list(param.shape):
                raise UserError(
                    f"{files[hf_name]}: tensor {hf_name!r} has shape {found}, expected {list(param.shape)}"
                )
            slices[titan_name] = tensor_slice
        with torch.no_grad():
            for titan_name, param in params.items():
                offset, shape = local_region(param)
                local = param.to_local() if isinstance(param, DTensor) else param
                if 0 in shape:
                    continue
                index = tuple(slice(start, start + size) for start, size in zip(offset, shape))
                local.copy_(slices[titan_name][index])


def load_hf_model(path: str | os.PathLike) -> Transformer:
    """A CPU fp32 Transformer with the weights of a Hugging Face Llama folder."""
    args = load_hf_args(path)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    load_hf_weights(model, path)
    return model


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Group tensors, in order, into files of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes.items():
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def _replaceable(out_dir: Path) -> bool:
    """Only an empty folder or a previous Hugging Face export may be replaced."""
    return all(p.name in _HF_FOLDER_FILES or p.suffix == ".safetensors" for p in out_dir.iterdir())


def export_hf(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    args: TransformerModelArgs,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    serving: ServingFiles | None = None,
) -> None:
    """Write a Hugging Face LlamaForCausalLM folder (config.json + safetensors) to `out_dir`.

    Every rank must call it (FSDP DTensors are gathered collectively); only rank 0 writes.
    `dtype` casts the weights (None keeps theirs). `serving` adds the tokenizer files, the
    special-token ids and generation_config.json, so transformers can generate from the folder.
    An existing earlier export at `out_dir` is replaced only after the new one is complete.
    """
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    hf_state = to_hf(state, args)
    dtype = dtype or next(iter(hf_state.values())).dtype
    is_writer = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    out_dir = Path(out_dir).absolute()
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"

    error = None
    if is_writer:
        if out_dir.exists() and not (out_dir.is_dir() and _replaceable(out_dir)):
            error = f"{out_dir}: exists and is not a Hugging Face model folder; refusing to overwrite it"
        else:
            try:
                tmp_dir.mkdir(parents=True)
            except OSError as e:
                error = f"{tmp_dir}: cannot create the export folder ({e})"
    raise_on_every_rank(error)

    sizes = {name: t.numel() * dtype.itemsize for name, t in hf_state.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    file_names = (
        [SINGLE_FILE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for names, file_name in zip(shards, file_names):
        tensors = {}
        for name in names:
            tensor = hf_state[name]
            # A collective: every rank gathers, in the same order, one tensor at a time.
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            if is_writer:
                tensors[name] = full.detach().to(device="cpu", dtype=dtype).contiguous()
        if is_writer and error is None:
            try:
                save_file(tensors, str(tmp_dir / file_name), metadata={"format": "pt"})
            except OSError as e:
                error = f"{tmp_dir / file_name}: write failed ({e})"

    if is_writer and error is None:
        try:
            _finish_export(tmp_dir, out_dir, args, dtype, shards, file_names, sizes, serving)
        except OSError as e:
            error = f"{out_dir}: export failed ({e})"
    if is_writer and error is not None:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    raise_on_every_rank(error)


def _finish_export(
    tmp_dir: Path,
    out_dir: Path,
    args: TransformerModelArgs,
    dtype: torch.dtype,
    shards: list[list[str]],
    file_names: list[str],
    sizes: dict[str, int],
    serving: ServingFiles | None,
) -> None:
    """Write config.json (and the index and serving files), then swap the folder into place."""
    config = args.to_hf_config(torch_dtype=_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")))
    if serving is not None:
        config.update(serving.token_ids)
        serving.write(tmp_dir)
    (tmp_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if len(shards) > 1:
        weight_map = {name: file_name for names, file_name in zip(shards, file_names) for name in names}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if out_dir.exists():
        old_dir = tmp_dir.with_name(tmp_dir.name + "-old")
        os.rename(out_dir, old_dir)
        os.rename(tmp_dir, out_dir)
        shutil.rmtree(old_dir)
    else:
        os.rename(tmp_dir, out_dir)
