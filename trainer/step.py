"""One optimizer step over some rows of a chunk: micro-batches with gradient accumulation, the loss
per token and per category, and the totals every rank agrees on."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.engine import device_of, skip_next_step
from trainer.model import row_layout, token_losses


@dataclass
class StepResult:
    loss: float  # mean loss per target token over every rank (nan when a micro-batch was not finite)
    tokens: int  # target tokens of the step, every rank together
    finite: bool  # False: some micro-batch on some rank was not finite, and the optimizer step was skipped
    grad_norm: float | None
    loss_by_category: dict[str, float]
    seconds: float
    seq_len: int
    row_loss: list[float] = field(default_factory=list)  # per row of the step (this rank's, in order): its worst document's mean loss


MIN_DOC_TOKENS = 8  # a document's part of a row with fewer targets is too noisy to judge on its own


def worst_document_loss(loss_tok: torch.Tensor, target_seg: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per row [rows]: the highest mean loss of the documents in it (their parts with at least
    ``MIN_DOC_TOKENS`` targets; the row's mean where none has). A row that is mostly clean but holds one
    corrupted document stands out by that document, not by its average."""
    rows, width = loss_tok.shape  # a row holds at most ``width`` segments (no host sync to count them)
    index = (torch.arange(rows, device=loss_tok.device)[:, None] * width + target_seg.clamp(min=0))[valid]
    lt = loss_tok.detach().double()
    sums = torch.zeros(rows * width, dtype=torch.float64, device=lt.device).index_add_(0, index, lt[valid])
    counts = torch.zeros_like(sums).index_add_(0, index, torch.ones_like(lt[valid]))
    means = torch.where(counts >= MIN_DOC_TOKENS, sums / counts.clamp(min=1), torch.full_like(sums, -math.inf))
    worst = means.reshape(rows, width).max(dim=1).values
    row_mean = torch.where(valid, lt, torch.zeros_like(lt)).sum(dim=1) / valid.sum(dim=1).clamp(min=1)
    return torch.where(worst != -math.inf, worst, row_mean)


def _layout(ids_all: np.ndarray, spans_all: list, batch: list[int], categories: list[str], device):
    ids = to_device(ids_all[batch], device)
    cat, pos, seg = (to_device(a, device) for a in row_layout([spans_all[r] for r in batch], ids.shape[1], categories))
    return ids, cat, pos, seg


def _grad_norm(module) -> torch.Tensor | None:
    """The global L2 norm of the gradients held on this process, on their device (None when ZeRO-2/3
    sharded them away)."""
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: through pinned memory and a non-blocking copy on a GPU."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def train_step(engine, ids_all: np.ndarray, spans_all: list, rows: list[int], micro: int, categories: list[str],
               doc_mask: bool) -> StepResult:
    """Forward, backward and the engine's step over ``rows`` of this rank's chunk rows, ``micro`` at a time.

    Everything stays on the engine's device; the step's totals come back to the host once, in the one
    all-reduce before the optimizer step. When a micro-batch's loss is not finite on any rank, every
    rank skips the optimizer step (``trainer.engine.skip_next_step``): the weights do not move."""
    started = time.perf_counter()
    device = device_of(engine)
    gas = math.ceil(len(rows) / micro)
    if gas != engine.gradient_accumulation_steps():
        engine.set_train_batch_size(micro * gas * torch.distributed.get_world_size())
    k = len(categories) + 8  # room for categories first met in these rows; every rank reduces the same size
    # [loss sum, target tokens, non-finite micro-batches, loss per category (k), tokens per category (k)]
    totals = torch.zeros(3 + 2 * k, dtype=torch.float64, device=device)
    own_norm = None
    per_row: list[torch.Tensor] = []
    for m in range(gas):
        batch = rows[m * micro : (m + 1) * micro]
        ids, cat, pos, seg = _layout(ids_all, spans_all, batch, categories, device)
        loss_tok, target_cat = token_losses(engine, ids, cat, pos, seg, doc_mask)
        valid = target_cat >= 0
        n = valid.sum()
        loss = loss_tok.sum() / n.clamp(min=1)  # the engine divides by the accumulation steps itself
        engine.backward(loss)
        with torch.no_grad():
            per_row.append(worst_document_loss(loss_tok, seg[:, 1:], valid))
            lt, tc = loss_tok.detach()[valid].double(), target_cat[valid]
            totals[0] += lt.sum()
            totals[1] += n
            totals[2] += (~torch.isfinite(loss.detach())).double()
            totals[3 : 3 + k] += torch.bincount(tc, weights=lt, minlength=k)[:k]
            totals[3 + k :] += torch.bincount(tc, minlength=k)[:k].double()
        if m == gas - 1:
            own_norm = _grad_norm(engine.module)  # before the step clips and applies it
            torch.distributed.all_reduce(totals)  # every rank agrees on the step's loss, tokens and finiteness
            host = torch.cat([totals, *per_row]).cpu().numpy()  # the step's one trip back to the host
            agg, row_loss = host[: totals.numel()], host[totals.numel() :]
            if agg[2] > 0:
                skip_next_step(engine)
        engine.step()
    total_loss, total_tokens, finite = float(agg[0]), int(agg[1]), bool(agg[2] == 0)
    per_cat, per_cat_n = agg[3 : 3 + k], agg[3 + k :]
    norm = engine.get_global_grad_norm()
    if norm is None and own_norm is not None:
        norm = own_norm
    return StepResult(
        loss=total_loss / max(total_tokens, 1) if finite else float("nan"), tokens=total_tokens, finite=finite,
        grad_norm=float(norm) if norm is not None else None,
        loss_by_category={c: float(per_cat[i] / per_cat_n[i]) for i, c in enumerate(categories[:k]) if per_cat_n[i] > 0},
        seconds=time.perf_counter() - started, seq_len=ids_all.shape[1] - 1, row_loss=row_loss.tolist())


@torch.no_grad()
def probe_rows(engine, ids_all: np.ndarray, spans_all: list, rows: list[int], micro: int, categories: list[str],
               doc_mask: bool) -> list[float]:
    """Forward only: each row's worst document loss (``worst_document_loss``) under the current weights."""
    device, out = device_of(engine), []
    for m in range(0, len(rows), micro):
        ids, cat, pos, seg = _layout(ids_all, spans_all, rows[m : m + micro], categories, device)
        loss_tok, target_cat = token_losses(engine, ids, cat, pos, seg, doc_mask)
        out.append(worst_document_loss(loss_tok, seg[:, 1:], target_cat >= 0))
    return torch.cat(out).cpu().tolist() if out else []
