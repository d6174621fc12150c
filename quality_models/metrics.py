"""Classification metrics: per-class precision / recall / F1, macro-F1 and the confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassificationReport:
    labels: list[str]
    per_class: dict[str, dict[str, float]]  # label → precision, recall, f1, support
    macro_f1: float
    accuracy: float
    confusion: list[list[int]]  # rows: true label, columns: predicted label, in ``labels`` order

    def as_dict(self) -> dict:
        return {"labels": self.labels, "per_class": self.per_class, "macro_f1": self.macro_f1,
                "accuracy": self.accuracy, "confusion": self.confusion}

    def __str__(self) -> str:
        width = max(8, *(len(lab) for lab in self.labels))
        out = [f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}"]
        for lab in self.labels:
            c = self.per_class[lab]
            out.append(f"{lab:<{width}} {c['precision']:9.3f} {c['recall']:7.3f} {c['f1']:6.3f} {int(c['support']):8d}")
        out.append(f"macro-F1 {self.macro_f1:.3f}   accuracy {self.accuracy:.3f}")
        out.append("confusion matrix (rows: true, columns: predicted)")
        out.append(" " * (width + 1) + " ".join(f"{lab[:7]:>7}" for lab in self.labels))
        for lab, row in zip(self.labels, self.confusion):
            out.append(f"{lab:<{width}} " + " ".join(f"{n:7d}" for n in row))
        return "\n".join(out)


def classification_report(y_true: list[str], y_pred: list[str], labels: list[str] | None = None) -> ClassificationReport:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    labels = labels or sorted(set(y_true) | set(y_pred))
    index = {lab: i for i, lab in enumerate(labels)}
    confusion = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        confusion[index[t]][index[p]] += 1
    per_class = {}
    for i, lab in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        actual = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": float(actual)}
    present = [lab for lab in labels if per_class[lab]["support"] > 0]
    macro = sum(per_class[lab]["f1"] for lab in present) / len(present) if present else 0.0
    accuracy = sum(confusion[i][i] for i in range(len(labels))) / len(y_true) if y_true else 0.0
    return ClassificationReport(labels, per_class, macro, accuracy, confusion)


def split_holdout(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / held-out index split."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    cut = max(1, int(round(n * holdout))) if n > 1 else 0
    return sorted(order[cut:]), sorted(order[:cut])
