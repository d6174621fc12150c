"""A real Spark standalone cluster on loopback for the tests: one master and its workers, started with
the ``spark-class`` launcher that ships inside pip's pyspark (the ``start-*.sh`` scripts do not), and
the spark-submit command line a cluster user runs against it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pyspark

from jobs.spark import DELTA_SQL_CONF
from lake.jars import delta_jars

SPARK_HOME = Path(pyspark.__file__).parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check, seconds: float, logs: list[Path]) -> None:
    """Poll ``check`` until it is true; after ``seconds`` fail with the daemons' log tails."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)  # polling a daemon that is starting up, with a deadline
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in logs if p.exists())
    raise TimeoutError(f"the standalone cluster: {what} within {seconds:g} s\n{tails}")


@dataclass
class Cluster:
    url: str  # spark://127.0.0.1:PORT
    ui: str  # the master's web UI (its /json/ lists workers and applications)
    work_dirs: list[Path]
    logs: list[Path]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def state(self) -> dict:
        with urllib.request.urlopen(f"{self.ui}/json/", timeout=10) as response:
            return json.loads(response.read())

    def applications(self) -> list[dict]:
        """Every application the master registered, running or finished."""
        s = self.state()
        return s.get("activeapps", []) + s.get("completedapps", [])

    def executor_logs(self, app_id: str) -> list[Path]:
        """The stderr of every executor the workers ran for the application."""
        return sorted(p for d in self.work_dirs for p in (d / app_id).glob("*/stderr"))

    def submit(self, script: str, args: list[str], cwd: Path, py_files: str | None = None,
               timeout: int = 900) -> subprocess.CompletedProcess:
        """spark-submit in client mode to this master, with the Delta jars, as a cluster user runs a job."""
        jars = delta_jars()
        assert jars, "the Delta jars are missing: run tokenmill jars"
        command = [str(BIN / "spark-submit"), "--master", self.url, "--jars", ",".join(map(str, jars)),
                   "--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=1"]
        for key, value in DELTA_SQL_CONF.items():
            command += ["--conf", f"{key}={value}"]
        if py_files:
            command += ["--py-files", py_files]
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
        for key in ("TOKENMILL_SPARK_MASTER", "TOKENMILL_DELTA_MODE"):  # the suite's own settings, not a user's
            env.pop(key, None)
        return subprocess.run(command + [script, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        for p in reversed(self.processes):
            p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def start(folder: Path, workers: int = 2, cores: int = 1, memory: str = "1500m") -> Cluster:
    """A master and ``workers`` workers of ``cores`` cores each on 127.0.0.1; returns once all registered."""
    folder.mkdir(parents=True, exist_ok=True)
    port, ui_port = free_port(), free_port()
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "SPARK_NO_DAEMONIZE": "1"}
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    cluster = Cluster(f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}", [], [])

    def daemon(name: str, args: list[str]) -> None:
        log = folder / f"{name}.log"
        cluster.logs.append(log)
        with open(log, "wb") as out:
            cluster.processes.append(subprocess.Popen([spark_class, *args], env=env, stdout=out, stderr=subprocess.STDOUT))

    daemon("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
                      "--webui-port", str(ui_port)])
    try:
        wait_until("the master's web UI answers", lambda: _answers(cluster), 120, cluster.logs)
        for i in range(workers):
            work = folder / f"worker-{i}"
            cluster.work_dirs.append(work)
            daemon(f"worker-{i}", ["org.apache.spark.deploy.worker.Worker", cluster.url, "--host", "127.0.0.1",
                                   "--cores", str(cores), "--memory", memory, "--webui-port", str(free_port()),
                                   "--work-dir", str(work)])
        wait_until(f"{workers} workers registered", lambda: _alive(cluster) == workers, 120, cluster.logs)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _answers(cluster: Cluster) -> bool:
    try:
        cluster.state()
        return True
    except OSError:
        return False


def _alive(cluster: Cluster) -> int:
    return sum(1 for w in cluster.state().get("workers", []) if w.get("state") == "ALIVE")
