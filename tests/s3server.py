"""A real S3-compatible server on loopback for the tests: SeaweedFS (Apache-2.0), its ``weed`` binary
built from the Go module proxy once into ``.tokenmill/bin/`` (or ``$TOKENMILL_WEED``), started as
``weed server -filer -s3`` (master, volume, filer and S3 gateway in one process) on free ports, with
one bucket and the environment a user of an S3 lake sets."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEAWEEDFS = "github.com/seaweedfs/seaweedfs"
SEAWEEDFS_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"  # 2026-11-09, from the Go module proxy
ACCESS_KEY, SECRET_KEY = "tokenmill-test", "tokenmill-test-secret"  # the server's one admin identity


def weed_target() -> Path:
    return ROOT / ".tokenmill" / "bin" / f"weed-{SEAWEEDFS_VERSION}"


def weed_binary(log=print) -> Path:
    """The ``weed`` binary: ``$TOKENMILL_WEED``, else ``.tokenmill/bin/weed-<version>``, built once (or
    waited for, when ``build_in_background`` started the build at the start of the session)."""
    if os.environ.get("TOKENMILL_WEED"):
        return Path(os.environ["TOKENMILL_WEED"])
    target = weed_target()
    if _background is not None:
        _background.join()
    if not target.is_file():
        build_weed(target, log)
    return target


_background: threading.Thread | None = None
_builds: list[subprocess.Popen] = []


def build_in_background() -> None:
    """Start building ``weed`` at low priority while other tests run (a fresh machine needs minutes for
    it); ``weed_binary`` waits for it, and a failed build is retried there with its error shown."""
    global _background
    if os.environ.get("TOKENMILL_WEED") or weed_target().is_file() or _background is not None:
        return

    def build() -> None:
        try:
            build_weed(weed_target(), log=lambda _: None, nice=19)
        except (OSError, RuntimeError):
            pass  # weed_binary builds again in the foreground and reports why

    _background = threading.Thread(target=build, name="weed-build", daemon=True)
    _background.start()


def stop_background_build() -> None:
    """End a build still running when the session ends (no orphan compiler left behind)."""
    for proc in _builds:
        if proc.poll() is None:
            proc.kill()
    if _background is not None:
        _background.join(timeout=30)


def _run(command: list[str], nice: int, **kwargs) -> subprocess.CompletedProcess:
    niced = ["nice", "-n", str(nice), *command] if nice and shutil.which("nice") else command
    proc = subprocess.Popen(niced, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    _builds.append(proc)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def build_weed(target: Path, log=print, nice: int = 0) -> None:
    """Download SeaweedFS's module and build ``weed`` inside it (its go.mod has replace directives, so
    ``go install pkg@version`` refuses it); the binary appears whole or not at all."""
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(go).is_file():
        raise FileNotFoundError(f"the S3 tests build SeaweedFS with Go (1.26+), and no `go` is on PATH or at {go}; "
                                f"install Go, or set TOKENMILL_WEED to a weed binary of {SEAWEEDFS} {SEAWEEDFS_VERSION}")
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"}
    module = f"{SEAWEEDFS}@{SEAWEEDFS_VERSION}"
    log(f"[s3server] building weed from {module} into {target} (once; minutes)")
    info = _run([go, "mod", "download", "-json", module], nice, env=env)
    if info.returncode:
        raise RuntimeError(f"go mod download {module} failed:\n{info.stdout[-2000:]}{info.stderr[-2000:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    built = _run([go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), "./weed"], nice,
                 cwd=json.loads(info.stdout)["Dir"], env=env)
    if built.returncode:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"go build of {module}/weed failed:\n{built.stderr[-4000:]}")
    partial.replace(target)


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    log: Path
    process: subprocess.Popen

    def env(self) -> dict[str, str]:
        """What a user of this lake exports: credentials, region, endpoint, plain http, conditional puts."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_CONDITIONAL_PUT": "etag"}

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:  # its graceful shutdown takes 20 s; the data is the tests' and thrown away
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(work: Path, bucket: str = "lake", seconds: float = 90) -> S3Server:
    """``weed server`` with a filer and the S3 gateway on free loopback ports, data under ``work``; returns
    once ``bucket`` exists."""
    binary = weed_binary()
    work.mkdir(parents=True, exist_ok=True)
    master, m_grpc, volume, v_grpc, filer, f_grpc, s3, s3_grpc = free_ports(8)
    args = [str(binary), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={work}", "-filer", "-s3",
            f"-master.port={master}", f"-master.port.grpc={m_grpc}", "-master.volumeSizeLimitMB=64",
            "-master.telemetry=false", f"-volume.port={volume}", f"-volume.port.grpc={v_grpc}", "-volume.max=16",
            f"-filer.port={filer}", f"-filer.port.grpc={f_grpc}", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0", "-s3.port.lance=0"]
    log = work / "weed.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", bucket, log, process)
    try:
        _wait_for_bucket(server, seconds)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_for_bucket(server: S3Server, seconds: float) -> None:
    """Poll the starting server (with a deadline) until it creates and lists the bucket."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1", scheme="http",
                           endpoint_override=server.endpoint.removeprefix("http://"), allow_bucket_creation=True,
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    deadline = time.monotonic() + seconds
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            urllib.request.urlopen(server.endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            pass  # the gateway answers (403 without a signature): it is up
        except OSError as err:
            last = err
            time.sleep(0.5)  # polling a server that is starting, with a deadline
            continue
        try:
            fs.create_dir(server.bucket)
            fs.get_file_info(pafs.FileSelector(server.bucket))
            return
        except OSError as err:  # the filer or a volume may not have registered yet
            last = err
            time.sleep(0.5)
    tail = server.log.read_text(errors="replace")[-3000:] if server.log.exists() else ""
    state = f"exited with {server.process.returncode}" if server.process.poll() is not None else "still starting"
    raise TimeoutError(f"SeaweedFS at {server.endpoint} ({state}): no bucket {server.bucket!r} within {seconds:g} s "
                       f"({last})\n--- {server.log}\n{tail}")
