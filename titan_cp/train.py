"""The trainer: one readable loop from config to metrics.jsonl.

Started by `scripts/run_train.sh` (torchrun) or `python -m titan_cp.train --job.config_file ...`.
Every part is handed only the config section it needs.
"""

import os
import sys

import torch
import torch.distributed as dist

from titan_cp.checkpoint.hf import check_hf_config_matches, export_hf, load_hf_weights
from titan_cp.checkpoint.manager import CheckpointManager
from titan_cp.checkpoint.signals import PreemptionFlag
from titan_cp.config import JobConfig, load_config
from titan_cp.context_parallel import ContextParallel
from titan_cp.data import Tokenizer, build_dataloader
from titan_cp.errors import UserError
from titan_cp.memory import check_fits, estimate_for_config, out_of_memory_message
from titan_cp.metrics import MetricsLogger, flops_per_token, print_rank0
from titan_cp.models.llama3 import Transformer, llama3_flavors
from titan_cp.optim import build_lr_scheduler, build_optimizer
from titan_cp.parallel import (
    ParallelDims,
    init_distributed,
    parallelize_llama,
    pick_device,
    set_collective_timeout,
)


def set_determinism(seed: int, deterministic: bool, device: torch.device) -> None:
    torch.manual_seed(seed)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.device = pick_device()
        self.rank, self.world_size = init_distributed(self.device, cfg.comm.init_timeout_seconds)
        self.dims = ParallelDims.from_config(cfg.parallelism, self.world_size)
        meshes = self.dims.build_meshes(self.device.type)
        set_determinism(cfg.debug.seed, cfg.debug.deterministic, self.device)

        training = cfg.training
        self.grad_accum_steps = self._grad_accum_steps(training)
        self.tokenizer = Tokenizer(cfg.model.tokenizer_path)
        self.model_args = self._model_args(cfg.model.flavor)

        self.cp = ContextParallel(
            meshes.cp, cfg.parallelism, cfg.model.attn_implementation, training.sample_packing, self.device
        )
        self.cp.validate(training.seq_len, self.model_args.n_kv_heads)

        estimate = estimate_for_config(
            self.model_args,
            cfg,
            dp_shard_cp=self.dims.dp_shard * self.dims.cp,
            cp=self.dims.cp,
            on_gpu=self.device.type == "cuda",
        )
        print_rank0(f"memory estimate per device: {estimate.format()}", self.rank)
        # On CPU every local rank shares the machine's RAM.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if self.device.type == "cpu" else 1
        if not cfg.debug.skip_memory_check:
            check_fits(estimate, self.device, ranks_sharing_device=local_ranks)

        with torch.device("meta"):
            self.model = Transformer(self.model_args, attention=self.cp.attention)
        parallelize_llama(
            self.model,
            self.dims,
            meshes.fsdp,
            self.device,
            training,
            cfg.parallelism,
            cfg.activation_checkpoint,
            cfg.compile,
        )
        # With CPU offload FSDP2 wants the sharded parameters in host memory; buffers stay on the device.
        self.model.to_empty(device="cpu" if training.enable_cpu_offload else self.device)
        with torch.no_grad():
            self.model.init_weights(buffer_device=self.device)
        self.model.train()
        n_params = self.model_args.num_params(exclude_embedding=False)
        print_rank0(
            f"model llama3 {cfg.model.flavor}: {n_params / 1e6:.1f}M parameters; world {self.world_size} ="
            f" dp_replicate {self.dims.dp_replicate} x dp_shard {self.dims.dp_shard} x cp {self.dims.cp};"
            f" attention {self.cp.algorithm} ({self.cp.layout}, {self.cp.attn_implementation}); device {self.device}",
            self.rank,
        )

        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, training.steps)
        self.dataloader = build_dataloader(
            training,
            self.tokenizer,
            dp_rank=self.dims.dp_rank(self.rank),
            dp_world_size=self.dims.dp,
            seed=cfg.debug.seed,
        )
        self.checkpoint = CheckpointManager(
            cfg.checkpoint,
            cfg.job.dump_folder,
            self.model,
            self.optimizer,
            self.lr_scheduler,
            self.dataloader,
            dp_rank=self.dims.dp_rank(self.rank),
            model_args=self.model_args,
        )
        self.step = self.checkpoint.load()
        if self.step == 0 and cfg.checkpoint.initial_load_path:
            self._load_initial_weights(cfg.checkpoint)
        self.ntokens_seen = self.checkpoint.extra_state.get("ntokens_seen", 0)
        self.flops = flops_per_token(
            self.model_args.num_params(exclude_embedding=True),
            self.model_args.n_layers,
            self.model_args.n_heads,
            self.model_args.head_dim,
            training.seq_len,
        )
        self.metrics = MetricsLogger(cfg.job.dump_folder, self.flops, self.device, is_writer=self.rank == 0)
        self.preemption = PreemptionFlag()

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

    def _model_args(self, flavor: str):
        if flavor not in llama3_flavors:
            raise UserError(f"model.flavor '{flavor}' is not known; valid: {', '.join(llama3_flavors)}")
        args = llama3_flavors[flavor]
        if self.tokenizer.vocab_size > args.vocab_size:
            raise UserError(
                f"tokenizer {self.cfg.model.tokenizer_path} has {self.tokenizer.vocab_size} tokens but model"
                f" flavor {flavor} only {args.vocab_size} embeddings; use a matching model.tokenizer_path"
            )
        return args

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over `grad_accum_steps` micro-batches; returns (loss, grad_norm, tokens)."""
        micro_batches = [self.cp.shard(*next(self.dataloader_iter).as_tuple()) for _ in range(self.grad_accum_steps)]
        # Invariant 4: every rank divides by the number of valid targets over all ranks and all
        # micro-batches of the step, counted on the local shards so each token counts once.
        local_count = sum(int((labels != -100).sum()) for _, labels, _, _ in micro_batches)
        global_count = torch.tensor(local_count, dtype=torch.float64, device=self.device)
        dist.all_reduce(global_count)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for tokens, labels, positions, attention_context in micro_batches:
            tokens, labels, positions = (t.to(self.device, non_blocking=True) for t in (tokens, labels, positions))
            micro_loss = self.model(
                tokens,
                positions,
                attention_context,
                labels=labels,
                loss_chunk_size=self.cfg.training.loss_chunk_size,
            )
            (micro_loss / global_count.float()).backward()
            loss_sum += micro_loss.detach()
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)
        return (loss_sum / global_count).item(), grad_norm, int(global_count.item())

    def _clip_gradients(self) -> float:
        max_norm = self.cfg.training.max_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return norm.item()

    def train(self) -> None:
        training = self.cfg.training
        self.dataloader_iter = iter(self.dataloader)
        self.preemption.install()
        print_rank0(
            f"training from step {self.step} to {training.steps}: {self.grad_accum_steps} micro-batch(es) of"
            f" {training.local_batch_size} x {training.seq_len} tokens per data-parallel rank per step",
            self.rank,
        )
        first_step = self.step + 1
        while self.step < training.steps:
            self.step += 1
            loss, grad_norm, step_tokens = self.train_step()
            if self.step == first_step:
                # The first step includes compilation and lazy initialisation; later steps
                # get the shorter timeout so a dead rank ends the job quickly.
                set_collective_timeout(self.cfg.comm.train_timeout_seconds)
            self.ntokens_seen += step_tokens
            self.checkpoint.extra_state["ntokens_seen"] = self.ntokens_seen
            self.metrics.count(step_tokens // self.world_size)
            if self.step % self.cfg.metrics.log_freq == 0 or self.step == training.steps:
                self.metrics.log(self.step, loss, grad_norm, self.lr_scheduler.get_last_lr()[0], self.ntokens_seen)
            if self.preemption.should_stop(self.device):
                print_rank0(f"SIGTERM received: saving a checkpoint at step {self.step} and stopping", self.rank)
                self.checkpoint.save(self.step)
                return
            self.checkpoint.maybe_save(self.step, last_step=self.step == training.steps)
        if self.cfg.checkpoint.last_save_in_hf:
            out_dir = os.path.join(self.cfg.job.dump_folder, "hf")
            export_hf(self.model, self.model_args, out_dir)
            print_rank0(f"exported Hugging Face weights to {out_dir}", self.rank)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    error_file = os.environ.get("TITAN_CP_ERROR_FILE")
    try:
        cfg = load_config(argv)
        Trainer(cfg).train()
    except UserError as error:
        if int(os.environ.get("RANK", "0")) == 0:
            if error_file:
                with open(error_file, "w") as f:
                    f.write(f"error: {error}\n")
            else:
                print(f"error: {error}", file=sys.stderr, flush=True)
        # Under scripts/run_train.sh the launcher prints the line and owns the exit code:
        # exiting 0 here keeps torchrun from printing its own traceback for a user mistake.
        os._exit(0 if error_file else 2)
    except torch.OutOfMemoryError:
        # Any rank may run out alone: it reports one line and exits non-zero, so torchrun stops
        # the others (the launcher then hides torchrun's own report).
        message = f"error: {out_of_memory_message()}\n"
        if error_file:
            with open(error_file, "w") as f:
                f.write(message)
        else:
            sys.stderr.write(message)
            sys.stderr.flush()
        os._exit(3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
