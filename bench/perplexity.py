"""Benchmark: the perplexity filter's scoring (``quality_models.perplexity``) against a per-document loop.

Same documents (``--docs`` ~1 KB pieces of the demo corpus's real text), same model (a Llama of
``--layers`` layers and ``--hidden`` width with a byte-level BPE tokenizer trained on the pieces,
saved as a Hugging Face folder, as an export is), same process, one thread:
- reference: per document, ``model(input_ids, labels=input_ids).loss`` and its exp, the obvious way;
- tokenmill: ``PerplexityModel.perplexity`` (length-sorted batches of ``--batch-size``, padded, masked).
Both read the first ``--max-tokens`` tokens and must agree within float tolerance. Rounds alternate
the sides; medians and the spread of ``--rounds`` are printed.

    python bench/perplexity.py [--docs 400] [--max-tokens 256] [--batch-size 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import demo_texts, kilobyte_pieces, print_rounds, timed_rounds, tiny_llama  # noqa: E402
from jobs.train_tokenizer import build_tokenizer  # noqa: E402
from quality_models.perplexity import PerplexityModel  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(1)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="tokenmill-bench-perplexity-") as tmp:
        work = Path(tmp)
        every = kilobyte_pieces(demo_texts(work / "demo"))
        pieces = every[:: max(1, len(every) // args.docs)][: args.docs]
        tok = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(pieces, 4096, ["<|endoftext|>", "<|pad|>"], []),
                                      eos_token="<|endoftext|>", pad_token="<|pad|>")
        model = tiny_llama(len(tok), args.hidden, args.layers, args.max_tokens)
        folder = work / "lm"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        ours_model = PerplexityModel(str(folder), args.max_tokens, args.batch_size)
        ref_model = ours_model.model

        def reference() -> np.ndarray:
            out = np.full(len(pieces), np.nan)
            with torch.inference_mode():
                for i, text in enumerate(pieces):
                    ids = tok(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
                    if len(ids) >= 2:
                        batch = torch.tensor([ids])
                        out[i] = float(torch.exp(ref_model(input_ids=batch, labels=batch).loss))
            return out

        times, results = timed_rounds(args.rounds, {"reference": reference,
                                                    "ours": lambda: ours_model.perplexity(pieces)})
        want, got = results["reference"], results["ours"]
        ok = np.isnan(want) == np.isnan(got)
        close = np.allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-3)
        tokens = sum(min(len(tok(t, add_special_tokens=False)["input_ids"]), args.max_tokens) for t in pieces)
        params = sum(p.numel() for p in model.parameters())
        print(f"{len(pieces)} documents (~1 KB, {tokens:,} tokens read), Llama {args.layers} x {args.hidden} "
              f"({params / 1e6:.1f}M parameters), first {args.max_tokens} tokens, one thread, {args.rounds} rounds; "
              f"same perplexities (rtol 1e-3): {bool(ok.all() and close)}")
        print_rounds(times, {"reference": "per document, model(labels=ids).loss",
                             "ours": f"PerplexityModel, batches of {args.batch_size}"}, len(pieces), "docs", 40)

if __name__ == "__main__":
    main()
