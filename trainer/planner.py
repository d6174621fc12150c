"""``tokenmill plan``: what a Llama-architecture run costs before it starts.

- parameters from the architecture (embedding, attention with grouped KV heads, SwiGLU MLP,
  RMSNorms, untied or tied output);
- training FLOPs C ≈ 6·N·D (8·N·D with activation recomputation: one more forward pass);
- wall-clock days on G GPUs of a given peak at a given MFU;
- memory per GPU for the model states (weights, gradients, Adam) in fp32, bf16 mixed precision
  and ZeRO stages 1-3 (activations excluded: they depend on batch, sequence and recomputation);
- the batch size (tokens) from the MiniCPM law BS = 1.2110e9 / L^6.2393 for an expected loss L;
- the compute-optimal number of tokens N*(C) = 0.299 · C^0.537 (Llama 3).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Architecture:
    vocab: int
    layers: int
    hidden: int
    ffn: int
    heads: int | None = None  # attention heads; needed only with kv_heads
    kv_heads: int | None = None  # grouped-query attention: fewer key/value heads
    tied: bool = False

    def parameters(self) -> int:
        h = self.hidden
        if self.kv_heads and self.heads:
            kv = 2 * h * (self.kv_heads * (h // self.heads))
        else:
            kv = 2 * h * h
        attention = 2 * h * h + kv  # q and o, plus k and v
        mlp = 3 * h * self.ffn  # gate, up, down (SwiGLU)
        per_layer = attention + mlp + 2 * h  # two RMSNorm weight vectors
        embedding = self.vocab * h
        head = 0 if self.tied else self.vocab * h
        return embedding + self.layers * per_layer + h + head


def training_flops(params: float, tokens: float, recompute: bool = False) -> float:
    """6·N·D; 8·N·D when activations are recomputed in the backward pass."""
    return (8.0 if recompute else 6.0) * params * tokens


def training_days(flops: float, gpus: int, peak_flops: float, mfu: float = 1.0) -> float:
    return flops / (gpus * peak_flops * mfu) / 86400.0


def memory_per_gpu(params: float, gpus: int) -> dict[str, float]:
    """Bytes of model states per GPU: weights + gradients + Adam (two moments, fp32 master copy)."""
    n = float(params)
    return {
        "fp32": 16 * n,  # 4 weights + 4 gradients + 8 Adam moments
        "bf16 mixed": 16 * n,  # 2 weights + 2 gradients + 12 fp32 master, m, v
        "ZeRO-1": 4 * n + 12 * n / gpus,
        "ZeRO-2": 2 * n + 14 * n / gpus,
        "ZeRO-3": 16 * n / gpus,
    }


def minicpm_batch_tokens(loss: float) -> float:
    """MiniCPM's optimal batch size in tokens for an expected loss: 1.2110e9 / L^6.2393."""
    return 1.2110e9 / loss**6.2393


def compute_optimal_tokens(flops: float) -> float:
    """Llama 3's compute-optimal training tokens for a budget of ``flops``: 0.299 · C^0.537."""
    return 0.299 * flops**0.537


def plan(arch: Architecture, tokens: float, gpus: int, peak_flops: float, mfu: float, recompute: bool,
         loss: float, seq_len: int) -> str:
    n = arch.parameters()
    flops = training_flops(n, tokens, recompute)
    days = training_days(flops, gpus, peak_flops, mfu)
    batch = minicpm_batch_tokens(loss)
    lines = [
        f"parameters        {n:,} ({n / 1e9:.2f}B)",
        f"training FLOPs    {flops:.3e}  ({'8' if recompute else '6'}·N·D, D = {tokens:.3e} tokens)",
        f"wall clock        {days:.1f} days on {gpus} GPUs at {peak_flops:.2e} FLOP/s peak, MFU {mfu:.0%}",
        f"compute-optimal   {compute_optimal_tokens(flops):.3e} tokens for that budget (Llama 3: 0.299·C^0.537)",
        f"batch size        {batch:,.0f} tokens for an expected loss of {loss} (MiniCPM: 1.2110e9 / L^6.2393)"
        f" = {batch / seq_len:,.0f} sequences of {seq_len}",
        "memory per GPU (model states only; activations come on top):",
    ]
    for name, b in memory_per_gpu(n, gpus).items():
        lines.append(f"  {name:<11} {b / GIB:10,.1f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--hidden", type=int, required=True)
    parser.add_argument("--ffn", type=int, required=True, help="SwiGLU intermediate size")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int, help="grouped-query attention (needs --heads)")
    parser.add_argument("--tied", action="store_true", help="output layer shares the embedding")
    parser.add_argument("--tokens", type=float, required=True, help="training tokens D, e.g. 1.4e12")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--peak", type=float, default=989e12, help="peak FLOP/s per GPU (H100 bf16 dense: 989e12)")
    parser.add_argument("--mfu", type=float, default=0.4)
    parser.add_argument("--recompute", action="store_true", help="activation recomputation: 8·N·D")
    parser.add_argument("--loss", type=float, default=2.5, help="expected loss, for the batch-size law")
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.kv_heads and not args.heads:
        parser.error("--kv-heads needs --heads")
    arch = Architecture(args.vocab, args.layers, args.hidden, args.ffn, args.heads, args.kv_heads, args.tied)
    print(plan(arch, args.tokens, args.gpus, args.peak, args.mfu, args.recompute, args.loss, args.seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
