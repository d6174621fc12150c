"""Perplexity per source on the held-out documents (``lake.holdout``: feed never puts them in chunks)."""

from __future__ import annotations

import math

import torch

from lake.holdout import holdout_ids
from lake.tables import Lake


def holdout_documents(lake: Lake, tokenizer, per_source: int, width: int) -> dict[str, list[list[int]]]:
    """Token ids (at most ``width``) of the held-out documents, per source."""
    name = lake.kept_documents()
    chosen = holdout_ids(lake.read_arrow(name, columns=["doc_id", "source"]).to_pylist(), per_source)
    by_source: dict[str, list[list[int]]] = {}
    for r in lake.read_arrow(name, columns=["doc_id", "source", "text"]).to_pylist():
        if r["doc_id"] in chosen:
            ids = tokenizer.encode(r["text"], add_special_tokens=False).ids[:width]
            if len(ids) > 1:
                by_source.setdefault(r["source"], []).append(ids)
    return by_source


@torch.no_grad()
def perplexity_by_source(model, documents: dict[str, list[list[int]]]) -> dict[str, float]:
    model.eval()
    out = {}
    for source, docs in sorted(documents.items()):
        total, count = 0.0, 0
        for ids in docs:
            t = torch.tensor([ids])
            logits = model(input_ids=t[:, :-1]).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="sum"))
            count += len(ids) - 1
        out[source] = math.exp(total / max(count, 1))
    model.train()
    return out
