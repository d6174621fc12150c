"""Perplexity per source on the held-out documents (``lake.holdout``: frozen in the lake, never in a chunk)."""

from __future__ import annotations

import math

import torch

from lake.holdout import held_out_documents
from lake.tables import Lake


def holdout_documents(lake: Lake, tokenizer, per_source: int, width: int) -> dict[str, list[list[int]]]:
    """Token ids (at most ``width``) of the held-out documents (``lake.holdout``), at most
    ``per_source`` per source."""
    by_source: dict[str, list[list[int]]] = {}
    rows = held_out_documents(lake, lake.kept_documents(), ["doc_id", "source", "text"]).to_pylist()
    for r in sorted(rows, key=lambda r: r["doc_id"]):
        ids = tokenizer.encode(r["text"], add_special_tokens=False).ids[:width]
        if len(ids) > 1 and len(by_source.get(r["source"], [])) < per_source:
            by_source.setdefault(r["source"], []).append(ids)
    return by_source


@torch.no_grad()
def perplexity_by_source(model, documents: dict[str, list[list[int]]]) -> dict[str, float]:
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for source, docs in sorted(documents.items()):
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for ids in docs:
            t = torch.tensor([ids], device=device)
            logits = model(input_ids=t[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits[0], t[0, 1:], reduction="sum")
            count += len(ids) - 1
        out[source] = math.exp(float(total) / max(count, 1))  # one trip to the host per source
    model.train()
    return out
