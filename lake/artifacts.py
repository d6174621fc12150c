"""Versioned artifacts of the lake: classifier models and tokenizers, by lake URI.

Each lives in ``<lake>/models/<name>/vN/`` with a ``metadata.json`` beside its files; ``<name>`` is
``<task>-<backend>`` for classifiers and ``tokenizer`` for tokenizers. The lake may be a local
folder or any URI pyarrow reaches (s3://, gs://, abfss://, hdfs://):
- a new version is built in a local folder (``new_version``) and published to the lake in one
  copy when the block ends, ``metadata.json`` last, so a half-copied version is never listed;
- a version is read through ``local_folder``: the folder itself on a local lake, else a copy in
  the local cache (``TOKENMILL_ARTIFACT_CACHE``, default ``~/.cache/tokenmill/artifacts``), keyed
  by the lake, name, version and the metadata's creation time, so executors fetch it once.

The recipe pins a version (``v3``) or asks for ``latest``; a missing or mismatched artifact fails
with the command that makes one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from lake.errors import ArtifactError
from lake.fs import filesystem, is_local, list_dir, read_bytes

TOKENIZER = "tokenizer"
ModelError = ArtifactError  # the name the refinery's and the models' messages have always used


@dataclass(frozen=True)
class ModelRef:
    task: str  # quality | domain
    backend: str  # fasttext | bert
    version: str  # vN | latest

    @property
    def name(self) -> str:
        return f"{self.task}-{self.backend}"


def model_root(lake: str) -> str:
    return f"{lake.rstrip('/')}/models"


def versions(lake: str, name: str) -> list[str]:
    """The published versions of ``name``, oldest first (a version without metadata.json is not one)."""
    found = []
    for info in list_dir(f"{model_root(lake)}/{name}"):
        if info.type == pafs.FileType.Directory and re.fullmatch(r"v\d+", info.base_name):
            fs, path = filesystem(f"{model_root(lake)}/{name}/{info.base_name}/metadata.json")
            if fs.get_file_info(path).type == pafs.FileType.File:
                found.append(info.base_name)
    return sorted(found, key=lambda v: int(v[1:]))


def all_metadata(lake: str) -> list[dict]:
    """metadata.json of every version of every artifact in the lake, by name and version."""
    out = []
    for info in list_dir(model_root(lake)):
        if info.type == pafs.FileType.Directory:
            for version in versions(lake, info.base_name):
                out.append(json.loads(read_bytes(f"{model_root(lake)}/{info.base_name}/{version}/metadata.json")))
    return out


@contextmanager
def new_version(lake: str, name: str) -> Iterator[Path]:
    """A local folder to build the next version of ``name`` in; published when the block ends.

    ``write_metadata`` must be called inside the block. On a local lake the folder is the version's
    own; otherwise it is a temporary folder copied to the lake at the end (metadata.json last)."""
    existing = versions(lake, name)
    version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
    target = f"{model_root(lake)}/{name}/{version}"
    if is_local(target):
        folder = Path(filesystem(target)[1])
        folder.mkdir(parents=True, exist_ok=False)
        yield folder
        _require_metadata(folder)
        return
    with tempfile.TemporaryDirectory(prefix=f"tokenmill-{name}-") as tmp:
        folder = Path(tmp) / name / version  # write_metadata reads name and version from the path
        folder.mkdir(parents=True)
        yield folder
        _require_metadata(folder)
        _upload(folder, target)


def _require_metadata(folder: Path) -> None:
    if not (folder / "metadata.json").is_file():
        raise ArtifactError(f"{folder}: a new version was built without metadata.json (call write_metadata)")


def _upload(folder: Path, target: str) -> None:
    fs, base = filesystem(target)
    fs.create_dir(base, recursive=True)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in sorted(files, key=lambda p: p.name == "metadata.json"):  # metadata last: the version appears whole
        with open(path, "rb") as src, fs.open_output_stream(f"{base}/{path.relative_to(folder).as_posix()}") as out:
            shutil.copyfileobj(src, out, 1 << 22)


def write_metadata(folder: Path, **fields) -> dict:
    meta = {"name": folder.parent.name, "version": folder.name, "created_at": datetime.now(timezone.utc).isoformat(),
            **fields}
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


def resolve_version(lake: str, name: str, version: str, make: str, pinned_at: str) -> tuple[str, dict]:
    """The URI and metadata of ``name`` at ``version`` (vN or latest); fails naming ``make``, the
    command that makes one, and ``pinned_at``, the recipe key that chose the version."""
    available = versions(lake, name)
    if not available:
        raise ArtifactError(f"no {name} model in {model_root(lake)}/{name}; make one first: {make}")
    chosen = available[-1] if version == "latest" else version
    if chosen not in available:
        raise ArtifactError(
            f"{name} {chosen} ({pinned_at}) does not exist; available: {', '.join(available)}; or make a new one: {make}"
        )
    uri = f"{model_root(lake)}/{name}/{chosen}"
    return uri, json.loads(read_bytes(f"{uri}/metadata.json"))


def describe(lake: str, ref: ModelRef, recipe_origin: str = "the recipe") -> tuple[str, dict]:
    """A classifier's URI and metadata, checked against the pin, without fetching its files; fails
    naming the command that trains it."""
    train = f"tokenmill models train --recipe {recipe_origin} --task {ref.task} --backend {ref.backend}"
    uri, meta = resolve_version(lake, ref.name, ref.version, train, f"score.{ref.task}.version in {recipe_origin}")
    if meta.get("backend") != ref.backend or meta.get("task") != ref.task:
        raise ArtifactError(
            f"{uri} holds a {meta.get('task')} model of backend {meta.get('backend')}, not {ref.task}/{ref.backend}; "
            f"train the right one: {train}"
        )
    return uri, meta


def resolve(lake: str, ref: ModelRef, recipe_origin: str = "the recipe") -> tuple[Path, dict]:
    """A classifier's local folder (a cached copy on a remote lake) and metadata."""
    uri, meta = describe(lake, ref, recipe_origin)
    return local_folder(uri, meta), meta


def local_folder(uri: str, meta: dict) -> Path:
    """A local folder holding the version at ``uri``: itself on a local lake, else a cached copy."""
    if is_local(uri):
        return Path(filesystem(uri)[1])
    key = hashlib.sha256(f"{uri}\x1f{meta.get('created_at')}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TOKENMILL_ARTIFACT_CACHE", Path.home() / ".cache" / "tokenmill" / "artifacts"))
    folder = cache / f"{meta.get('name', 'artifact')}-{meta.get('version', 'v')}-{key}"
    if (folder / "metadata.json").is_file():
        return folder
    return download(uri, folder)


def download(uri: str, folder: Path) -> Path:
    """Copy the artifact at ``uri`` into ``folder``, atomically (a folder renamed into place)."""
    fs, base = filesystem(uri)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
            if info.type != pafs.FileType.File:
                continue
            dest = staging / info.path[len(base.rstrip("/")) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 22)
        try:
            staging.rename(folder)
        except OSError:  # another process put it in place first: theirs is the same copy
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# -- tokenizers ---------------------------------------------------------------------------------------


def tokenizer_hash(tokenizer_json: bytes) -> str:
    return hashlib.sha256(tokenizer_json).hexdigest()[:16]


def load_tokenizer(recipe):
    """(tokenizers.Tokenizer, metadata) of the recipe's pinned tokenizer (``tokenizer.version``), checked
    against its sha256; fails naming the command that trains one. ``metadata["folder"]`` is a local
    folder holding tokenizer.json, ``metadata["uri"]`` the version in the lake."""
    from tokenizers import Tokenizer

    recipe_origin = recipe.origin
    uri, meta = resolve_version(recipe.lake, TOKENIZER, recipe.tokenizer.version,
                                f"tokenmill tokenizer --recipe {recipe_origin}", f"tokenizer.version in {recipe_origin}")
    folder = local_folder(uri, meta)
    payload = (folder / "tokenizer.json").read_bytes()
    if tokenizer_hash(payload) != meta["sha256"]:
        raise ArtifactError(f"{uri}/tokenizer.json does not match the sha256 in its metadata.json; "
                            f"train a new version: tokenmill tokenizer --recipe {recipe_origin}")
    return Tokenizer.from_str(payload.decode("utf-8")), {**meta, "folder": str(folder), "uri": uri}
