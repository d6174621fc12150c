"""The trainer's side of the chunk store: which chunk to train on next, this rank's rows of it, and
what became of it. Rank 0 talks to the lake; every rank learns the answer by broadcast."""

from __future__ import annotations

import numpy as np
import torch

from lake import chunks as store
from lake.fs import require_safe_commits
from lake.tables import Lake

RETRY = {"retry": True}  # a chunk was quarantined on the way: ask again at once


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank."""
    t = torch.tensor([1.0 if flag else 0.0])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def broadcast(value):
    """Rank 0's ``value`` on every rank."""
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


class ChunkFeed:
    def __init__(self, lake: Lake, stage: str, run_name: str, rank: int, world: int, events: store.Events,
                 tokenizer: str | None = None, readers: tuple[int, int] | None = None):
        """``tokenizer``: the run's (``lake.chunks.tokenizer_id``); a chunk made with another is refused.
        ``readers``: (this rank's reader, readers), the data-parallel rank and world where ranks share rows
        (sequence parallelism, ``trainer/parallel.data_parallel``); by default every rank reads its own."""
        require_safe_commits(lake.root)  # claims race feed's commits on `chunks`: S3 needs conditional puts
        self.lake, self.stage, self.run_name, self.tokenizer = lake, stage, run_name, tokenizer
        self.rank, self.world, self.events = rank, world, events
        self.reader, self.readers = readers or (rank, world)

    def next_chunk(self, step: int) -> dict | None:
        """The chunk this run holds (after a restart) or a newly claimed one, verified; None when none is
        ready; ``RETRY`` when the claimed one failed its checksums and was quarantined."""
        row = None
        if self.rank == 0:
            row = store.find_claimed(self.lake, self.stage, self.run_name)
            if row is None:
                row = store.claim_next(self.lake, self.stage, self.run_name)
                if row is not None:
                    self.events(step, "claimed", row["chunk_id"], f"{row['n_tokens']:,} tokens")
            if row is not None:
                problem = (store.tokenizer_mismatch(row, self.tokenizer) if self.tokenizer else None) or \
                    store.verify(self.lake.run_root, row)
                if problem:
                    store.quarantine(self.lake, row, problem, job="trainer")
                    self.events(step, "quarantine", row["chunk_id"], problem)
                    row = RETRY
        return broadcast(row)

    def rows(self, chunk: dict) -> tuple[np.ndarray, list]:
        """This rank's rows of the chunk (token ids [rows, seq_len + 1] and spans), every rank the same count."""
        ids, spans = store.read_rows(self.lake, chunk)
        n_local = len(ids) // self.readers
        return ids[self.reader :: self.readers][:n_local], spans[self.reader :: self.readers][:n_local]

    def finish(self, chunk: dict, outcome: str, step: int, tokens: int) -> None:
        """A chunk trained to its end is consumed; one that kept spiking is quarantined."""
        if self.rank != 0:
            return
        if outcome == "quarantined":
            why = "loss kept spiking after rollbacks, or most of its rows were bad"
            store.quarantine(self.lake, chunk, why, job="trainer")
            self.events(step, "quarantine", chunk["chunk_id"], why)
        else:
            store.set_status(self.lake, chunk, store.CONSUMED, job="trainer", consumed=True)
            self.events(step, "consumed", chunk["chunk_id"], f"{tokens:,} tokens so far")
