"""``tokenmill status``: what is in the lake, read with delta-rs (no Spark needed)."""

from __future__ import annotations

from lake.tables import Lake
from schemas import TABLES


def print_status(lake_root: str) -> None:
    """Print every table of the lake with version, rows and last commit, the rejections, the chunk
    backlog, usage and the trainer's last events (no Spark needed)."""
    lake = Lake(lake_root)
    print(f"lake {lake_root}")
    print(f"  {'table':<20} {'version':>7} {'rows':>10} {'files':>6}  last commit")
    missing = []
    for name in TABLES:
        if not lake.exists(name):
            missing.append(name)
            continue
        s = lake.summary(name)
        last = s.last_commit
        by = f" by {last.job}" if last.job else ""
        print(
            f"  {name:<20} {s.version:>7} {s.rows:>10} {s.files:>6}  "
            f"{last.timestamp:%Y-%m-%d %H:%M:%S} UTC {last.operation}{by}"
        )
    if missing:
        print(f"  not written yet: {', '.join(missing)}")
    from lake.atomic import interrupted

    for marker in interrupted(lake):
        print(f"  WARNING: {marker['stage']} died between its commits (started {marker['started_at']}); the next "
              f"stage run puts {', '.join(marker['before'])} back to their versions before it")
    if lake.exists("documents_rejected"):
        rejected = lake.read_arrow("documents_rejected", columns=["stage", "reason"])
        if rejected.num_rows:
            print("rejected documents by stage and reason:")
            grouped = rejected.group_by(["stage", "reason"]).aggregate([("reason", "count")])
            for row in sorted(grouped.to_pylist(), key=lambda r: (r["stage"], -r["reason_count"])):
                print(f"  {row['stage']:<10} {row['reason']:<22} {row['reason_count']:>8}")
    if lake.exists("chunks"):
        chunks = lake.read_arrow("chunks", columns=["status", "n_tokens"])
        print("chunk backlog by status:")
        grouped = chunks.group_by("status").aggregate([("status", "count"), ("n_tokens", "sum")])
        by_status = {row["status"]: row for row in grouped.to_pylist()}
        for status, row in sorted(by_status.items()):
            print(f"  {status:<12} {row['status_count']:>6} chunks  {row['n_tokens_sum']:>14,} tokens")
        print(f"  ready for the trainer: {by_status.get('ready', {}).get('status_count', 0)}")
    if lake.exists("usage"):
        used = [n for n in lake.read_arrow("usage", columns=["times_used"]).column("times_used").to_pylist() if n]
        if used:
            print(f"usage: {len(used):,} documents in chunks, {sum(used) / len(used):.2f} times each on average, "
                  f"at most {max(used)}")
        _print_usage_check(lake)
    if lake.exists("trainer_events"):
        events = sorted(lake.read_arrow("trainer_events").to_pylist(), key=lambda r: r["at"])[-5:]
        if events:
            print("the trainer's last events:")
            for e in events:
                print(f"  {e['at']:%Y-%m-%d %H:%M:%S} run {e['run_id']} step {e['step']:>6} {e['event']:<12} "
                      f"{e['chunk_id'] or ''} {e['detail'] or ''}")


def _print_usage_check(lake: Lake) -> None:
    """Whether ``usage`` matches what the live chunks hold (feed counts a chunk's documents when it
    writes it, and takes them back when the chunk is cleaned up or quarantined)."""
    from lake.chunks import usage_disagreements

    wrong = usage_disagreements(lake)
    if wrong is None:
        return
    if not wrong:
        print("  usage agrees with the ready, training and consumed chunks")
        return
    shown = ", ".join(f"{d} (usage {u}, chunks {c})" for d, u, c in wrong[:5])
    print(f"  WARNING: usage disagrees with the chunks for {len(wrong):,} document(s): {shown}"
          f"{' …' if len(wrong) > 5 else ''}. Sampling fades these documents by the wrong count. A feed "
          f"that died between its commits leaves this: run `tokenmill feed` (it cleans up interrupted "
          f"chunks); if it stays, the usage table was changed by hand or by another feed at the same time.")
