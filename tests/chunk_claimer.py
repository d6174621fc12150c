"""One trainer's side of the chunk store, as a process of its own for the race tests: claim, verify,
read and consume chunks through ``trainer.data.ChunkFeed`` (the daemon's own code, one rank) until the
stop file exists and nothing is left ready. Prints one JSON line per chunk it trained.

    python tests/chunk_claimer.py LAKE RUN_ID STOP_FILE
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lake.chunks import Events  # noqa: E402
from lake.fs import end_process  # noqa: E402
from lake.tables import Lake  # noqa: E402
from trainer.data import RETRY, ChunkFeed  # noqa: E402

DEADLINE_S = 300


def main(lake_root: str, run_id: str, stop_file: str) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    lake = Lake(lake_root)
    feed = ChunkFeed(lake, "pretrain", run_id, 0, 1, Events(lake, run_id))
    deadline, step = time.monotonic() + DEADLINE_S, 0
    while time.monotonic() < deadline:
        stopped = os.path.exists(stop_file)  # read before asking: a chunk published earlier is seen
        row = feed.next_chunk(step)
        if row is RETRY:
            continue
        if row is None:
            if stopped:
                return 0
            time.sleep(0.05)  # the feed is still producing: poll the manifest again
            continue
        ids, _ = feed.rows(row)
        step += 1
        print(json.dumps({"chunk_id": row["chunk_id"], "rows": int(len(ids)), "tokens": int(ids.size)}), flush=True)
        feed.finish(row, "consumed", step, int(ids.size))
    print(f"{run_id}: still waiting after {DEADLINE_S} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    end_process(main(*sys.argv[1:4]))  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
