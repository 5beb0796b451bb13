#!/usr/bin/env python
"""Training throughput of the same Llama 3 in Hugging Face transformers, on one device: the
peer for titan_cp's end-to-end figures, run on the same GPU in the same session.

    python scripts/bench_hf_peer.py --flavor 1B --seq-len 16384 --steps 10 --out hf.json

The peer is what an HF-based trainer (the HF Trainer, axolotl) runs on one GPU: LlamaForCausalLM
built from titan_cp's flavor (same shapes, vocabulary, RoPE scaling, tied embeddings; the
script refuses to run if the parameter counts differ), fp32 weights under bf16 autocast, SDPA
attention, fused AdamW, gradient clipping at 1.0, HF's gradient checkpointing with
--activation-checkpointing, and with --liger the loss through Liger kernel's fused linear
cross-entropy (`pip install liger-kernel`, triton: CUDA only), which never holds the
full-vocabulary logits; without it, HF's own loss over full logits. Long-context HF users run
both (the HF Trainer's `gradient_checkpointing` and `use_liger_kernel`). Tokens are synthetic
(uniform over the vocabulary); tokens/s = tokens per step / median step time after --warmup
steps. titan_cp on the same shapes (docs/performance.md):

    NGPU=1 ./scripts/run_train.sh train_configs/debug_model.toml --model.flavor 1B \
        --training.seq_len 16384 --training.local_batch_size 1 --training.steps 10
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig

from titan_cp.memory import count_params
from titan_cp.models.llama3.args import llama3_flavors


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flavor", default="1B", choices=sorted(llama3_flavors))
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--activation-checkpointing", action="store_true", help="HF gradient checkpointing")
    p.add_argument("--liger", action="store_true", help="Liger kernel's fused linear cross-entropy loss")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the result as JSON here")
    return p.parse_args(argv)


def build_peer(flavor: str, device: torch.device):
    """LlamaForCausalLM with titan_cp's `flavor` shapes, SDPA attention, fp32 weights on `device`."""
    model_args = llama3_flavors[flavor]
    fields = {k: v for k, v in model_args.to_hf_config().items() if k not in ("model_type", "torch_dtype")}
    config = LlamaConfig(**fields)
    with torch.device(device):
        # fp32 weights: torch's default dtype, which from_config keeps.
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    ours = count_params(model_args).total
    theirs = sum(p.numel() for p in model.parameters())
    if ours != theirs:
        raise SystemExit(f"HF model has {theirs} parameters, titan_cp's {flavor} {ours}: not the same model")
    return model, theirs


def liger_loss():
    """Liger's fused linear cross-entropy (mean over targets, -100 ignored), or a one-line exit."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise SystemExit("--liger needs liger-kernel (pip install liger-kernel; it runs on CUDA through triton)") from None
    return LigerFusedLinearCrossEntropyLoss()


def causal_lm_loss(model, tokens: torch.Tensor, fused_loss=None) -> torch.Tensor:
    """Next-token loss of `tokens` as HF computes it, or through `fused_loss(weight, hidden, targets)`,
    which takes the hidden states and the output projection instead of materialised logits."""
    if fused_loss is None:
        return model(input_ids=tokens, labels=tokens).loss
    hidden = model.model(input_ids=tokens).last_hidden_state[:, :-1]
    return fused_loss(model.lm_head.weight, hidden.reshape(-1, hidden.shape[-1]), tokens[:, 1:].reshape(-1))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, n_params = build_peer(args.flavor, device)
    if args.activation_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    fused_loss = liger_loss() if args.liger else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    vocab = model.config.vocab_size
    tokens = torch.randint(vocab, (args.batch, args.seq_len), device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = causal_lm_loss(model, tokens, fused_loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises, so the wall clock below times the whole step

    times, losses = [], []
    result = {"flavor": args.flavor, "params": n_params, "seq_len": args.seq_len, "batch": args.batch}
    try:
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            losses.append(step())
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        # Running out of memory is a result here (the peer does not fit), not a crash.
        result["status"] = "OOM"
        print(f"HF peer {args.flavor} S={args.seq_len} B={args.batch}: out of memory", flush=True)
    else:
        step_s = statistics.median(times)
        result.update(
            status="ok",
            peer="transformers LlamaForCausalLM (sdpa, bf16 autocast, fp32 weights"
            + (", gradient checkpointing" if args.activation_checkpointing else "")
            + (", Liger fused linear cross-entropy)" if args.liger else ")"),
            step_ms=step_s * 1e3,
            tokens_per_s=args.batch * args.seq_len / step_s,
            peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            losses=losses,
            device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            torch=torch.__version__,
            transformers=transformers.__version__,
        )
        memory = f", peak {result['peak_memory_gib']:.1f} GiB" if device.type == "cuda" else ""
        print(
            f"HF peer {args.flavor} ({n_params:,} params) S={args.seq_len} B={args.batch} on {result['device']}: "
            f"{result['tokens_per_s']:,.0f} tokens/s, {result['step_ms']:.1f} ms/step{memory}",
            flush=True,
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result

if __name__ == "__main__":
    main()
