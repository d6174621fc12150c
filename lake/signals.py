"""``training_signals``: what the trainer learns of each category (its recent loss and slope), and
the latest of it, which an adaptive feed mix reads. The trainer appends with delta-rs (no JVM);
feed reads with DuckDB over the same files."""

from __future__ import annotations

from lake.chunks import now
from lake.tables import Lake


def publish_signals(lake: Lake, run_id: str, step: int, tokens: int, signals: dict[str, tuple[float, float]]) -> None:
    """One row per category, ``signals`` being category → (loss, slope per token), in one commit."""
    at = now()
    rows = [{"run_id": run_id, "step": int(step), "tokens": int(tokens), "category": category, "loss": float(loss),
             "slope": float(slope), "published_at": at} for category, (loss, slope) in sorted(signals.items())]
    if rows:
        lake.put_rows("training_signals", rows, job=f"trainer:{run_id}")


def latest_signals(lake: Lake, run_id: str | None = None) -> dict[str, dict]:
    """Category → its latest ``training_signals`` row, of the run ``run_id`` (None: of any run). The
    latest is the last published: a run rolled back publishes lower steps again, and those count."""
    if not lake.exists("training_signals"):
        return {}
    where = "" if run_id is None else "WHERE run_id = '" + run_id.replace("'", "''") + "'"
    rows = lake.sql(f"""SELECT * FROM training_signals {where}
                        QUALIFY row_number() OVER (PARTITION BY category ORDER BY published_at DESC, step DESC) = 1""",
                    ["training_signals"]).to_pylist()
    return {r["category"]: r for r in rows}
