"""The Llama model, its optimizer groups, per-token losses by category, and export to Hugging Face."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IGNORE = -100


def build_model(cfg, vocab_size: int, rope_theta: float | None = None):
    """A LlamaForCausalLM from the recipe's model section (or from ``init_from`` for continued pretraining)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.init_from:
        folder = Path(cfg.init_from)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"trainer.model.init_from {folder}: no Hugging Face model there (config.json)")
        model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
        if model.get_input_embeddings().weight.shape[0] < vocab_size:
            model.resize_token_embeddings(vocab_size)
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.ffn_size,
            num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=cfg.max_positions, rope_theta=cfg.rope_theta, rms_norm_eps=1e-5,
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False,
        )
        model = LlamaForCausalLM(config)
    if rope_theta is not None:
        set_rope_theta(model, rope_theta)
    return model


def set_rope_theta(model, theta: float) -> None:
    """Change RoPE's base (long-context stages) and rebuild the rotary embedding from the config."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if getattr(model.config, "rope_theta", None) == theta and not getattr(model.config, "rope_parameters", None):
        return
    model.config.rope_theta = theta
    params = getattr(model.config, "rope_parameters", None)
    if isinstance(params, dict):
        params["rope_theta"] = theta
    model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on norms, biases (and 1-d tensors in general)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if p.ndim < 2 or "norm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def parameter_count(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def row_layout(spans_rows: list[list[dict]], width: int, categories: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(category index per position, -1 on padding; position within the document; segment id), each [rows, width]."""
    cat = np.full((len(spans_rows), width), -1, np.int64)
    pos = np.zeros((len(spans_rows), width), np.int64)
    seg = np.full((len(spans_rows), width), -1, np.int64)
    index = {c: i for i, c in enumerate(categories)}
    for r, spans in enumerate(spans_rows):
        for k, s in enumerate(spans):
            a, n = s["pos"], s["length"]
            cat[r, a : a + n] = index.setdefault(s["category"], len(index))
            pos[r, a : a + n] = np.arange(s["doc_start"], s["doc_start"] + n)
            seg[r, a : a + n] = k
    if len(index) > len(categories):
        categories.extend(c for c in index if c not in categories)
    return cat, pos, seg


def token_losses(model, ids: torch.Tensor, cat, pos, seg, doc_mask: bool):
    """Per-token cross-entropy [rows, width-1] (0 where ignored) and the category of each target (-1 = ignored).
    ``cat``, ``pos``, ``seg`` (``row_layout``'s) are arrays or tensors; all is computed on ``ids``'s device."""
    device = ids.device
    inputs, targets = ids[:, :-1], ids[:, 1:]
    target_cat = torch.as_tensor(cat, device=device)[:, 1:]
    labels = torch.where(target_cat >= 0, targets, torch.full_like(targets, IGNORE))
    kwargs = {}
    if doc_mask:
        s = torch.as_tensor(seg, device=device)[:, :-1]
        same = (s[:, :, None] == s[:, None, :]) & (s[:, :, None] >= 0)
        causal = torch.tril(torch.ones(s.shape[1], s.shape[1], dtype=torch.bool, device=device))
        allowed = same & causal
        allowed |= torch.eye(s.shape[1], dtype=torch.bool, device=device)  # padding attends to itself: no empty rows
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)
        kwargs = {"attention_mask": mask[:, None, :, :], "position_ids": torch.as_tensor(pos, device=device)[:, :-1]}
    logits = model(input_ids=inputs, **kwargs).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="none").reshape(labels.shape)
    return loss, target_cat


def export_hf(state_dict: dict, model_cfg, vocab_size: int, rope_theta: float, tokenizer_file: str, meta: dict,
              out: str) -> str:
    """A Hugging Face folder (LlamaForCausalLM + fast tokenizer) from a model state dict."""
    from transformers import PreTrainedTokenizerFast

    model = build_model(model_cfg.model_copy(update={"init_from": None}), vocab_size, rope_theta)
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (model_cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model_cfg.tie_embeddings:
        model.tie_weights()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.config.eos_token_id = meta["eos_id"]
    model.config.pad_token_id = meta["pad_id"]
    model.save_pretrained(out)
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.save_pretrained(out)
    return out
