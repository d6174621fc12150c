"""One optimizer step over some rows of a chunk: micro-batches with gradient accumulation, the loss
per token and per category, and the totals every rank agrees on."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.engine import device_of, loss_scale, skip_next_step
from trainer.model import row_layout, segment_buckets, token_losses
from trainer.parallel import SequenceGroup


@dataclass
class StepResult:
    loss: float  # mean loss per target token over every rank (nan when a micro-batch was not finite)
    tokens: int  # target tokens of the step, every rank together
    finite: bool  # False: some micro-batch on some rank was not finite, and the optimizer step was skipped
    grad_norm: float | None
    loss_by_category: dict[str, float]
    seconds: float
    seq_len: int
    z_loss: float | None = None  # mean (log Σ exp logits)² per target token, where the recipe asks for the z-loss
    skipped: bool = False  # skip-step judged the step an outlier: no update
    overflow: bool = False  # fp16: the scaled gradients overflowed; DeepSpeed skipped the update and halved the scale
    loss_scale: float | None = None  # fp16: the loss scale after the step
    row_loss: list[float] = field(default_factory=list)  # per row of the step (this rank's, in order): its worst document's mean loss


MIN_DOC_TOKENS = 8  # a document's part of a row with fewer targets is too noisy to judge on its own


def worst_document_loss(loss_tok: torch.Tensor, target_seg: torch.Tensor, valid: torch.Tensor,
                        sp: SequenceGroup | None = None) -> torch.Tensor:
    """Per row [rows]: the highest mean loss of the documents in it (their parts with at least
    ``MIN_DOC_TOKENS`` targets; the row's mean where none has). A row that is mostly clean but holds one
    corrupted document stands out by that document, not by its average. With ``sp`` the inputs are this
    rank's piece of each row and the sums are the sequence group's (segments number the whole row)."""
    rows, width = loss_tok.shape
    slots = width * (sp.size if sp is not None else 1)  # a row holds at most this many segments (no host sync)
    index = (torch.arange(rows, device=loss_tok.device)[:, None] * slots + target_seg.clamp(min=0))[valid]
    lt = loss_tok.detach().double()
    sums = torch.zeros(rows * slots, dtype=torch.float64, device=lt.device).index_add_(0, index, lt[valid])
    counts = torch.zeros_like(sums).index_add_(0, index, torch.ones_like(lt[valid]))
    row_sum = torch.stack([torch.where(valid, lt, torch.zeros_like(lt)).sum(dim=1), valid.sum(dim=1).double()])
    if sp is not None:
        for t in (sums, counts, row_sum):
            sp.all_reduce(t)
    means = torch.where(counts >= MIN_DOC_TOKENS, sums / counts.clamp(min=1), torch.full_like(sums, -math.inf))
    worst = means.reshape(rows, slots).max(dim=1).values
    row_mean = row_sum[0] / row_sum[1].clamp(min=1)
    return torch.where(worst != -math.inf, worst, row_mean)


def _layout(ids_all: np.ndarray, spans_all: list, batch: list[int], categories: list[str], device, doc_mask: bool):
    """The micro-batch on the device: ids, category / position / segment per position, and (with
    ``doc_mask``) the documents' attention buckets, made on the host from the spans."""
    ids = to_device(ids_all[batch], device)
    layout = row_layout([spans_all[r] for r in batch], ids.shape[1], categories)
    buckets = segment_buckets(layout[2][:, :-1]) if doc_mask else None
    cat, pos, seg = (to_device(a, device) for a in layout)
    return ids, cat, pos, seg, buckets


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
               doc_mask: bool, z_loss: float = 0.0, skip: Callable[[float, float | None], bool] | None = None,
               sp: SequenceGroup | None = None, loss_chunk: int = 0) -> StepResult:
    """Forward, backward and the engine's step over ``rows`` of this rank's chunk rows, ``micro`` at a time.

    Everything stays on the engine's device; the step's totals come back to the host once, in the one
    all-reduce before the optimizer step. When a micro-batch's loss is not finite on any rank, every
    rank skips the optimizer step (``trainer.engine.skip_next_step``): the weights do not move. So does
    every rank when ``skip(loss, grad_norm)`` (the step's loss and gradient norm before clipping, the
    same on every rank) says so: skip-step, for an outlier. ``z_loss`` > 0 adds that coefficient times
    the mean (log Σ exp logits)² to the loss that is backpropagated (the reported loss stays the
    cross-entropy; the z term is ``StepResult.z_loss``). With ``sp`` (``trainer/parallel.py``) the ranks of
    a sequence group hold the same rows and each computes its piece of the positions: its loss is its
    share of the group's sum, scaled for DeepSpeed's average over every rank. ``loss_chunk``: the output
    layer and loss that many positions at a time (``trainer.model.token_losses``)."""
    started = time.perf_counter()
    device = device_of(engine)
    scale = loss_scale(engine)  # fp16: the gradients are scaled by it until the step unscales them
    gas = math.ceil(len(rows) / micro)
    if gas != engine.gradient_accumulation_steps():
        engine.set_train_batch_size(micro * gas * torch.distributed.get_world_size())
    k = len(categories) + 8  # room for categories first met in these rows; every rank reduces the same size
    # [loss sum, target tokens, non-finite micro-batches, z sum, loss per category (k), tokens per category (k)]
    totals = torch.zeros(4 + 2 * k, dtype=torch.float64, device=device)
    per_row: list[torch.Tensor] = []
    skipped = False
    for m in range(gas):
        batch = rows[m * micro : (m + 1) * micro]
        per_row.append(_forward_backward(engine, _layout(ids_all, spans_all, batch, categories, device, doc_mask),
                                         doc_mask, z_loss, sp, loss_chunk, totals, k))
        if m == gas - 1:
            own = _grad_norm(engine.module)  # before the step clips and applies it
            torch.distributed.all_reduce(totals)  # every rank agrees on the step's loss, tokens and finiteness
            norm_part = [own.double().reshape(1)] if own is not None else []
            host = torch.cat([totals, *norm_part, *per_row]).cpu().numpy()  # the step's one trip back to the host
            agg, rest = host[: totals.numel()], host[totals.numel() :]
            own_norm, row_loss = (float(rest[0]) / (scale or 1.0), rest[1:]) if norm_part else (None, rest)
            if agg[2] > 0:
                skip_next_step(engine)
            elif skip is not None and skip(float(agg[0] / max(agg[1], 1)), own_norm):
                skip_next_step(engine)
                skipped = True
        engine.step()
    total_loss, total_tokens, finite = float(agg[0]), int(agg[1]), bool(agg[2] == 0)
    # fp16: DeepSpeed found inf/nan in the scaled gradients, skipped the update and halved the scale
    overflow = scale is not None and finite and not skipped and not engine.was_step_applied()
    per_cat, per_cat_n = agg[4 : 4 + k], agg[4 + k :]
    norm = None if overflow else engine.get_global_grad_norm()
    if norm is None and own_norm is not None and not overflow:
        norm = own_norm
    return StepResult(
        loss=total_loss / max(total_tokens, 1) if finite else float("nan"), tokens=total_tokens, finite=finite,
        grad_norm=float(norm) if norm is not None else None,
        loss_by_category={c: float(per_cat[i] / per_cat_n[i]) for i, c in enumerate(categories[:k]) if per_cat_n[i] > 0},
        seconds=time.perf_counter() - started, seq_len=ids_all.shape[1] - 1, row_loss=row_loss.tolist(),
        z_loss=float(agg[3] / max(total_tokens, 1)) if z_loss > 0 else None, skipped=skipped, overflow=overflow,
        loss_scale=loss_scale(engine))


def _forward_backward(engine, layout, doc_mask: bool, z_loss: float, sp: SequenceGroup | None, loss_chunk: int,
                      totals: torch.Tensor, k: int) -> torch.Tensor:
    """One micro-batch (``_layout``'s): forward and backward, its sums added to ``totals`` (``train_step``'s
    layout of them); its rows' worst document losses."""
    ids, cat, pos, seg, buckets = layout
    z = [] if z_loss > 0 else None
    loss_tok, target_cat = token_losses(engine, ids, cat, pos, seg, doc_mask, buckets, z=z, sp=sp, loss_chunk=loss_chunk)
    valid = target_cat >= 0
    n = valid.sum()
    # the engine divides by the accumulation steps itself
    denominator = n.clamp(min=1) if sp is None else sp.all_reduce(n.double()).clamp(min=1) / sp.loss_factor
    loss = loss_tok.sum() / denominator
    z_sum = z[0][valid].sum() if z else None
    engine.backward(loss + z_loss * z_sum / denominator if z else loss)
    with torch.no_grad():
        lt, tc = loss_tok.detach()[valid].double(), target_cat[valid]
        totals[0] += lt.sum()
        totals[1] += n
        totals[2] += (~torch.isfinite(loss.detach())).double()
        if z:
            totals[3] += z_sum.detach().double()
        totals[4 : 4 + k] += torch.bincount(tc, weights=lt, minlength=k)[:k]
        totals[4 + k :] += torch.bincount(tc, minlength=k)[:k].double()
        return worst_document_loss(loss_tok, _target_segments(seg, sp), valid, sp)


@torch.no_grad()
def probe_rows(engine, ids_all: np.ndarray, spans_all: list, rows: list[int], micro: int, categories: list[str],
               doc_mask: bool, sp: SequenceGroup | None = None, loss_chunk: int = 0) -> list[float]:
    """Forward only: each row's worst document loss (``worst_document_loss``) under the current weights,
    computed as the steps are (``sp``, ``loss_chunk``: see ``train_step``)."""
    device, out = device_of(engine), []
    for m in range(0, len(rows), micro):
        ids, cat, pos, seg, buckets = _layout(ids_all, spans_all, rows[m : m + micro], categories, device, doc_mask)
        loss_tok, target_cat = token_losses(engine, ids, cat, pos, seg, doc_mask, buckets, sp=sp, loss_chunk=loss_chunk)
        out.append(worst_document_loss(loss_tok, _target_segments(seg, sp), target_cat >= 0, sp))
    return torch.cat(out).cpu().tolist() if out else []


def _target_segments(seg: torch.Tensor, sp: SequenceGroup | None) -> torch.Tensor:
    """Each target's segment [rows, width-1]: this rank's piece of them under sequence parallelism."""
    return seg[:, 1:] if sp is None else seg[:, 1:][:, sp.piece(seg.shape[1] - 1)]
