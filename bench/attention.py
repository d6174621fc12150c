"""Benchmark: attention with a document mask, three ways, on the same model and the same packed rows.

- ``dense``: the mask as one float tensor [rows, 1, seq, seq] (``trainer.model.dense_document_mask``,
  the trainer's path before ``segment_attention``): O(seq²) memory per row, SDPA's math path;
- ``segments``: ``trainer.model.segment_attention``, each document attends to itself with SDPA's
  causal kernel, no mask (what ``doc_mask: true`` trains with);
- ``causal``: plain causal attention over the whole row, no document mask (the floor: what the
  documents would cost without their boundaries).

Each (mode, sequence length) runs in a fresh process: one warm-up step, then ``--steps`` timed
forward + backward + AdamW steps. Peak memory is the process's peak resident memory during those steps
above its size before them, once a small step of the same mode has loaded the libraries it touches and
made the optimizer's state (``MemoryPeak``: the kernel's high-water mark, reset). Then the same for attention alone (one call over every row's queries,
keys and values, forward and backward), where the mask's O(seq²) memory is not hidden behind the
model's activations and logits. Rounds alternate the modes so that drift hits all of them; medians
and the spread are printed. The rows hold ``--tokens`` tokens per step at every length, in documents
of log-normally distributed lengths (median ``--doc-median`` tokens).

    python bench/attention.py [--seq 2048 8192] [--steps 3] [--rounds 3] [--hidden 256] [--layers 4]
                              [--checkpointing] [--compile] [--loss-chunk 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose trainer.py would shadow the package
MODES = ("dense", "segments", "causal")


def rows_of_documents(seq: int, tokens: int, doc_median: int, seed: int = 0):
    """Packed rows: ids and ``row_layout`` spans of documents with log-normal lengths."""
    import numpy as np

    rng = np.random.default_rng(seed)
    spans, n_rows = [], max(1, tokens // seq)
    for _ in range(n_rows):
        row, at, k = [], 0, 0
        while at < seq + 1:
            n = int(min(max(1, rng.lognormal(np.log(doc_median), 1.0)), seq + 1 - at))
            row.append({"doc_id": f"d{k}", "pos": at, "doc_start": 0, "length": n, "doc_tokens": n, "category": "en"})
            at, k = at + n, k + 1
        spans.append(row)
    return rng.integers(3, 8000, (n_rows, seq + 1)), spans


class MemoryPeak:
    """The process's peak resident memory from now on, above what it holds now (Linux: /proc's high-water
    mark, reset by ``clear_refs``)."""

    def __init__(self):
        Path("/proc/self/clear_refs").write_text("5")
        self.base = self._kib("VmRSS")

    @staticmethod
    def _kib(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])

    def mib(self) -> float:
        return (self._kib("VmHWM") - self.base) / 1024


def attention_only(mode: str, seq: int, args) -> dict:
    """In this process: forward + backward of one attention call (queries, keys, values of every row)."""
    import torch

    from trainer.model import dense_document_mask, row_layout, segment_attention, segment_buckets

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    ids, spans = rows_of_documents(seq, args.tokens, args.doc_median)
    seg = row_layout(spans, ids.shape[1], ["en"])[2][:, :-1]
    d = args.hidden // args.heads

    def call(seg, q, k, v):
        if mode == "dense":
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=dense_document_mask(torch.as_tensor(seg)), enable_gqa=True)
        elif mode == "segments":
            buckets = [tuple(torch.as_tensor(a) for a in b) for b in segment_buckets(seg)]
            out, _ = segment_attention(None, q, k, v, None, doc_buckets=buckets)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()

    def qkv(rows: int, width: int):
        return (torch.randn(rows, h, width, d, requires_grad=True) for h in (args.heads, args.kv_heads, args.kv_heads))

    small_ids, small_spans = rows_of_documents(128, 512, 40)
    call(row_layout(small_spans, small_ids.shape[1], ["en"])[2][:, :-1], *qkv(len(small_ids), 128))
    q, k, v = qkv(len(ids), seq)
    memory, times = MemoryPeak(), []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        call(seg, q, k, v)
        q.grad = k.grad = v.grad = None
        if step:
            times.append(time.perf_counter() - started)
    return {"times": times, "peak_mib": memory.mib(), "rows": len(ids), "docs": sum(len(r) for r in spans)}


def one(mode: str, seq: int, args) -> dict:
    """In this process: the steps' times and the peak memory of ``mode`` at ``seq``."""
    import torch

    from lake.recipe import ModelCfg
    from trainer.model import build_model, row_layout, token_losses

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = ModelCfg(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                   max_positions=seq + 1, activation_checkpointing=args.checkpointing)
    model = build_model(cfg, 8192)
    model.train()
    if args.compile:
        model = torch.compile(model, dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train(ids, spans):
        cat, pos, seg = row_layout(spans, ids.shape[1], ["en"])
        loss_tok, target_cat = token_losses(model, torch.as_tensor(ids), cat, pos, seg, doc_mask=mode != "causal",
                                            dense=mode == "dense", loss_chunk=0 if mode == "dense" else args.loss_chunk)
        loss = loss_tok.sum() / (target_cat >= 0).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    train(*rows_of_documents(128, 512, 40))  # libraries loaded, optimizer state made: not the step's memory
    ids, spans = rows_of_documents(seq, args.tokens, args.doc_median)
    memory, times = MemoryPeak(), []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        train(ids, spans)
        if step:  # the first is the warm-up
            times.append(time.perf_counter() - started)
    return {"times": times, "peak_mib": memory.mib(), "rows": int(ids.shape[0]), "docs": sum(len(r) for r in spans)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step at every length")
    parser.add_argument("--doc-median", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing in every mode")
    parser.add_argument("--compile", action="store_true", help="torch.compile (dynamic shapes) in every mode")
    parser.add_argument("--loss-chunk", type=int, default=0, help="trainer.model.loss_chunk for segments and causal "
                        "(the dense mask stays the trainer's old path: all logits at once)")
    parser.add_argument("--one", nargs=3, metavar=("PART", "MODE", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        measure = one if args.one[0] == "step" else attention_only
        print(json.dumps(measure(args.one[1], int(args.one[2]), args)))
        return
    passed = sys.argv[1:]
    results: dict[tuple[str, str, int], dict] = {}
    for _ in range(args.rounds):
        for part in ("step", "attention"):
            for seq in args.seq:
                for mode in MODES:
                    out = subprocess.run([sys.executable, __file__, *passed, "--one", part, mode, str(seq)],
                                         capture_output=True, text=True, cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)})
                    if out.returncode:
                        sys.exit(f"{part} {mode} at {seq}: exit {out.returncode}\n{out.stderr[-3000:]}")
                    got = json.loads(out.stdout.strip().splitlines()[-1])
                    r = results.setdefault((part, mode, seq), {"times": [], "peaks": [], "rows": got["rows"],
                                                               "docs": got["docs"]})
                    r["times"] += got["times"]
                    r["peaks"].append(got["peak_mib"])
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv); {args.tokens:,} "
          f"tokens per step in documents of median {args.doc_median} tokens; {args.rounds} rounds x {args.steps} steps "
          f"per mode{'; activation checkpointing' if args.checkpointing else ''}{'; torch.compile' if args.compile else ''}"
          f"{f'; loss_chunk {args.loss_chunk} (not dense)' if args.loss_chunk else ''}; "
          f"{os.cpu_count()} CPU threads")
    for part, title in (("step", "a whole training step (forward, backward, AdamW)"),
                        ("attention", "attention alone (one call, forward + backward)")):
        print(f"\n{title}")
        print(f"{'':22} {'s (median)':>11} {'min-max':>14} {'peak MiB (median)':>18} {'dense / it':>11} "
              f"{'it / causal':>12}")
        for seq in args.seq:
            dense, causal = (statistics.median(results[(part, m, seq)]["times"]) for m in ("dense", "causal"))
            for mode in MODES:
                r = results[(part, mode, seq)]
                t, spread = statistics.median(r["times"]), f"{min(r['times']):.3f}-{max(r['times']):.3f}"
                print(f"{f'{mode} @ {seq}':22} {t:11.3f} {spread:>14} "
                      f"{statistics.median(r['peaks']):18,.0f} {dense / t:10.2f}x {t / causal:11.2f}x")
            first = results[(part, "dense", seq)]
            print(f"  {first['rows']} rows of {seq} tokens, {first['docs']} documents")


if __name__ == "__main__":
    main()
