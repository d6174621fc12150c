"""Perplexity of documents under a small causal language model (the CCNet filter's measure).

The model is a local Hugging Face folder: one ``tokenmill train --export`` wrote (the trainer's own
Llama judging the data it will see), or any causal LM with its tokenizer. Nothing is fetched: the
folder must hold the weights and the tokenizer. ``perplexity`` is exp of the mean next-token loss
over a document's first ``max_tokens`` tokens; documents of fewer than two tokens have none (NaN).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class PerplexityModel:
    _loaded: dict[tuple[str, int], "PerplexityModel"] = {}

    def __init__(self, folder: str, max_tokens: int = 256, batch_size: int = 1, gpu_batch_size: int = 64,
                 device: str | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from quality_models.bert_backend import encoder_device

        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"score.perplexity.model: {folder} is not a Hugging Face model folder (no "
                                    f"config.json); export one with `tokenmill train --recipe R --export DIR`")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.device = torch.device(device or encoder_device())  # the GPU Spark gave the task, else the CPU
        self.model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval().to(self.device)
        # On a CPU one document per pass is fastest (bench/perplexity.py: padded batches of 4 and 16 run
        # at 0.90 and 0.76 of it, the logits outgrow the caches); a GPU wants batches.
        self.max_tokens = max_tokens
        self.batch_size = gpu_batch_size if self.device.type == "cuda" else batch_size
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @classmethod
    def load(cls, folder: str, max_tokens: int = 256, batch_size: int = 1, gpu_batch_size: int = 64) -> "PerplexityModel":
        key = (folder, max_tokens)
        if key not in cls._loaded:
            cls._loaded[key] = cls(folder, max_tokens, batch_size, gpu_batch_size)
        return cls._loaded[key]

    def perplexity(self, texts: list[str]) -> np.ndarray:
        import torch

        ids = [self.tokenizer(t[: self.max_tokens * 8], add_special_tokens=False)["input_ids"][: self.max_tokens]
               for t in texts]
        out = np.full(len(texts), np.nan)
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))  # little padding inside a batch
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                batch = [i for i in order[start: start + self.batch_size] if len(ids[i]) >= 2]
                if not batch:
                    continue
                width = max(len(ids[i]) for i in batch)
                tokens = torch.full((len(batch), width), self.pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    tokens[row, : len(ids[i])] = torch.tensor(ids[i])
                    mask[row, : len(ids[i])] = 1
                # right padding under causal attention: no real token sees a pad, so no attention mask is
                # needed; the pads only leave the loss
                tokens, mask = tokens.to(self.device), mask.to(self.device)
                logits = self.model(input_ids=tokens).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(  # flat rows: a transposed layout is slow on the CPU
                    logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), reduction="none"
                ).view(len(batch), -1)
                valid = mask[:, 1:].float()
                mean = (loss * valid).sum(1) / valid.sum(1)
                out[batch] = torch.exp(mean).cpu().numpy()
        return out
