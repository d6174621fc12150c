"""Versioned models under ``<lake>/models/<task>-<backend>/<version>/`` with ``metadata.json``.

The recipe pins a version (``v3``) or asks for ``latest``; a missing or mismatched model fails with
the command that trains one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path


class ModelError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelRef:
    task: str  # quality | domain
    backend: str  # fasttext | bert
    version: str  # vN | latest

    @property
    def name(self) -> str:
        return f"{self.task}-{self.backend}"


def model_root(lake: str) -> Path:
    if "://" in lake:
        raise ModelError(f"models are kept on a local or mounted path; lake {lake} is a URI (mount it, or copy models)")
    return Path(lake) / "models"


def versions(lake: str, name: str) -> list[str]:
    folder = model_root(lake) / name
    found = [p.name for p in folder.glob("v*") if re.fullmatch(r"v\d+", p.name) and (p / "metadata.json").is_file()]
    return sorted(found, key=lambda v: int(v[1:]))


def new_version_dir(lake: str, name: str) -> Path:
    existing = versions(lake, name)
    version = f"v{int(existing[-1][1:]) + 1 if existing else 1}"
    folder = model_root(lake) / name / version
    folder.mkdir(parents=True, exist_ok=False)
    return folder


def write_metadata(folder: Path, **fields) -> dict:
    meta = {"name": folder.parent.name, "version": folder.name, "created_at": datetime.now(timezone.utc).isoformat(), **fields}
    (folder / "metadata.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return meta


def resolve_version(lake: str, name: str, version: str, train: str, pinned_at: str) -> tuple[Path, dict]:
    """The folder and metadata of ``name`` at ``version`` (vN or latest); fails naming ``train``,
    the command that makes one, and ``pinned_at``, the recipe key that chose the version."""
    available = versions(lake, name)
    if not available:
        raise ModelError(f"no {name} model in {model_root(lake) / name}; make one first: {train}")
    chosen = available[-1] if version == "latest" else version
    if chosen not in available:
        raise ModelError(
            f"{name} {chosen} ({pinned_at}) does not exist; available: {', '.join(available)}; or make a new one: {train}"
        )
    folder = model_root(lake) / name / chosen
    return folder, json.loads((folder / "metadata.json").read_text())


def resolve(lake: str, ref: ModelRef, recipe_origin: str = "the recipe") -> tuple[Path, dict]:
    """The model's folder and metadata; fails naming the command that trains it."""
    train = f"tokenmill models train --recipe {recipe_origin} --task {ref.task} --backend {ref.backend}"
    folder, meta = resolve_version(lake, ref.name, ref.version, train, f"score.{ref.task}.version in {recipe_origin}")
    if meta.get("backend") != ref.backend or meta.get("task") != ref.task:
        raise ModelError(
            f"{folder} holds a {meta.get('task')} model of backend {meta.get('backend')}, not {ref.task}/{ref.backend}; "
            f"train the right one: {train}"
        )
    return folder, meta
