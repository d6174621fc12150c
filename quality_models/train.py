"""Training, evaluation and loading of the quality and domain classifiers.

    tokenmill models label --recipe R                             # weak labels from the lake
    tokenmill models train --recipe R --task domain --backend fasttext [--data labels.jsonl]

Labelled data is JSONL with ``text`` and ``label``. Training holds out a split, prints per-class
precision / recall / F1, macro-F1 and the confusion matrix on it, and saves the model versioned
with that evaluation in its metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quality_models.bert_backend import BertClassifier, Encoder, LinearHead, default_backbone
from quality_models.fasttext_backend import FastTextClassifier, tokenize
from quality_models.labels import weak_domain, weak_quality
from quality_models.metrics import ClassificationReport, classification_report, split_holdout
from lake import fs
from lake.artifacts import ModelError, ModelRef, describe, model_root, new_version, resolve, write_metadata


@dataclass
class TrainResult:
    folder: str  # the version's URI in the lake
    report: ClassificationReport
    n_train: int
    n_holdout: int


def labels_uri(lake: str, task: str) -> str:
    """Where ``tokenmill models label`` keeps a task's weak labels: ``<lake>/labels/<task>.jsonl``, in the
    lake itself (a folder or an object store)."""
    return f"{lake.rstrip('/')}/labels/{task}.jsonl"


def derive_weak_labels(recipe) -> dict[str, tuple[str, dict[str, int]]]:
    """Write ``<lake>/labels/domain.jsonl`` and ``quality.jsonl`` from the lake; returns counts per label."""
    import pyarrow.compute as pc

    from lake.tables import Lake

    lake = Lake(recipe.lake)
    cfg = recipe.score.weak_labels
    clean = lake.read_arrow("documents_clean", columns=["source", "url", "text"]).to_pylist()
    rejected = lake.read_arrow("documents_rejected", columns=["source", "text"],
                               filter=pc.field("stage") == "filter").to_pylist()
    domain_rows = [
        {"text": d["text"], "label": lab}
        for d in clean
        if (lab := weak_domain(d["source"], d["url"], d["text"], cfg.source_domains)) is not None
    ]
    quality_rows = [{"text": d["text"], "label": "low"} for d in rejected if d["text"] and d["text"].strip()] + [
        {"text": d["text"], "label": lab}
        for d in clean
        if (lab := weak_quality(d["source"], False, set(cfg.curated_sources), set(cfg.low_quality_sources))) is not None
    ]
    out = {}
    for task, rows in (("domain", domain_rows), ("quality", quality_rows)):
        path = labels_uri(recipe.lake, task)
        fs.make_dirs(path.rsplit("/", 1)[0])
        fs.write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        out[task] = (path, counts)
    return out


def load_labelled(path: str | Path) -> tuple[list[str], list[str], bytes]:
    """(texts, labels, the file's bytes) of a labelled JSONL file, a local path or a lake URI."""
    if not fs.exists(str(path)):
        raise ModelError(f"labelled data {path} does not exist: run `tokenmill models label` or pass --data")
    payload = fs.read_bytes(str(path))
    texts, labels = [], []
    for n, line in enumerate(payload.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("text"), str) or "label" not in row:
            raise ModelError(f"{path}:{n}: each line needs a string 'text' and a 'label'")
        texts.append(row["text"])
        labels.append(str(row["label"]))
    if len(set(labels)) < 2:
        raise ModelError(f"{path}: needs at least two labels to train a classifier, found {sorted(set(labels))}")
    return texts, labels, payload


def balance_classes(texts: list[str], labels: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Repeat examples of smaller classes until each has as many as the largest (training split only)."""
    import random

    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        by_label.setdefault(lab, []).append(i)
    target = max(len(v) for v in by_label.values())
    rnd = random.Random(seed)
    picked = []
    for lab in sorted(by_label):
        idx = by_label[lab]
        picked.extend(idx * (target // len(idx)) + rnd.sample(idx, target % len(idx)))
    rnd.shuffle(picked)
    return [texts[i] for i in picked], [labels[i] for i in picked]


def train_model(recipe, task: str, backend: str, data: Path | None = None, seed: int = 0,
                positive: str | None = None) -> TrainResult:
    """Train, evaluate on a held-out split and publish a new version. A quality model needs to know which
    label is good text (``positive``; "high", or numeric labels, need no telling)."""
    cfg = recipe.score
    path = str(data or labels_uri(recipe.lake, task))
    texts, labels, payload = load_labelled(path)
    good = positive_label(sorted(set(labels)), positive, path) if task == "quality" else None
    train_idx, hold_idx = split_holdout(len(texts), cfg.holdout, seed)
    train_t, train_y = [texts[i] for i in train_idx], [labels[i] for i in train_idx]
    hold_t, hold_y = [texts[i] for i in hold_idx], [labels[i] for i in hold_idx]
    train_t, train_y = balance_classes(train_t, train_y, seed)
    backbone = None
    if backend == "fasttext":
        model = FastTextClassifier.train(train_t, train_y, seed=seed)
        predict = model.predict_proba
    elif backend == "bert":
        backbone = cfg.backbone or default_backbone()
        encoder = Encoder(backbone, cfg.max_tokens)
        model = LinearHead.train(encoder.embed(train_t, cfg.batch_size), train_y)
        predict = lambda ts: model.predict_proba(encoder.embed(ts, cfg.batch_size))  # noqa: E731
    else:
        raise ModelError(f"unknown backend {backend!r}: fasttext or bert")
    probs = predict(hold_t)
    report = classification_report(hold_y, [model.labels[i] for i in probs.argmax(axis=1)], model.labels)
    name = ModelRef(task, backend, "latest").name
    with new_version(recipe.lake, name) as folder:
        model.save(folder)
        write_metadata(
            folder, task=task, backend=backend, backbone=backbone, labels=model.labels, positive=good,
            max_tokens=cfg.max_tokens if backend == "bert" else None,
            training_data=path, training_data_sha256=hashlib.sha256(payload).hexdigest(),
            n_train=len(train_idx), n_holdout=len(hold_t), metrics=report.as_dict(),
        )
    return TrainResult(f"{model_root(recipe.lake)}/{name}/{folder.name}", report, len(train_idx), len(hold_t))


def pinned_models(recipe) -> dict[str, ModelRef]:
    """The models the recipe's scoring uses: quality, domain and, with a cascade, BERT quality."""
    cfg = recipe.score
    pins = {
        "quality": ModelRef("quality", cfg.quality.backend, cfg.quality.version),
        "domain": ModelRef("domain", cfg.domain.backend, cfg.domain.version),
    }
    if cfg.cascade:
        pins["cascade"] = ModelRef("quality", "bert", cfg.cascade.version)
    return pins


def check_pinned(recipe) -> dict[str, str]:
    """Resolve every pinned model without loading it: fails naming the command that trains it."""
    return {role: f"{ref.name}/{describe(recipe.lake, ref, recipe.origin)[1]['version']}"
            for role, ref in pinned_models(recipe).items()}


class LoadedModels:
    """The models a recipe's scoring needs, loaded once; BERT heads share one encoder."""

    def __init__(self, recipe):
        self._encoder: Encoder | None = None
        self.batch_size = recipe.score.batch_size
        loaded = {role: self._load(recipe, ref) for role, ref in pinned_models(recipe).items()}
        self.quality, self.domain = loaded["quality"], loaded["domain"]
        self.cascade = loaded.get("cascade")
        self.versions = {role: model.version for role, model in loaded.items()}

    def _load(self, recipe, ref: ModelRef):
        folder, meta = resolve(recipe.lake, ref, recipe.origin)
        if ref.backend == "fasttext":
            model = FastTextClassifier.load(folder, meta["labels"])
        else:
            cfg = recipe.score
            backbone = meta["backbone"]
            if self._encoder is None:
                self._encoder = Encoder(backbone, meta.get("max_tokens") or cfg.max_tokens, quantize=cfg.quantize,
                                        gpu_batch_size=cfg.gpu_batch_size)
            elif self._encoder.backbone != backbone:
                raise ModelError(f"{folder}: BERT models must share one backbone ({self._encoder.backbone} vs {backbone})")
            model = BertClassifier(self._encoder, LinearHead.load(folder, meta["labels"]), cfg.batch_size)
        model.version = f"{ref.name}/{meta['version']}"
        if ref.task == "quality":
            model.positive = positive_label(meta["labels"], meta.get("positive"), str(folder))
        return model

    @property
    def encoder(self) -> Encoder | None:
        return self._encoder


def score_batch(models: LoadedModels, texts, low: float = 0.3, high: float = 0.7
                ) -> tuple[np.ndarray, list[str], int]:
    """(quality per document, domain per document, how many documents the cascade sent to BERT).

    ``texts`` is a list or an Arrow string array. fastText models share one tokenisation of the
    batch; BERT heads read one embedding per document, computed once for every head that needs it.
    """
    n = len(texts)
    as_list = None

    def text_list() -> list[str]:
        nonlocal as_list
        if as_list is None:
            as_list = texts if isinstance(texts, list) else texts.to_pylist()
        return as_list

    needs_all = any(m.backend == "bert" for m in (models.quality, models.domain))
    embedded = models.encoder.embed(text_list(), models.batch_size) if needs_all else None
    uses_fasttext = any(m.backend == "fasttext" for m in (models.quality, models.domain))
    tokens = tokenize(texts) if uses_fasttext else None  # once for every fastText model

    def proba(model, idx: np.ndarray | None = None) -> np.ndarray:
        if model.backend == "fasttext":  # fastText scores whole batches; the cascade's subset is BERT's
            return model.predict_proba(texts, tokens)
        if embedded is not None:
            return model.head.predict_proba(embedded if idx is None else embedded[idx])
        chosen = text_list() if idx is None else [text_list()[i] for i in idx]
        return model.head.predict_proba(models.encoder.embed(chosen, models.batch_size))

    quality = quality_value(models.quality, proba(models.quality)).astype(np.float64)
    sent = 0
    if models.cascade is not None:
        band = np.nonzero((quality >= low) & (quality <= high))[0]
        sent = len(band)
        if sent:
            quality[band] = quality_value(models.cascade, proba(models.cascade, band))
    domain_probs = proba(models.domain)
    domains = [models.domain.labels[i] for i in domain_probs.argmax(axis=1)] if n else []
    return quality, domains, sent


def positive_label(labels: list[str], given: str | None, where: str) -> str | None:
    """The label that stands for good text in a quality model; None when the labels are numbers
    (the score is then their expected value). Never guessed from the alphabet: ``clean``/``spam``
    would come out inverted."""
    if given is not None:
        if given not in labels:
            raise ModelError(f"{where}: the positive label {given!r} is not one of the labels {labels}")
        return given
    try:
        [float(lab) for lab in labels]
        return None
    except ValueError:
        pass
    if "high" in labels:
        return "high"
    raise ModelError(f"{where}: quality labels {labels}: which one is good text? Pass --positive LABEL to "
                     f"`tokenmill models train --task quality`, or name the good label 'high'")


def quality_value(model, probs: np.ndarray) -> np.ndarray:
    """One number per document: P(the positive label), or the expected score for numeric labels."""
    positive = getattr(model, "positive", None)
    if positive is None:
        return probs @ np.array([float(lab) for lab in model.labels])
    # fastText's probabilities can exceed 1 by a rounding error.
    return np.clip(probs[:, model.labels.index(positive)], 0.0, 1.0)