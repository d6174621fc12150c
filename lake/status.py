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
    if lake.exists("trainer_events"):
        events = sorted(lake.read_arrow("trainer_events").to_pylist(), key=lambda r: r["at"])[-5:]
        if events:
            print("the trainer's last events:")
            for e in events:
                print(f"  {e['at']:%Y-%m-%d %H:%M:%S} run {e['run_id']} step {e['step']:>6} {e['event']:<12} "
                      f"{e['chunk_id'] or ''} {e['detail'] or ''}")
