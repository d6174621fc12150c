"""Sequence (context) parallelism, Ulysses-style: the ranks of a sequence group share each row, every rank
holding a contiguous piece of its positions.

Embeddings, RoPE, norms, the MLP and the loss work token by token, so each rank computes them on its own
piece. Attention needs the whole row: before it, one all-to-all trades pieces of the sequence for groups
of heads (each rank then holds every position of ``heads / size`` heads and attends as a single process
would, document mask included); after it, a second all-to-all trades them back. Both exchanges are their
own gradient, so the backward pass is the same two exchanges in reverse.

Ranks ``[k·size, (k+1)·size)`` form sequence group ``k`` and read the same rows: the data-parallel rank
is ``rank // size``. DeepSpeed averages gradients over every rank, so a rank's loss is its piece's share
of the row's sum, times ``size`` (``SequenceGroup.loss_factor``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's sequence group: ``size`` ranks sharing each row, this one at ``index`` among them."""

    size: int
    index: int
    group: object  # the torch.distributed process group of the ``size`` ranks

    def piece(self, width: int) -> slice:
        """This rank's positions of a row ``width`` wide (``width`` divides by ``size``)."""
        if width % self.size:
            raise ValueError(f"a row of {width} positions does not split over trainer.sequence_parallel = {self.size} "
                             f"ranks: make the stage's seq_len a multiple of {self.size}")
        n = width // self.size
        return slice(self.index * n, (self.index + 1) * n)

    @property
    def loss_factor(self) -> float:
        return float(self.size)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the group, in place (no gradient flows through it)."""
        dist.all_reduce(t, group=self.group)
        return t


def data_parallel(rank: int, world: int, sequence_parallel: int) -> tuple[int, int]:
    """(data-parallel rank, data-parallel world): which rows a rank reads, and how many readers there are."""
    if world % sequence_parallel:
        raise ValueError(f"trainer.sequence_parallel = {sequence_parallel} does not divide the {world} processes: "
                         f"start a multiple of {sequence_parallel}")
    return rank // sequence_parallel, world // sequence_parallel


def sequence_group(rank: int, world: int, size: int) -> SequenceGroup | None:
    """This rank's group (every rank makes every group, in the same order, as torch.distributed asks);
    None without sequence parallelism."""
    data_parallel(rank, world, size)
    if size == 1:
        return None
    mine = None
    for k in range(world // size):
        ranks = list(range(k * size, (k + 1) * size))
        group = dist.new_group(ranks) if size < world else dist.group.WORLD
        if rank in ranks:
            mine = SequenceGroup(size, rank - k * size, group)
    return mine


class _AllToAll(torch.autograd.Function):
    """Block ``j`` of dim 0 goes to rank ``j``; block ``j`` received comes from rank ``j``. Its own inverse,
    so its gradient is the same exchange of the output's gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()  # all_to_all_single reads and writes whole blocks of memory
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def sequence_to_heads(x: torch.Tensor, sp: SequenceGroup) -> torch.Tensor:
    """[rows, heads, piece, dim] on each rank → [rows, heads / size, piece · size, dim]: the whole row for
    this rank's group of heads."""
    b, h, s, d = x.shape
    if h % sp.size:
        raise ValueError(f"{h} attention heads do not split over trainer.sequence_parallel = {sp.size} ranks")
    blocks = x.reshape(b, sp.size, h // sp.size, s, d).transpose(0, 1)  # [size (head group), b, h/size, s, d]
    got = _AllToAll.apply(blocks, sp.group)  # [size (sequence piece), b, h/size, s, d]
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // sp.size, sp.size * s, d)


def heads_to_sequence(x: torch.Tensor, sp: SequenceGroup) -> torch.Tensor:
    """Attention's output [rows, positions, heads / size, dim] → [rows, positions / size, heads, dim]:
    this rank's piece of the row, every head."""
    b, s, h, d = x.shape
    blocks = x.reshape(b, sp.size, s // sp.size, h, d).transpose(0, 1)  # [size (sequence piece), b, s/size, h, d]
    got = _AllToAll.apply(blocks, sp.group)  # [size (head group), b, s/size, h, d]
    return got.permute(1, 2, 0, 3, 4).reshape(b, s // sp.size, sp.size * h, d)
