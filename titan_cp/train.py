"""The trainer: one readable loop from config to metrics.jsonl.

Started by `scripts/run_train.sh` (torchrun) or `python -m titan_cp.train --job.config_file ...`.
Every part is handed only the config section it needs.
"""

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from titan_cp.checkpoint.hf import check_hf_config_matches, export_hf, load_hf_args, load_hf_weights
from titan_cp.checkpoint.hf_serving import serving_files
from titan_cp.checkpoint.manager import CheckpointManager
from titan_cp.checkpoint.signals import INTERRUPTED_EXIT_CODE, StopFlag
from titan_cp.config import JobConfig, load_config
from titan_cp.context_parallel import ContextParallel
from titan_cp.converters import apply_converters
from titan_cp.data import Tokenizer, build_dataloader
from titan_cp.errors import UserError, raise_on_every_rank
from titan_cp.loss import IGNORE_INDEX
from titan_cp.memory import (
    AC_MODES_FASTEST_FIRST,
    check_fits,
    choose_ac_mode,
    estimate_for_config,
    fit_problem,
    out_of_memory_message,
)
from titan_cp.metrics import MetricsLogger, flops_per_token, mean_causal_keys, print_rank0
from titan_cp.models.llama3 import Transformer, TransformerModelArgs, llama3_flavors
from titan_cp.optim import build_lr_scheduler, build_optimizer
from titan_cp.output_folder import output_folder_error
from titan_cp.profiling import StepProfiler
from titan_cp.parallel import (
    ParallelDims,
    init_distributed,
    parallelize_llama,
    pick_device,
    set_collective_timeout,
)
from titan_cp.validation import Validator


DEFAULT_TOKENIZER = "assets/tokenizer/tokenizer.json"


def set_determinism(seed: int, deterministic: bool, device: torch.device) -> None:
    torch.manual_seed(seed)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def build_model(model_args: TransformerModelArgs, attention) -> Transformer:
    """The model on the meta device: shapes only, no memory, ready to convert and parallelize."""
    with torch.device("meta"):
        return Transformer(model_args, attention=attention)


def materialise_and_init(model: Transformer, device: torch.device, cpu_offload: bool = False) -> None:
    """Allocate the (sharded) parameters on `device`, initialise them and switch to training mode.

    With CPU offload (training.enable_cpu_offload) FSDP2 keeps the sharded parameters in host
    memory, so they are allocated there; the buffers still go to `device`.
    """
    model.to_empty(device="cpu" if cpu_offload else device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()


def forward_backward(
    model: Transformer, micro_batches: list, device: torch.device, loss_chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's sharded micro-batches; returns (global loss sum, global count).

    Invariant 4: every rank divides by the number of valid targets over all ranks and all
    micro-batches of the step, counted on the local shards so each token counts once. Both
    results are summed over every rank (when a process group exists).
    """
    local_count = sum(int((labels != IGNORE_INDEX).sum()) for _, labels, _, _ in micro_batches)
    global_count = torch.tensor(local_count, dtype=torch.float64, device=device)
    distributed = dist.is_initialized()
    if distributed:
        dist.all_reduce(global_count)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for tokens, labels, positions, attention_context in micro_batches:
        tokens, labels, positions = (t.to(device, non_blocking=True) for t in (tokens, labels, positions))
        micro_loss = model(tokens, positions, attention_context, labels=labels, loss_chunk_size=loss_chunk_size)
        (micro_loss / global_count.float()).backward()
        loss_sum += micro_loss.detach()
    if distributed:
        dist.all_reduce(loss_sum)
    return loss_sum, global_count


def agree_on_ac_mode(mode: str, device: torch.device) -> str:
    """The mode with the most recomputation that any rank chose: ranks whose free host memory
    differs (CPU runs) may estimate differently, and all must checkpoint alike."""
    if not dist.is_initialized():
        return mode
    index = torch.tensor(AC_MODES_FASTEST_FIRST.index(mode), device=device)
    dist.all_reduce(index, op=dist.ReduceOp.MAX)
    return AC_MODES_FASTEST_FIRST[int(index)]


class Trainer:
    """Built in named steps (see `__init__`), then `train()` runs the loop."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        # First, so that a Ctrl-C during the (long) build stops the run at its first step.
        self.stop = StopFlag().install()
        self.init_distributed()
        raise_on_every_rank(output_folder_error(cfg.job.dump_folder))
        self.tokenizer = self.build_tokenizer()
        self.model_args = self.build_model_args()
        self.cp = self.build_context_parallel()
        self.check_memory()
        self.model = build_model(self.model_args, self.cp.attention)
        self.convert()
        self.parallelize()
        materialise_and_init(self.model, self.device, self.cfg.training.enable_cpu_offload)
        self.print_model_summary()
        self.optimizer, self.lr_scheduler = self.build_optimizer()
        self.dataloader = self.build_data()
        self.validator = self.build_validator()
        self.checkpoint = self.build_checkpoint()
        self.step = self.load_checkpoint_or_initial_weights()
        self.ntokens_seen = self.checkpoint.extra_state.get("ntokens_seen", 0)
        self.metrics = self.build_metrics()

    def init_distributed(self) -> None:
        """Device, process group, parallel degrees, meshes and seed."""
        cfg = self.cfg
        self.device = pick_device()
        self.rank, self.world_size = init_distributed(self.device, cfg.comm.init_timeout_seconds)
        self.dims = ParallelDims.from_config(
            cfg.parallelism, self.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        )
        self.meshes = self.dims.build_meshes(self.device.type)
        set_determinism(cfg.debug.seed, cfg.debug.deterministic, self.device)
        self.grad_accum_steps = self._grad_accum_steps(cfg.training)

    def build_tokenizer(self) -> Tokenizer:
        """model.tokenizer_path, else the model.hf_assets_path folder, else the shipped tokenizer."""
        model = self.cfg.model
        if model.tokenizer_path:
            return Tokenizer(model.tokenizer_path)
        if not model.hf_assets_path:
            return Tokenizer(DEFAULT_TOKENIZER)
        if not Path(model.hf_assets_path).is_dir():
            raise UserError(
                f"model.hf_assets_path {model.hf_assets_path}: not a folder; expected a Hugging Face model"
                " folder with config.json and tokenizer files"
            )
        if not (Path(model.hf_assets_path) / "tokenizer.json").is_file():
            raise UserError(
                f"model.hf_assets_path {model.hf_assets_path}: no tokenizer.json in the folder; set"
                " model.tokenizer_path to a tokenizer.json file or a Hugging Face tokenizer folder"
            )
        return Tokenizer(model.hf_assets_path)

    def build_model_args(self) -> TransformerModelArgs:
        """The shape from model.hf_assets_path's config.json, else from model.flavor."""
        model = self.cfg.model
        if model.hf_assets_path:
            args = load_hf_args(model.hf_assets_path)
        elif model.flavor not in llama3_flavors:
            raise UserError(f"model.flavor '{model.flavor}' is not known; valid: {', '.join(llama3_flavors)}")
        else:
            args = llama3_flavors[model.flavor]
        if self.tokenizer.vocab_size > args.vocab_size:
            raise UserError(
                f"tokenizer {self.tokenizer.path} has {self.tokenizer.vocab_size} tokens but model"
                f" {self._model_source()} only {args.vocab_size} embeddings; use a matching model.tokenizer_path"
            )
        return args

    def _model_source(self) -> str:
        hf_assets_path = self.cfg.model.hf_assets_path
        return f"(shape from {Path(hf_assets_path) / 'config.json'})" if hf_assets_path else self.cfg.model.flavor

    def build_context_parallel(self) -> ContextParallel:
        cfg = self.cfg
        cp = ContextParallel(
            self.meshes.cp, cfg.parallelism, cfg.model.attn_implementation, cfg.training.sample_packing, self.device
        )
        cp.validate(cfg.training.seq_len, self.model_args.n_kv_heads, self.model_args.n_heads)
        return cp

    def check_memory(self) -> None:
        """Resolve activation_checkpoint.mode auto, print the per-device memory estimate and
        refuse a run that cannot fit, before allocating."""
        cfg = self.cfg
        # On CPU every local rank shares the machine's RAM.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type == "cpu" else 1

        def estimate(ac_mode: str | None = None):
            on_gpu = self.device.type == "cuda"
            return estimate_for_config(
                self.model_args, cfg, fsdp_shard=self.dims.fsdp_shard, cp=self.dims.cp, on_gpu=on_gpu, ac_mode=ac_mode
            )

        if cfg.activation_checkpoint.mode == "auto":
            mode = choose_ac_mode(lambda mode: not fit_problem(estimate(mode), self.device, local_ranks))
            cfg.activation_checkpoint.mode = agree_on_ac_mode(mode, self.device)
            print_rank0(
                f"activation_checkpoint.mode auto: {cfg.activation_checkpoint.mode} (the least recomputation"
                " whose memory estimate fits)",
                self.rank,
            )
        chosen = estimate()
        print_rank0(f"memory estimate per device: {chosen.format()}", self.rank)
        if not cfg.debug.skip_memory_check:
            check_fits(chosen, self.device, ranks_sharing_device=local_ranks, first_lever=self.dims.wider_sharding_lever())

    def convert(self) -> None:
        """Model converters (model.converters, e.g. Float8 linears) swap modules here: on the meta
        model, before parallelization wraps them."""
        apply_converters(self.model, self.cfg.model.converters, self.device, self.cfg.float8)

    def parallelize(self) -> None:
        cfg = self.cfg
        parallelize_llama(
            self.model,
            self.dims,
            self.meshes.fsdp,
            self.device,
            cfg.training,
            cfg.parallelism,
            cfg.activation_checkpoint,
            cfg.compile,
        )

    def print_model_summary(self) -> None:
        n_params = self.model_args.num_params(exclude_embedding=False)
        print_rank0(
            f"model llama3 {self._model_source()}: {n_params / 1e6:.1f}M parameters; world {self.world_size} ="
            f" dp_replicate {self.dims.dp_replicate} x dp_shard {self.dims.dp_shard} x cp {self.dims.cp};"
            f" {self.dims.describe_fsdp()}; attention {self.cp.describe()}; device {self.device}",
            self.rank,
        )

    def build_optimizer(self):
        warmup, steps = self.cfg.lr_scheduler.warmup_steps, self.cfg.training.steps
        if warmup >= steps:
            print_rank0(
                f"warning: lr_scheduler.warmup_steps {warmup} is not shorter than training.steps {steps}:"
                " the learning rate never reaches optimizer.lr",
                self.rank,
            )
        optimizer = build_optimizer(self.model, self.cfg.optimizer)
        return optimizer, build_lr_scheduler(optimizer, self.cfg.lr_scheduler, steps)

    def build_data(self):
        dataloader = build_dataloader(
            self.cfg.training,
            self.tokenizer,
            dp_rank=self.dims.dp_rank(self.rank),
            dp_world_size=self.dims.dp,
            seed=self.cfg.debug.seed,
        )
        print_rank0(dataloader.summary(), self.rank)
        return dataloader

    def build_validator(self) -> Validator | None:
        if not self.cfg.validation.enable:
            return None
        dp_rank = self.dims.dp_rank(self.rank)
        return Validator(self.cfg.validation, self.cfg.training, self.tokenizer, dp_rank, self.dims.dp, self.cp, self.device)

    def build_checkpoint(self) -> CheckpointManager:
        return CheckpointManager(
            self.cfg.checkpoint,
            self.cfg.job.dump_folder,
            self.model,
            self.optimizer,
            self.lr_scheduler,
            self.dataloader,
            dp_rank=self.dims.dp_rank(self.rank),
            model_args=self.model_args,
        )

    def load_checkpoint_or_initial_weights(self) -> int:
        """Resume from the dump folder's checkpoint, or start from step 0 with the initial weights."""
        step = self.checkpoint.load()
        if step == 0 and self.cfg.checkpoint.initial_load_path:
            self._load_initial_weights(self.cfg.checkpoint)
        return step

    def build_metrics(self) -> MetricsLogger:
        training = self.cfg.training
        # With packing, attention FLOPs count only the pairs within documents (mean over the data).
        keys_per_token = _packed_keys_per_token(self.dataloader.samples) if training.sample_packing else None
        flops = flops_per_token(
            self.model_args.num_params(exclude_embedding=True),
            self.model_args.n_layers,
            self.model_args.n_heads,
            self.model_args.head_dim,
            training.seq_len,
            keys_per_token,
        )
        if keys_per_token is not None:
            print_rank0(
                f"flops: packed documents, {keys_per_token:.0f} keys per query on average"
                f" ({training.seq_len // 2} for causal windows of {training.seq_len})",
                self.rank,
            )
        return MetricsLogger(
            self.cfg.job.dump_folder,
            flops,
            self.device,
            is_writer=self.rank == 0,
            world_size=self.world_size,
            total_steps=self.cfg.training.steps,
            start_step=self.step,
            cfg=self.cfg.metrics,
            run_config=dataclasses.asdict(self.cfg),
        )

    def _load_initial_weights(self, checkpoint) -> None:
        if not checkpoint.initial_load_in_hf:
            raise UserError(
                f"checkpoint.initial_load_path {checkpoint.initial_load_path}: only Hugging Face folders can be"
                " loaded as initial weights; set checkpoint.initial_load_in_hf = true (resume titan_cp"
                " checkpoints through job.dump_folder and checkpoint.load_step)"
            )
        check_hf_config_matches(checkpoint.initial_load_path, self.model_args)
        load_hf_weights(self.model, checkpoint.initial_load_path)
        print_rank0(f"loaded Hugging Face weights from {checkpoint.initial_load_path}", self.rank)

    def _grad_accum_steps(self, training) -> int:
        global_batch = training.global_batch_size
        per_step = training.local_batch_size * self.dims.dp
        if global_batch == -1:
            return 1
        if global_batch % per_step != 0:
            raise UserError(
                f"training.global_batch_size {global_batch} must be divisible by training.local_batch_size"
                f" {training.local_batch_size} x data-parallel degree {self.dims.dp} = {per_step}"
            )
        return global_batch // per_step

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
        """One optimizer step over `grad_accum_steps` micro-batches.

        Returns (loss, grad_norm, lr, tokens): `lr` is the learning rate this step's update used
        (the scheduler moves on after it); the others are device tensors, read only on logging
        steps: reading them here would make the host wait for the GPU every step, leaving the
        GPU idle while the next step's first kernels are launched.
        """
        micro_batches = [self.cp.shard(*next(self.dataloader_iter).as_tuple()) for _ in range(self.grad_accum_steps)]
        loss_sum, global_count = forward_backward(
            self.model, micro_batches, self.device, self.cfg.training.loss_chunk_size
        )
        grad_norm = self._clip_gradients()
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / global_count, grad_norm, lr, global_count

    def _clip_gradients(self) -> torch.Tensor:
        max_norm = self.cfg.training.max_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm

    def train(self) -> signal.Signals | None:
        """Train up to training.steps; returns the signal that stopped the run early, or None."""
        training = self.cfg.training
        self.dataloader_iter = iter(self.dataloader)
        print_rank0(
            f"training from step {self.step} to {training.steps}: {self.grad_accum_steps} micro-batch(es) of"
            f" {training.local_batch_size} x {training.seq_len} tokens per data-parallel rank per step",
            self.rank,
        )
        first_step = self.step + 1
        ckpt = self.cfg.checkpoint
        tokens_since_sync = torch.zeros((), dtype=torch.float64, device=self.device)
        with StepProfiler(self.cfg.profiling, self.cfg.job.dump_folder, self.rank, self.device) as profiler:
            profiler.step(self.step)  # a trace may begin with the first step
            while self.step < training.steps:
                self.step += 1
                last_step = self.step == training.steps
                loss, grad_norm, lr, step_tokens = self.train_step()
                tokens_since_sync += step_tokens
                self.metrics.step_done(self.step)
                traced = profiler.step(self.step)
                if traced:
                    self.metrics.leave_out(profiler.last_save_seconds)
                    print_rank0(f"profiling: step {self.step} traced to {traced}", self.rank)
                if self.step == first_step:
                    # The first step includes compilation and lazy initialisation; later steps
                    # get the shorter timeout so a dead rank ends the job quickly.
                    set_collective_timeout(self.cfg.comm.train_timeout_seconds)
                # The host reads device values only where it needs them: to log, and to save the token
                # count with a checkpoint. One process checks for a signal without a collective.
                logging = self.step % self.cfg.metrics.log_freq == 0 or last_step
                stop = self.stop.received if self.world_size == 1 else self.stop.should_stop(self.device)
                if logging or stop or (ckpt.enable and (self.step % ckpt.interval == 0 or last_step)):
                    tokens = int(tokens_since_sync.item())
                    tokens_since_sync.zero_()
                    self.ntokens_seen += tokens
                    self.checkpoint.extra_state["ntokens_seen"] = self.ntokens_seen
                    self.metrics.count(tokens)
                if logging:
                    self.metrics.log(self.step, loss.item(), grad_norm.item(), lr, self.ntokens_seen)
                if self.validator is not None and self.validator.should_run(self.step):
                    started = time.perf_counter()
                    validation_loss, validation_tokens = self.validator.run(self.model)
                    self.metrics.log_validation(
                        self.step,
                        validation_loss,
                        validation_tokens,
                        seconds_outside_training=time.perf_counter() - started,
                    )
                if stop:
                    self.save_and_stop(stop)
                    return stop
                self.checkpoint.maybe_save(self.step, last_step=last_step)
        if self.cfg.checkpoint.last_save_in_hf:
            out_dir = os.path.join(self.cfg.job.dump_folder, "hf")
            serving = serving_files(self.tokenizer, self.cfg.model.hf_assets_path or None)
            dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[self.cfg.checkpoint.export_dtype]
            export_hf(self.model, self.model_args, out_dir, dtype=dtype, serving=serving)
            print_rank0(f"exported Hugging Face weights to {out_dir}", self.rank)
        self.metrics.finish()
        self.metrics.close()
        return None

    def save_and_stop(self, stop: signal.Signals) -> None:
        """One line, then a checkpoint of this step when checkpointing is on."""
        if stop == signal.SIGINT:
            what = "Ctrl-C (SIGINT) received"
            again = "; Ctrl-C again stops at once without saving"
        else:
            what, again = "SIGTERM received", ""
        if self.cfg.checkpoint.enable:
            print_rank0(f"{what}: saving a checkpoint at step {self.step} and stopping{again}", self.rank)
            self.checkpoint.save(self.step)
        else:
            print_rank0(f"{what}: stopping at step {self.step} (checkpoint.enable is false: nothing saved)", self.rank)
        self.metrics.close()


# How long a rank that reported an error waits for scripts/run_train.sh to end the job.
_LAUNCHER_GRACE_SECONDS = 60


def _packed_keys_per_token(samples, most: int = 256) -> float:
    """Mean keys per query over up to `most` packed windows spread over the dataset (the MFU's
    attention term; reading every window of a large dataset would delay the start)."""
    stride = max(1, len(samples) // most)
    return mean_causal_keys(torch.stack([samples[i][2] for i in range(0, len(samples), stride)]))


# @record: a rank that fails on an unexpected error leaves its traceback to torchrun, whose failure
# report then shows it even when scripts/run_train.sh's LOG_RANK hides that rank's output.
@record
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    # Set by scripts/run_train.sh. Under it the launcher prints a user mistake and owns the exit
    # code (2 for a mistake, 130 for Ctrl-C): the ranks exit 0, because torchrun prints a
    # failure report with tracebacks for any rank that exits non-zero.
    error_file = os.environ.get("TITAN_CP_ERROR_FILE")
    stopped_by = None
    try:
        cfg = load_config(argv)
        stopped_by = Trainer(cfg).train()
    except UserError as error:
        if not error_file:
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"error: {error}", file=sys.stderr, flush=True)
            os._exit(2)
        # Every failing rank appends its line (one short write each); the launcher prints the
        # first and ends every rank at once, also those waiting for this one in a collective.
        # This rank waits for that instead of exiting: its closed connections would make the
        # others fail first, with tracebacks.
        with open(error_file, "a") as f:
            f.write(f"error: {error}\n")
        time.sleep(_LAUNCHER_GRACE_SECONDS)
        os._exit(0)
    except torch.OutOfMemoryError:
        # Any rank may run out alone. It reports like a user mistake: one line, and under the
        # launcher, which then ends every rank at once, no traceback from the ranks waiting for it.
        message = f"error: {out_of_memory_message()}\n"
        if not error_file:
            sys.stderr.write(message)
            sys.stderr.flush()
            os._exit(3)
        with open(error_file, "a") as f:
            f.write(message)
        time.sleep(_LAUNCHER_GRACE_SECONDS)
        os._exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if stopped_by == signal.SIGINT and not error_file:
        sys.exit(INTERRUPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
