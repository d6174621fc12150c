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


def resolve(lake: str, ref: ModelRef, recipe_origin: str = "the recipe") -> tuple[Path, dict]:
    """The model's folder and metadata; fails naming the command that trains it."""
    train = f"tokenmill models train --recipe {recipe_origin} --task {ref.task} --backend {ref.backend}"
    available = versions(lake, ref.name)
    if not available:
        raise ModelError(f"no {ref.name} model in {model_root(lake) / ref.name}; train one first: {train}")
    version = available[-1] if ref.version == "latest" else ref.version
    if version not in available:
        raise ModelError(
            f"model {ref.name} {version} (score.{ref.task}.version in {recipe_origin}) does not exist; "
            f"available: {', '.join(available)}; or train a new one: {train}"
        )
    folder = model_root(lake) / ref.name / version
    meta = json.loads((folder / "metadata.json").read_text())
    if meta.get("backend") != ref.backend or meta.get("task") != ref.task:
        raise ModelError(
            f"{folder} holds a {meta.get('task')} model of backend {meta.get('backend')}, not {ref.task}/{ref.backend}; "
            f"train the right one: {train}"
        )
    return folder, meta
