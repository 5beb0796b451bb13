"""Convert model weights between Hugging Face safetensors and titan_cp's DCP checkpoints.

    python scripts/convert_checkpoint.py hf-to-dcp HF_DIR DCP_DIR
    python scripts/convert_checkpoint.py dcp-to-hf DCP_DIR HF_DIR --tokenizer PATH [--flavor 8B] [--dtype bfloat16]

A DCP folder here is the model part of a trainer checkpoint (`step-N/`): keys `model.<name>`
with titan_cp names. Model arguments come from `--flavor`, else from the `model_args` in the
folder's meta.json (the trainer writes it) or a model_args.json. `dcp-to-hf` writes the same
folder as the trainer's `checkpoint.last_save_in_hf`: `--tokenizer` is the run's tokenizer
source (its model.tokenizer_path, else its model.hf_assets_path), whose files are copied and
whose special tokens go into config.json and generation_config.json (a folder's own
generation_config.json is kept). Both directions run in one process without a process group.
Mistakes print one line and exit with code 2.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from titan_cp.checkpoint.hf import export_hf, load_hf_model
from titan_cp.checkpoint.hf_serving import serving_files
from titan_cp.data import Tokenizer
from titan_cp.errors import UserError
from titan_cp.models.llama3 import Transformer, TransformerModelArgs, llama3_flavors

PREFIX = "model."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextmanager
def _single_process():
    """DCP in this one process. torch warns on every no_dist save and load that it assumes a
    single process, even when told so; here that is the design, so the warning is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def hf_to_dcp(hf_dir: Path, dcp_dir: Path) -> None:
    if dcp_dir.exists() and any(dcp_dir.iterdir()):
        raise UserError(f"{dcp_dir}: exists and is not empty; choose a new output folder")
    model = load_hf_model(hf_dir)
    # All of state_dict(), tied duplicates included, so the trainer's own loading finds every key.
    state = {PREFIX + name: tensor for name, tensor in model.state_dict().items()}
    # Written aside and renamed when complete, so a failure never leaves a half checkpoint.
    tmp_dir = dcp_dir.with_name(f".{dcp_dir.name}.tmp-{os.getpid()}")
    try:
        with _single_process():
            dcp.save(state, checkpoint_id=str(tmp_dir), no_dist=True)
        meta = {"model_args": dataclasses.asdict(model.args), "converted_from": str(hf_dir)}
        (tmp_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if dcp_dir.exists():
            dcp_dir.rmdir()
        os.rename(tmp_dir, dcp_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _model_args(dcp_dir: Path, flavor: str | None) -> TransformerModelArgs:
    if flavor is not None:
        if flavor not in llama3_flavors:
            raise UserError(f"--flavor {flavor!r}: unknown; valid: {', '.join(llama3_flavors)}")
        return llama3_flavors[flavor]
    for candidate in (dcp_dir / "meta.json", dcp_dir / "model_args.json", dcp_dir.parent / "model_args.json"):
        if candidate.is_file():
            try:
                values = json.loads(candidate.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"{candidate}: unreadable JSON ({e})") from None
            if candidate.name == "meta.json":
                if "model_args" not in values:
                    continue
                values = values["model_args"]
            return TransformerModelArgs.from_dict(values, source=str(candidate))
    raise UserError(f"{dcp_dir}: no meta.json with model_args or model_args.json; pass --flavor")


def dcp_to_hf(dcp_dir: Path, hf_dir: Path, tokenizer_source: Path | None, flavor: str | None, dtype: torch.dtype) -> None:
    if not (dcp_dir / ".metadata").is_file():
        raise UserError(f"{dcp_dir}: not a DCP checkpoint folder (no .metadata)")
    if tokenizer_source is None:
        raise UserError(
            "dcp-to-hf needs --tokenizer: the run's model.tokenizer_path or model.hf_assets_path"
            " (a tokenizer.json or a Hugging Face folder)"
        )
    serving = serving_files(Tokenizer(tokenizer_source), tokenizer_source if tokenizer_source.is_dir() else None)
    args = _model_args(dcp_dir, flavor)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_buffers()
    # Parameters only, deduplicated: a tied output weight is filled through the embedding.
    state = {PREFIX + name: param.detach() for name, param in model.named_parameters()}
    saved = dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata
    for key, tensor in state.items():
        entry = saved.get(key)
        if not isinstance(entry, TensorStorageMetadata):
            raise UserError(f"{dcp_dir}: missing tensor {key!r}; was it saved for another model?")
        if list(entry.size) != list(tensor.shape):
            raise UserError(
                f"{dcp_dir}: tensor {key!r} has shape {list(entry.size)}, the model args expect {list(tensor.shape)}"
            )
    with _single_process():
        dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=True)
    export_hf(model, args, hf_dir, dtype=dtype, serving=serving)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_dcp = commands.add_parser("hf-to-dcp", help="Hugging Face folder -> DCP model checkpoint")
    to_dcp.add_argument("hf_dir", type=Path)
    to_dcp.add_argument("dcp_dir", type=Path)
    to_hf = commands.add_parser("dcp-to-hf", help="DCP model checkpoint -> Hugging Face folder")
    to_hf.add_argument("dcp_dir", type=Path)
    to_hf.add_argument("hf_dir", type=Path)
    to_hf.add_argument(
        "--tokenizer", type=Path, default=None,
        help="the run's tokenizer source: its model.tokenizer_path, else its model.hf_assets_path (required)",
    )  # fmt: skip
    to_hf.add_argument("--flavor", default=None, help=f"one of {', '.join(llama3_flavors)}; default: the saved args")
    to_hf.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="bfloat16", help="exported dtype, as checkpoint.export_dtype"
    )
    options = parser.parse_args(argv)
    try:
        if options.command == "hf-to-dcp":
            hf_to_dcp(options.hf_dir, options.dcp_dir)
        else:
            dcp_to_hf(options.dcp_dir, options.hf_dir, options.tokenizer, options.flavor, _DTYPES[options.dtype])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
