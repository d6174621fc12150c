"""Perplexity per source on the held-out documents (``lake.holdout``: frozen in the lake, never in a chunk)."""

from __future__ import annotations

import math

import torch

from lake.holdout import held_out_documents
from lake.tables import Lake


def holdout_documents(lake: Lake, tokenizer, per_source: int, width: int) -> dict[str, list[list[int]]]:
    """Token ids (at most ``width``) of the held-out documents (``lake.holdout``), at most
    ``per_source`` per source; of an instruction example, its completion's."""
    return {source: [ids[context:] for ids, context in docs]
            for source, docs in holdout_examples(lake, tokenizer, per_source, width).items()}


def holdout_examples(lake: Lake, tokenizer, per_source: int, width: int) -> dict[str, list[tuple[list[int], int]]]:
    """(token ids, at most ``width``; how many of them are context) of the held-out documents, at most
    ``per_source`` per source: an instruction example is its prompt's ids (the context, as in
    training, where it carries no loss) then its completion's; a document's context is 0. Those
    whose ids leave fewer than two to score are left out."""
    by_source: dict[str, list[tuple[list[int], int]]] = {}
    kept = lake.kept_documents()
    # a lake refined before instruction sources existed has no prompt column: its documents have none
    columns = ["doc_id", "source", "text"] + (["prompt"] if lake.has_column(kept, "prompt") else [])
    rows = held_out_documents(lake, kept, columns).to_pylist()
    for r in sorted(rows, key=lambda r: r["doc_id"]):
        context = tokenizer.encode(r["prompt"], add_special_tokens=False).ids if r.get("prompt") is not None else []
        ids = (context + tokenizer.encode(r["text"], add_special_tokens=False).ids)[:width]
        if len(ids) - len(context) > 1 and len(by_source.get(r["source"], [])) < per_source:
            by_source.setdefault(r["source"], []).append((ids, len(context)))
    return by_source


@torch.no_grad()
def perplexity_by_source(model, documents: dict[str, list[tuple[list[int], int]]]) -> dict[str, float]:
    """exp of the mean next-token loss per source, over each document's tokens after its context
    (``holdout_examples``): an instruction example is scored on its completion, given its prompt."""
    model.eval()
    device = next(model.parameters()).device
    out = {}
    for source, docs in sorted(documents.items()):
        total, count = torch.zeros((), dtype=torch.float64, device=device), 0
        for ids, context in docs:
            t = torch.tensor([ids], device=device)
            logits = model(input_ids=t[:, :-1]).logits.float()
            scored = max(context, 1) - 1  # the first target scored is the token after the context
            total += torch.nn.functional.cross_entropy(logits[0, scored:], t[0, scored + 1 :], reduction="sum")
            count += len(ids) - 1 - scored
        out[source] = math.exp(float(total) / max(count, 1))  # one trip to the host per source
    model.train()
    return out
