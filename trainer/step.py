"""One optimizer step over some rows of a chunk: micro-batches with gradient accumulation, the loss
per token and per category, and the totals every rank agrees on."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from trainer.model import row_layout, token_losses


@dataclass
class StepResult:
    loss: float  # mean loss per target token over every rank (nan when a micro-batch was not finite)
    tokens: int  # target tokens of the step, every rank together
    finite: bool
    grad_norm: float | None
    loss_by_category: dict[str, float]
    seconds: float
    seq_len: int


def _grad_norm(module) -> float | None:
    """The global L2 norm of the gradients held on this process (None when ZeRO-2/3 sharded them away)."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def train_step(engine, ids_all: np.ndarray, spans_all: list, rows: list[int], micro: int, categories: list[str],
               doc_mask: bool) -> StepResult:
    """Forward, backward and the engine's step over ``rows`` of this rank's chunk rows, ``micro`` at a time."""
    started = time.perf_counter()
    gas = math.ceil(len(rows) / micro)
    if gas != engine.gradient_accumulation_steps():
        engine.set_train_batch_size(micro * gas * torch.distributed.get_world_size())
    k = len(categories) + 8  # room for categories first met in these rows; every rank reduces the same size
    total_loss, total_tokens, finite, own_norm = 0.0, 0, True, None
    per_cat, per_cat_n = np.zeros(k), np.zeros(k)
    for m in range(gas):
        batch = rows[m * micro : (m + 1) * micro]
        ids = torch.from_numpy(ids_all[batch])
        cat, pos, seg = row_layout([spans_all[r] for r in batch], ids.shape[1], categories)
        loss_tok, target_cat = token_losses(engine, ids, cat, pos, seg, doc_mask)
        valid = target_cat >= 0
        n = int(valid.sum())
        loss = loss_tok.sum() / max(n, 1)  # the engine divides by the accumulation steps itself
        if not torch.isfinite(loss):
            # no update from this micro-batch, but the engine still counts it: a zero loss
            finite = False
            loss = sum(p.sum() for p in engine.module.parameters()) * 0.0
        engine.backward(loss)
        if m == gas - 1:
            own_norm = _grad_norm(engine.module)  # before the step clips and applies it
        engine.step()
        with torch.no_grad():
            lt, tc = loss_tok.detach().numpy()[valid.numpy()], target_cat.numpy()[valid.numpy()]
            total_loss += float(lt.sum()) if finite else float("nan")
            total_tokens += n
            per_cat += np.bincount(tc, weights=lt, minlength=k)[:k]
            per_cat_n += np.bincount(tc, minlength=k)[:k]
    # every rank agrees on the step's loss and token count
    agg = torch.tensor([total_loss, float(total_tokens), *per_cat, *per_cat_n], dtype=torch.float64)
    torch.distributed.all_reduce(agg)
    total_loss, total_tokens = float(agg[0]), int(agg[1])
    per_cat, per_cat_n = agg[2 : 2 + k].numpy(), agg[2 + k : 2 + 2 * k].numpy()
    norm = engine.get_global_grad_norm()
    return StepResult(
        loss=total_loss / max(total_tokens, 1), tokens=total_tokens, finite=finite,
        grad_norm=float(norm) if norm is not None else own_norm,
        loss_by_category={c: float(per_cat[i] / per_cat_n[i]) for i, c in enumerate(categories[:k]) if per_cat_n[i] > 0},
        seconds=time.perf_counter() - started, seq_len=ids_all.shape[1] - 1)
