"""Llama 3, read top to bottom: norm, rotary embedding, attention, feed-forward, block, model.

The model knows nothing about parallelism. Attention goes through the one entry point it is
handed (`attention(q, k, v, attention_context)`), and RoPE angles come from the position IDs it
is given, so a context-parallel shard of the sequence computes exactly what the full sequence
would.
"""

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from titan_cp.distributed_tensor import init_
from titan_cp.loss import chunked_cross_entropy_sum
from titan_cp.models.llama3.args import TransformerModelArgs

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def sdpa_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_context: Any) -> torch.Tensor:
    """Causal attention over the whole local sequence: the default without context parallelism.

    It ignores `attention_context` (so packed documents would attend across their boundaries);
    the context-parallel entry point is the one that honours document masks.
    q `[B, S, Hq, D]`, k/v `[B, S, Hkv, D]` -> `[B, S, Hq, D]`.
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 whatever the activation dtype (as Llama does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)

    def init_weights(self) -> None:
        init_(self.weight, nn.init.ones_)


class RotaryEmbedding(nn.Module):
    """Cos/sin tables for RoPE, computed from position IDs (never from the index in the shard).

    Layout: Hugging Face's "rotate_half" convention (dimension i pairs with i + D/2), so HF
    checkpoints load without permuting q/k rows (docs/model.md).
    """

    def __init__(self, args: TransformerModelArgs):
        super().__init__()
        self.args = args
        # Not persistent: derived from args, so checkpoints never carry it; filled by reset().
        self.register_buffer("inv_freq", torch.empty(args.head_dim // 2), persistent=False)

    def reset(self, device: torch.device | str | None = None) -> None:
        """Compute the inverse frequencies (Llama 3.1 scaling when configured) on `device`."""
        device = device if device is not None else self.inv_freq.device
        head_dim, scaling = self.args.head_dim, self.args.rope_scaling
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
        inv_freq = 1.0 / (self.args.rope_theta**exponents)
        if scaling is not None:
            # Wavelengths shorter than original/high_freq_factor are kept, longer than
            # original/low_freq_factor are slowed by `factor`, the band between is interpolated.
            wavelen = 2 * math.pi / inv_freq
            old_len = scaling.original_max_position_embeddings
            smooth = (old_len / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            smooth = smooth.clamp(0.0, 1.0)
            inv_freq = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        with torch.no_grad():
            self.inv_freq = inv_freq.to(torch.float32)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `[B, S]` -> cos, sin `[B, S, 1, D]` in fp32 (broadcast over heads)."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of `x` `[B, S, H, D]` by the position angles, in fp32."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return (x32 * cos + rotated_half * sin).type_as(x)


def init_biases(*linears: nn.Linear) -> None:
    """Zero the biases that exist (Hugging Face configs with attention_bias or mlp_bias have them)."""
    for linear in linears:
        if linear.bias is not None:
            init_(linear.bias, nn.init.zeros_)


class Attention(nn.Module):
    """Grouped-query attention: Hq query heads share Hkv key/value heads (never repeated here)."""

    def __init__(self, args: TransformerModelArgs, attention: AttentionFn):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        # head_dim may differ from dim / n_heads (an explicit `head_dim` in a Hugging Face config).
        bias = args.attention_bias
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=bias)
        self.attention = attention

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_context: Any
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attention(q, k, v, attention_context)
        return self.wo(out.reshape(batch, seq, self.n_heads * self.head_dim))

    def init_weights(self, init_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            init_(linear.weight, nn.init.trunc_normal_, mean=0.0, std=0.02)
        init_(self.wo.weight, nn.init.trunc_normal_, mean=0.0, std=init_std)
        init_biases(self.wq, self.wk, self.wv, self.wo)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, init_std: float) -> None:
        init_(self.w1.weight, nn.init.trunc_normal_, mean=0.0, std=0.02)
        for linear in (self.w2, self.w3):
            init_(linear.weight, nn.init.trunc_normal_, mean=0.0, std=init_std)
        init_biases(self.w1, self.w2, self.w3)


class TransformerBlock(nn.Module):
    """Pre-norm residual block; the unit FSDP and activation checkpointing wrap."""

    def __init__(self, layer_id: int, args: TransformerModelArgs, attention: AttentionFn):
        super().__init__()
        self.attention = Attention(args, attention)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, bias=args.mlp_bias)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Output projections shrink with depth so the residual stream's variance stays bounded.
        self.weight_init_std = 0.02 / (2 * (layer_id + 1)) ** 0.5

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_context: Any
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, attention_context)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(self.weight_init_std)
        self.feed_forward.init_weights(self.weight_init_std)


class Transformer(nn.Module):
    """Llama 3 decoder. Build on the meta device, then `to_empty(device=...)` and `init_weights()`."""

    def __init__(self, args: TransformerModelArgs, attention: AttentionFn = sdpa_causal_attention):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.rope = RotaryEmbedding(args)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(i, args, attention) for i in range(args.n_layers)}
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Set by titan_cp.parallel.parallelize.apply_compile: the loss then runs compiled too.
        self.compile_loss = False
        # On the meta device this costs nothing; elsewhere the model is usable at once.
        self.init_weights()

    def init_buffers(self, buffer_device: torch.device | str | None = None) -> None:
        """Restore what `to_empty` loses besides parameter values: the RoPE buffer and weight tying.

        Call it (or `init_weights`) after loading weights into a model built on the meta device.
        """
        self.rope.reset(buffer_device)
        if self.args.tie_word_embeddings and self.output.weight is not self.tok_embeddings.weight:
            # `to_empty` replaces each module's parameter separately, which unties them.
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Initialise every parameter in place, so it also works on FSDP2's sharded DTensors."""
        self.init_buffers(buffer_device)
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.init_weights()
        # Logits start near zero whatever the width, with a cutoff at 3 std (as torchtitan). A tied
        # table is initialised as the output projection, since unit-variance rows would blow up logits.
        std = self.args.dim**-0.5
        init_(self.output.weight, nn.init.trunc_normal_, mean=0.0, std=std, a=-3 * std, b=3 * std)
        if not self.args.tie_word_embeddings:
            init_(self.tok_embeddings.weight, nn.init.normal_)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_context: Any = None,
        labels: torch.Tensor | None = None,
        loss_chunk_size: int = 0,
    ) -> torch.Tensor:
        """tokens `[B, S]` -> logits `[B, S, vocab]`, or with labels the fp32 sum of token losses.

        `positions` `[B, S]` default to `arange(S)`; labels equal to -100 are ignored.
        """
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        cos, sin = self.rope(positions)
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin, attention_context)
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        return chunked_cross_entropy_sum(h, self.output, labels, loss_chunk_size, compiled=self.compile_loss)
