"""What feed reports: one chunk made (``ChunkReport``), a whole run (``FeedReport``), and the error of
a chunk that cannot be made (``FeedError``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.stages import StageError


class FeedError(StageError):
    """A chunk that cannot be made (or verified); the message names the chunk and the fix."""


@dataclass
class ChunkReport:
    chunk_id: str
    stage: str
    n_tokens: int
    n_rows: int
    files: int
    mix: dict[str, int]
    target: dict[str, int]
    documents: int
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # plan / tokenise_pack / publish seconds
    shares: dict[str, float] = field(default_factory=dict)  # the mix it was planned with
    signal: dict | None = None  # an adaptive mix's signal (``jobs.adaptive_mix.ChunkMix``); None: a fixed mix

    def __str__(self) -> str:
        share = ", ".join(f"{c} {n:,} ({n / max(self.n_tokens, 1):.1%}, target {self.target.get(c, 0):,})"
                          for c, n in sorted(self.mix.items()))
        lines = [f"chunk {self.chunk_id} ({self.stage}): {self.n_tokens:,} tokens in {self.n_rows:,} rows, "
                 f"{self.files} files, {self.documents:,} documents, {self.seconds:.1f} s "
                 f"({self.n_tokens / max(self.seconds, 1e-9):,.0f} tokens/s; "
                 + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items()) + ")", f"  mix: {share}"]
        if self.signal is not None:
            lines.append(adaptive_line(self.shares, self.signal))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def adaptive_line(shares: dict[str, float], signal: dict) -> str:
    """An adaptive chunk's mix, each category with the loss and slope that moved it."""
    head = f"  adaptive mix (run {signal['run']}, strength {signal['strength']:g}): "
    seen = signal["signals"]
    if not seen:
        return head + "no signal yet, the base mix: " + ", ".join(f"{c} {s:.3f}" for c, s in sorted(shares.items()))
    return head + ", ".join(
        f"{c} {s:.3f} (" + (f"loss {seen[c]['loss']:.3f}, slope {seen[c]['slope']:.3g}/token at step {seen[c]['step']}"
                            if c in seen else "no signal") + ")" for c, s in sorted(shares.items()))


@dataclass
class FeedReport:
    produced: list[ChunkReport]
    cleaned: list[str]
    quarantined: list[tuple[str, str]]
    backlog: int
    seconds: float

    def __str__(self) -> str:
        lines = [f"cleaned up interrupted chunk {c} (files, usage and manifest row)" for c in self.cleaned]
        lines += [f"quarantined {c}: {why}" for c, why in self.quarantined]
        tokens = sum(c.n_tokens for c in self.produced)
        lines.append(f"feed: {len(self.produced)} chunk(s) made ({', '.join(c.chunk_id for c in self.produced) or 'none'}), "
                     f"{tokens:,} tokens in {self.seconds:.1f} s; "
                     f"{self.backlog} ready and waiting")
        return "\n".join(lines)
