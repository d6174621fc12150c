"""Shift warnings: a rule that removes most of one source turns the corpus into a different corpus.

After the filter has judged every document, each (rule, source) whose removals exceed
``filter.warn_share`` of that source's documents is a shift; so is each (dedup threshold key,
source) above ``dedup.warn_share`` once dedup has chosen its survivors. A shift is printed as a
warning with samples and listed in the stage's report and in ``tokenmill report``; with ``--strict``
the stage fails before it commits anything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shift:
    key: str  # the rule, or ``dedup key <threshold key>``
    source: str
    removed: int
    of: int  # the source's documents in
    limit: float  # warn_share

    @property
    def share(self) -> float:
        return self.removed / self.of

    def __str__(self) -> str:
        return (f"{self.key} removed {self.removed:,} of {self.of:,} documents of {self.source} "
                f"({self.share:.0%}, more than warn_share {self.limit:.0%})")


def shifts(inputs: dict[str, int], removed: dict[tuple[str, str], int], warn_share: float) -> list[Shift]:
    """The (key, source) pairs of ``removed`` (documents each key removed from each source) above
    ``warn_share`` of the source's ``inputs``, the largest share first."""
    found = [Shift(key, source, n, inputs[source], warn_share) for (key, source), n in removed.items()
             if inputs.get(source) and n / inputs[source] > warn_share]
    return sorted(found, key=lambda s: (-s.share, s.key, s.source))
