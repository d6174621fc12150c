"""Benchmark: the trainer daemon's step time next to a bare torch training loop, interleaved in one
run, on the same model and the same batches.

- daemon: ``trainer.loop.Trainer`` (DeepSpeed engine, chunk streaming, per-category losses,
  metrics to JSONL and TensorBoard, spike guard), wall time between consecutive steps;
- bare: the same LlamaForCausalLM, the same rows in the same order, torch AdamW, forward,
  cross-entropy, backward, clip, step; nothing else.

Rounds alternate daemon and bare so that drift hits both; the medians are compared (target:
overhead at most 5%). Checkpoints and evaluations are outside the comparison (their intervals are
set beyond the measured steps). Both print tokens/s and MFU (model FLOPs of ``trainer.schedule``
over ``--peak`` FLOP/s).

``--device`` picks DeepSpeed's accelerator (``DS_ACCELERATOR``) and the bare loop's device: ``cpu``,
or ``cuda`` (the default where a GPU is visible), where both run in bf16 (DeepSpeed's bf16 mode with
fp32 master weights; the bare loop under ``torch.autocast``) unless ``--fp32``.

    python bench/trainer.py [--rounds 3] [--steps 20] [--hidden 256] [--layers 4] [--seq-len 256]
                            [--device cpu|cuda] [--fp32] [--peak 989e12]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".tokenmill" / "torch_extensions"))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from lake.recipe import parse_recipe  # noqa: E402
from schemas import table  # noqa: E402
from lake import chunks as store  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.model import build_model, parameter_groups, row_layout, token_losses  # noqa: E402
from trainer.schedule import model_flops_per_token  # noqa: E402
from jobs.synthetic_lake import add_chunk, make_lake  # noqa: E402
from lake.fs import end_process  # noqa: E402


def reset_chunks(lake) -> None:
    rows = lake.read_arrow("chunks").to_pylist()
    for r in rows:
        r.update(status="ready", run_id=None, times_consumed=0)
    lake.write_arrow("chunks", pa.Table.from_pylist(rows, schema=table("chunks").schema), mode="overwrite", job="bench")


def bare_steps(recipe, lake, steps: int, micro: int, device: str) -> list[float]:
    torch.manual_seed(recipe.trainer.seed)
    from lake.artifacts import load_tokenizer

    _, meta = load_tokenizer(recipe)
    model = build_model(recipe.trainer.model, meta["model_vocab_size"]).to(device)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=recipe.trainer.bf16)
    opt = torch.optim.AdamW(parameter_groups(model, 0.1), lr=recipe.trainer.lr_peak, betas=(0.9, 0.95), eps=1e-8)
    chunk = sorted(lake.read_arrow("chunks").to_pylist(), key=lambda r: r["chunk_id"])[0]
    ids_all, spans_all = store.read_rows(lake, chunk)
    times, cats = [], list(recipe.feed.current.mix)
    for step in range(steps):
        rows = [(step * micro + i) % len(ids_all) for i in range(micro)]
        ids = torch.from_numpy(ids_all[rows]).to(device)
        cat, pos, seg = row_layout([spans_all[r] for r in rows], ids.shape[1], cats)
        with autocast:
            loss_tok, target_cat = token_losses(model, ids, cat, pos, seg, False)
        loss = loss_tok.float().sum() / max(int((target_cat >= 0).sum()), 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # the daemon brings its results back once per step; so does this loop
        times.append(time.perf_counter())
    return [b - a for a, b in zip(times[2:], times[3:])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp32", action="store_true", help="on cuda: fp32 instead of bf16")
    parser.add_argument("--peak", type=float, default=None,
                        help="peak FLOP/s of one device for MFU (default: 989e12 on cuda, H100/H200 bf16 dense; "
                             "1e12 on cpu)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    os.environ["DS_ACCELERATOR"] = args.device  # before DeepSpeed first asks for its accelerator
    bf16 = args.device == "cuda" and not args.fp32
    peak = args.peak or (989e12 if args.device == "cuda" else 1e12)
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-trainer-"))
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        lake, tok, meta, docs = make_lake(str(work / "lake"), n_docs=3000)
        add_chunk(lake, "pretrain-000000", docs, tok, meta, seq_len=args.seq_len)
        n_rows = lake.read_arrow("chunks").to_pylist()[0]["n_rows"]
        steps = min(args.steps, n_rows // args.micro)
        daemon_times, bare_times, params = [], [], 0
        for round_no in range(args.rounds):
            reset_chunks(lake)
            raw = {"lake": str(work / "lake"), "sources": [{"name": "b", "path": "x.jsonl"}],
                   "trainer": {"run_name": f"bench{round_no}", "micro_batch": args.micro,
                               "batch_ramp": [[0, args.micro]], "checkpoint_every": 10**6, "eval_every": 10**6,
                               "bf16": bf16, "peak_flops": peak,
                               "model": {"hidden": args.hidden, "layers": args.layers, "heads": 4, "kv_heads": 2}}}
            recipe = parse_recipe(raw, work)
            trainer = Trainer(recipe, max_steps=steps, log=lambda *_: None)
            trainer.run()
            params = trainer.n_params
            ends = trainer.step_ends
            daemon_times += [b - a for a, b in zip(ends[2:], ends[3:])]
            bare_times += bare_steps(recipe, lake, steps, args.micro, args.device)
        daemon, bare = statistics.median(daemon_times), statistics.median(bare_times)
        tokens = args.micro * args.seq_len
        flops = model_flops_per_token(params, args.layers, args.hidden, args.seq_len)
        where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
        print(f"model: {params:,} parameters (hidden {args.hidden}, {args.layers} layers), batch {args.micro} x "
              f"{args.seq_len + 1} tokens; {args.rounds} interleaved rounds of {steps} steps; {where}, "
              f"{'bf16' if bf16 else 'fp32'}, MFU against {peak:.3g} FLOP/s")
        print(f"{'':40} {'s/step (median)':>16} {'p25-p75 spread':>16} {'tokens/s':>10} {'MFU':>7}")
        for name, value, times in (("bare torch loop", bare, bare_times),
                                   ("tokenmill daemon (DeepSpeed, metrics)", daemon, daemon_times)):
            q = statistics.quantiles(times, n=4)
            print(f"{name:40} {value:16.4f} {f'{q[0]:.4f}-{q[2]:.4f}':>16} {tokens / value:10,.0f} "
                  f"{100 * tokens / value * flops / peak:6.2f}%")
        print(f"overhead: {100 * (daemon / bare - 1):+.1f}% (target at most +5%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
