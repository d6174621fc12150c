"""Benchmark: few-shot scoring (``trainer.fewshot.model_loglikelihood``) against one forward pass per option.

Same items (the built-in set, ``trainer.fewshot.builtin_items``, made from ~1 KB pieces of the demo
corpus's real text by source: ``--docs`` per source, ``--context`` + ``--continuation`` tokens),
same model (a Llama of ``--layers`` layers and ``--hidden`` width, random weights, a byte-level BPE
tokenizer trained on the pieces), same process, one thread:
- reference: per (prompt, option), ``model(input_ids=prompt + option)``, the full log-softmax, the
  option's tokens summed: the obvious loop, as lm-evaluation-harness runs a model one request at a time;
- tokenmill: ``model_loglikelihood`` (requests sorted by length, right-padded batches of about
  ``--batch-tokens`` tokens, the log-softmax only where an option's tokens are read).
Both must give the same log-likelihoods (within float tolerance) and the same accuracy. Rounds
alternate the sides; medians and the spread of ``--rounds`` are printed.

    python bench/fewshot.py [--docs 100] [--batch-tokens 8192] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import kilobyte_pieces, print_rounds, timed_rounds, tiny_llama  # noqa: E402
from jobs.demo_corpus import build_demo_corpus  # noqa: E402
from jobs.train_tokenizer import build_tokenizer  # noqa: E402
from trainer import fewshot  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=100, help="documents per source")
    parser.add_argument("--context", type=int, default=48)
    parser.add_argument("--continuation", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-fewshot-") as tmp:
        by_source = {b.name: kilobyte_pieces(b.texts())[: args.docs] for b in build_demo_corpus(Path(tmp) / "demo")
                     if b.name != "messy"}
    tok = build_tokenizer([t for texts in by_source.values() for t in texts], 4096, ["<|endoftext|>", "<|pad|>"], [])
    documents = {s: [tok.encode(t).ids[: 4 * (args.context + args.continuation)] for t in texts]
                 for s, texts in by_source.items()}
    items = fewshot.builtin_items(documents, args.context, args.continuation, 0, tok.decode)
    task = fewshot.TaskSet("builtin", items, 0, [tok.token_to_id("<|endoftext|>")])
    model = tiny_llama(tok.get_vocab_size(), args.hidden, args.layers).eval()

    def reference(requests):
        out = []
        with torch.inference_mode():
            for prompt, option in requests:
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + option])).logits[0].float(), -1)
                out.append(sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(option)))
        return out

    ours = fewshot.model_loglikelihood(model, args.batch_tokens, tok.token_to_id("<|pad|>"))
    requests = fewshot.requests_of(task, 0, None)
    times, results = timed_rounds(args.rounds, {"reference": lambda: reference(requests), "ours": lambda: ours(requests)})
    want, got = results["reference"], results["ours"]
    same = all(abs(a - b) <= 1e-3 * max(1.0, abs(a)) for a, b in zip(want, got))
    accs = [fewshot.evaluate_set(task, lambda _: scores) for scores in (want, got)]
    tokens = sum(len(p) + len(o) for p, o in requests)
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(items)} items of the built-in set ({', '.join(documents)}; {len(requests)} options, {tokens:,} tokens), "
          f"Llama {args.layers} x {args.hidden} ({params / 1e6:.1f}M parameters), one thread, {args.rounds} rounds; "
          f"same log-likelihoods (rtol 1e-3): {same}; same acc: {accs[0] == accs[1]} ({accs[1].acc:.3f}, chance "
          f"{accs[1].chance:.3f})")
    print_rounds(times, {"reference": "one forward pass per option",
                         "ours": f"model_loglikelihood, {args.batch_tokens} tokens a batch"}, len(items), "items")

if __name__ == "__main__":
    main()
