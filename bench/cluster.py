"""Benchmark: the same stages on a two-worker standalone cluster next to local mode on the same input,
and native Delta (the jar) next to the delta-rs bridge for the same writes.

Three ways to run each stage, each a process of its own as a user runs it, on the same JSONL input:

    local, bridge      python -m jobs.<stage> --recipe R          local[2], TOKENMILL_DELTA_MODE=bridge
    local, native      python -m jobs.<stage> --recipe R          local[2], the Delta jars
    cluster, native    spark-submit --master spark://… jobs/<stage>.py   2 workers × 1 core, the Delta jars

The figure is the stage's own time (``<stage> finished in … s``, after its Spark session is up), with
the whole process's wall time beside it; repeats are interleaved and reported as median and spread.

    python bench/cluster.py [--docs 20000] [--repeats 3] [--stages ingest,filter]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import standalone  # noqa: E402  (tests/standalone.py: the cluster the tests start)
from ingest import make_input  # noqa: E402  (bench/ingest.py: real demo text under fresh ids)
from jobs.package import build  # noqa: E402
from jobs.stages import stage  # noqa: E402
from lake.jars import delta_coordinates, fetch  # noqa: E402
from lake.fs import end_process  # noqa: E402

WAYS = ("local, bridge", "local, native", "cluster, native")


def write_recipe(work: Path, data: Path, way: str, run: int) -> Path:
    folder = work / f"{way.replace(', ', '-')}-{run}"
    folder.mkdir(parents=True)
    recipe = {"lake": str(folder / "lake"),
              "sources": [{"name": "web", "path": f"{data}/*.jsonl", "id_field": "id", "url_field": "url"}],
              "spark": {"master": "local[2]", "shuffle_partitions": 4, "driver_memory": "2g",
                        "conf": {"spark.ui.enabled": "false"}}}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_stage(way: str, name: str, recipe: Path, cluster, package: Path) -> tuple[float, float]:
    """(the stage's own seconds, the process's wall seconds)."""
    module = stage(name).module
    started = time.perf_counter()
    if way.startswith("cluster"):  # from `tokenmill package`'s archive and entry scripts, as a cluster user
        proc = cluster.submit(f"jobs/{module}.py", ["--recipe", str(recipe)], cwd=package, py_files="tokenmill.zip")
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENMILL_DELTA_MODE": way.split(", ")[1],
               "TOKENMILL_SPARK_LOG_LEVEL": "ERROR"}
        env.pop("TOKENMILL_SPARK_MASTER", None)
        proc = subprocess.run([sys.executable, "-m", f"jobs.{module}", "--recipe", str(recipe)], env=env,
                              cwd=recipe.parent, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    found = re.search(rf"^{name} finished in ([0-9.]+) s$", proc.stdout, re.M)
    if proc.returncode or not found:
        raise SystemExit(f"{name} ({way}) failed with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return float(found.group(1)), wall


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.1f} s  [{min(values):.1f}–{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", default="ingest,filter")
    args = parser.parse_args()
    names = args.stages.split(",")
    fetch(delta_coordinates())
    work = Path(tempfile.mkdtemp(prefix="tokenmill-bench-cluster-"))
    cluster = standalone.start(work / "cluster", workers=2)
    try:
        build(work / "package")
        data, size = make_input(work, args.docs)
        n_docs = (args.docs // 4) * 4
        job = {(w, n): [] for w in WAYS for n in names}
        wall = {(w, n): [] for w in WAYS for n in names}
        for r in range(args.repeats):
            for way in WAYS if r % 2 == 0 else reversed(WAYS):  # interleaved, the order alternating
                recipe = write_recipe(work, data, way, r)
                for name in names:  # each stage reads what the same way's previous stage wrote
                    seconds, total = run_stage(way, name, recipe, cluster, work / "package")
                    job[way, name].append(seconds)
                    wall[way, name].append(total)
                    print(f"  run {r + 1} {way:16} {name:8} {seconds:7.1f} s (process {total:.1f} s)", flush=True)
        print(f"\ninput: {n_docs} documents, {size / 1e6:.1f} MB JSONL in 4 files; local[2] against a standalone "
              f"master with 2 workers × 1 core (1 GiB executors); median [min–max] of {args.repeats}")
        print(f"{'stage':8} {'way':16} {'stage time':>24} {'docs/s':>8} {'process wall':>26}")
        for name in names:
            for way in WAYS:
                median = statistics.median(job[way, name])
                print(f"{name:8} {way:16} {spread(job[way, name]):>24} {n_docs / median:8,.0f} {spread(wall[way, name]):>26}")
            local_native = statistics.median(job["local, native", name])
            bridge = statistics.median(job["local, bridge", name])
            on_cluster = statistics.median(job["cluster, native", name])
            print(f"{name:8} ratios: cluster / local (native) {on_cluster / local_native:.2f}, "
                  f"native / bridge (local) {local_native / bridge:.2f}  (time; below 1 is faster)")
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
    end_process(0)  # delta-rs can abort a plain interpreter exit: see lake/fs.end_process
