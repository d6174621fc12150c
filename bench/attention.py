"""Benchmark: attention with a document mask, three ways, on the same model and the same packed rows.

- ``dense``: the mask as one float tensor [rows, 1, seq, seq] (``trainer.model.dense_document_mask``,
  the trainer's path before ``segment_attention``): O(seq²) memory per row, SDPA's math path;
- ``segments``: ``trainer.model.segment_attention``, each document attends to itself with SDPA's
  causal kernel, no mask (what ``doc_mask: true`` trains with);
- ``causal``: plain causal attention over the whole row, no document mask (the floor: what the
  documents would cost without their boundaries).

Each (mode, sequence length) runs in a fresh process: one warm-up step, then ``--steps`` timed
forward + backward + AdamW steps; the process's peak resident memory above its size after the model
was built is its peak memory. Rounds alternate the modes so that drift hits all of them; medians
and the spread are printed. The rows hold ``--tokens`` tokens per step at every length, in documents
of log-normally distributed lengths (median ``--doc-median`` tokens).

    python bench/attention.py [--seq 2048 8192] [--steps 3] [--rounds 3] [--hidden 256] [--layers 4]
                              [--checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def one(mode: str, seq: int, args) -> dict:
    """In this process: the steps' times and the peak memory of ``mode`` at ``seq``."""
    import torch

    from lake.recipe import ModelCfg
    from trainer.model import build_model, row_layout, token_losses

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg = ModelCfg(hidden=args.hidden, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads, max_positions=seq + 1)
    model = build_model(cfg, 8192)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, spans = rows_of_documents(seq, args.tokens, args.doc_median)
    cat, pos, seg = row_layout(spans, ids.shape[1], ["en"])
    ids = torch.as_tensor(ids)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        loss_tok, target_cat = token_losses(model, ids, cat, pos, seg, doc_mask=mode != "causal", dense=mode == "dense")
        loss = loss_tok.sum() / (target_cat >= 0).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if step:  # the first is the warm-up
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"times": times, "peak_mib": (peak - base) / 1024, "rows": int(ids.shape[0]),
            "docs": sum(len(r) for r in spans)}


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
    parser.add_argument("--one", nargs=2, metavar=("MODE", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args)))
        return
    passed = sys.argv[1:]
    results: dict[tuple[str, int], dict] = {}
    for _ in range(args.rounds):
        for seq in args.seq:
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, *passed, "--one", mode, str(seq)], capture_output=True,
                                     text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
                if out.returncode:
                    sys.exit(f"{mode} at {seq}: exit {out.returncode}\n{out.stderr[-3000:]}")
                got = json.loads(out.stdout.strip().splitlines()[-1])
                r = results.setdefault((mode, seq), {"times": [], "peaks": [], "rows": got["rows"], "docs": got["docs"]})
                r["times"] += got["times"]
                r["peaks"].append(got["peak_mib"])
    print(f"model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv); {args.tokens:,} "
          f"tokens per step in documents of median {args.doc_median} tokens; {args.rounds} rounds x {args.steps} steps "
          f"per mode{'; activation checkpointing' if args.checkpointing else ''}; {os.cpu_count()} CPU threads")
    print(f"{'':22} {'s/step (median)':>16} {'min-max':>14} {'peak MiB (median)':>18} {'vs dense':>9} {'vs causal':>10}")
    for seq in args.seq:
        dense, causal = (statistics.median(results[(m, seq)]["times"]) for m in ("dense", "causal"))
        for mode in MODES:
            r = results[(mode, seq)]
            t, spread = statistics.median(r["times"]), f"{min(r['times']):.3f}-{max(r['times']):.3f}"
            print(f"{f'{mode} @ {seq}':22} {t:16.3f} {spread:>14} "
                  f"{statistics.median(r['peaks']):18,.0f} {dense / t:8.2f}x {t / causal:9.2f}x")
        print(f"  {results[('dense', seq)]['rows']} rows of {seq} tokens, {results[('dense', seq)]['docs']} documents")


if __name__ == "__main__":
    main()
