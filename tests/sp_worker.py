"""Sequence parallelism's check, run as ``python tests/sp_worker.py OUT`` in each of 2 processes (gloo; the
test sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): every rank computes its piece of the same batch's
token losses, the pieces and the summed gradients are gathered, and rank 0 saves them to OUT for the test
to compare with one process (``losses_and_grads`` without a group)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lake.trainer_sections import ModelCfg  # noqa: E402
from trainer.model import build_model, row_layout, token_losses  # noqa: E402
from trainer.parallel import SequenceGroup, sequence_group  # noqa: E402

WIDTH, CATS = 65, ["en", "zh"]


def batch() -> tuple[np.ndarray, list]:
    """Four rows of 65 tokens, packed with documents of random lengths; two end in padding."""
    rng = np.random.default_rng(0)
    ids, spans = rng.integers(3, 300, (4, WIDTH)), []
    for r in range(4):
        row, at, k = [], 0, 0
        while at < WIDTH - (3 if r % 2 else 0):
            n = min(int(rng.integers(1, WIDTH // 2)), WIDTH - at)
            row.append({"doc_id": f"{r}-{k}", "pos": at, "doc_start": int(rng.integers(0, 5)), "length": n,
                        "doc_tokens": n + 5, "category": CATS[k % 2]})
            at, k = at + n, k + 1
        spans.append(row)
    return ids, spans


CASES = {"doc_mask": (True, 0, 0.0), "causal": (False, 0, 0.0), "doc_mask, loss_chunk 24, z-loss": (True, 24, 0.1)}


def losses_and_grads(case: str, sp: SequenceGroup | None = None) -> tuple[torch.Tensor, dict]:
    """The whole batch's token losses [rows, width-1] (0 where ignored) and the gradients of their sum
    (plus the z-loss's terms where the case has a coefficient), for one of ``CASES``."""
    doc_mask, loss_chunk, z_loss = CASES[case]
    torch.manual_seed(0)
    model = build_model(ModelCfg(hidden=64, layers=2, heads=4, kv_heads=2, doc_mask=doc_mask), 300)
    ids, spans = batch()
    cat, pos, seg = row_layout(spans, WIDTH, list(CATS))
    z = []
    loss_tok, target_cat = token_losses(model, torch.as_tensor(ids), cat, pos, seg, doc_mask, z=z, sp=sp,
                                        loss_chunk=loss_chunk)
    valid = target_cat >= 0
    loss_tok = torch.where(valid, loss_tok, torch.zeros_like(loss_tok))
    (loss_tok.sum() + z_loss * z[0][valid].sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if sp is None:
        return loss_tok.detach(), grads
    for g in grads.values():
        sp.all_reduce(g)
    pieces = [torch.empty_like(loss_tok) for _ in range(sp.size)]
    torch.distributed.all_gather(pieces, loss_tok.detach().contiguous(), group=sp.group)
    return torch.cat(pieces, dim=1), grads


def main(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sp = sequence_group(rank, world, world)
    results = {case: losses_and_grads(case, sp) for case in CASES}
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
