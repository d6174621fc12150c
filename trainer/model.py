"""The Llama model, its optimizer groups, per-token losses by category, and export to Hugging Face."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from trainer.parallel import SequenceGroup, heads_to_sequence, sequence_to_heads

IGNORE = -100
ATTENTION = "tokenmill_segments"  # the models' attention (``segment_attention``), registered with transformers


def build_model(cfg, vocab_size: int, rope_theta: float | None = None, rope_scaling: dict | None = None,
                embedding_grad_scale: float = 1.0, weights: bool = True):
    """A LlamaForCausalLM from the recipe's model section (or from ``init_from`` for continued pretraining:
    its architecture, and with ``weights`` its weights; without, for a checkpoint's to be loaded into).
    ``embedding_grad_scale`` < 1 shrinks the gradient that reaches the embedding layer through its output
    (GLM-130B's α·e + (1−α)·stop_gradient(e)); the forward pass is unchanged."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.init_from:
        folder = Path(cfg.init_from)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"trainer.model.init_from {folder}: no Hugging Face model there (config.json)")
        model = (LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32) if weights
                 else LlamaForCausalLM(LlamaConfig.from_pretrained(str(folder))))
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
    _register_attention()
    model.set_attn_implementation(ATTENTION)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if embedding_grad_scale < 1.0:
        a = embedding_grad_scale
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.detach() + a * (out - out.detach()))
    if rope_theta is not None or rope_scaling:
        set_rope(model, rope_theta, rope_scaling)
    return model


def check_base_tokenizer(init_from: str | None, tokenizer, meta: dict, origin: str) -> None:
    """Continued pretraining starts from a model whose ids are the lake tokenizer's: a base folder with
    another tokenizer (``tokenizer.json``) is refused, naming both and the command that adopts it."""
    if not init_from or not (Path(init_from) / "tokenizer.json").is_file():
        return
    from tokenizers import Tokenizer

    base = Tokenizer.from_file(str(Path(init_from) / "tokenizer.json"))
    if base.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"trainer.model.init_from {init_from} was trained with another tokenizer ({base.get_vocab_size()} tokens) "
            f"than the lake's ({meta.get('uri', 'tokenizer')}, {tokenizer.get_vocab_size()} tokens): its ids would mean "
            f"other tokens. Extend the base's tokenizer into the lake (tokenizer.extend in {origin}, then tokenmill "
            f"tokenizer --recipe {origin}) and start from the model that writes (tokenizer.extend.out)")


def set_rope(model, theta: float | None, scaling: dict | None = None) -> None:
    """Change RoPE's base and scaling (long-context stages; ``scaling`` as transformers' rope parameters,
    ``lake.trainer_sections.RopeScaling.parameters``) and rebuild the rotary embedding from the config, which
    ``save_pretrained`` writes: an exported model carries both."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    params = dict(getattr(model.config, "rope_parameters", None) or {})
    theta = theta if theta is not None else params.get("rope_theta", getattr(model.config, "rope_theta", 10_000.0))
    params = {"rope_theta": theta, **scaling} if scaling else {"rope_type": "default", **params, "rope_theta": theta}
    model.config.rope_parameters = params
    model.config.rope_theta = theta
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
    """(category index per position, -1 on padding and on an instruction's prompt; position within the
    document; segment id), each [rows, width]. A target whose category is -1 carries no loss: the prompt
    (a span's first ``prompt_tokens`` document tokens) is read but never learnt, the completion is."""
    cat = np.full((len(spans_rows), width), -1, np.int64)
    pos = np.zeros((len(spans_rows), width), np.int64)
    seg = np.full((len(spans_rows), width), -1, np.int64)
    index = {c: i for i, c in enumerate(categories)}
    for r, spans in enumerate(spans_rows):
        for k, s in enumerate(spans):
            a, n = s["pos"], s["length"]
            cat[r, a : a + n] = index.setdefault(s["category"], len(index))
            masked = min(n, max(0, (s.get("prompt_tokens") or 0) - s["doc_start"]))
            cat[r, a : a + masked] = -1
            pos[r, a : a + n] = np.arange(s["doc_start"], s["doc_start"] + n)
            seg[r, a : a + n] = k
    if len(index) > len(categories):
        categories.extend(c for c in index if c not in categories)
    return cat, pos, seg


Buckets = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def segment_buckets(seg: np.ndarray) -> Buckets:
    """The documents of packed rows, grouped for attention without a mask: ``seg`` [rows, width] is each
    position's segment (-1 on padding). Documents whose lengths share a power of two form a bucket
    ``(gather [n, L], keep [n·L], dest [k])``: ``gather`` holds each document's flat positions
    (rows·width + column), padded to ``L`` by repeating its last one; ``keep`` marks the real slots and
    ``dest`` is where they go back. Padding is no document: its outputs stay zero (no target reads them)."""
    rows, width = seg.shape
    flat, at = seg.reshape(-1), np.arange(seg.size)
    inside = flat >= 0
    starts = np.flatnonzero(inside & ((at % width == 0) | (flat != np.roll(flat, 1))))
    ends = np.flatnonzero(inside & ((at % width == width - 1) | (flat != np.roll(flat, -1)))) + 1
    lengths = ends - starts
    sizes = np.maximum(1, 2 ** np.ceil(np.log2(np.maximum(lengths, 1)))).astype(np.int64)
    out: Buckets = []
    for size in np.unique(sizes):
        pick = sizes == size
        a, n = starts[pick], lengths[pick]
        offsets = np.arange(size)[None, :]
        gather = a[:, None] + np.minimum(offsets, (n - 1)[:, None])
        keep = (offsets < n[:, None]).reshape(-1)
        out.append((gather, keep, gather.reshape(-1)[keep]))
    return out


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, doc_buckets=None,
                      sequence_group: SequenceGroup | None = None, **kwargs):
    """Attention inside each packed document, causal, with no mask: per bucket of ``segment_buckets``,
    the documents' queries, keys and values are gathered to [n, heads, L, dim] and attend with
    ``is_causal`` (SDPA picks its flash kernel: memory linear in the row's length, and no work across
    documents); the outputs go back to their positions. Without ``doc_buckets`` it is transformers' SDPA
    (causal, or the 4D mask it is given). With a ``sequence_group`` (``trainer/parallel.py``) the inputs
    are this rank's piece of each row: an all-to-all gives it the whole row for its share of the heads
    (``doc_buckets`` then index whole rows), and another gives the output back as its piece."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if sequence_group is not None:
        query, key, value = (sequence_to_heads(t, sequence_group) for t in (query, key, value))
        if doc_buckets is None:
            out = torch.nn.functional.scaled_dot_product_attention(
                query, key, value, is_causal=True, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
            return heads_to_sequence(out.transpose(1, 2), sequence_group), None
        out, _ = segment_attention(module, query, key, value, None, scaling, dropout, doc_buckets)
        return heads_to_sequence(out, sequence_group), None
    if doc_buckets is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    b, heads, s, d = query.shape
    kv_heads = key.shape[1]
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    outputs, where = [], []
    for gather, keep, dest in doc_buckets:
        n, size = gather.shape
        qs, ks, vs = (t[gather].transpose(1, 2) for t in (q, k, v))  # [n, heads, L, dim]
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling,
                                                             enable_gqa=kv_heads != heads)
        outputs.append(o.transpose(1, 2).reshape(n * size, heads, d)[keep])
        where.append(dest)
    out = q.new_zeros(b * s, heads, d).index_copy(0, torch.cat(where), torch.cat(outputs))
    return out.reshape(b, s, heads, d), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, segment_attention)


def dense_document_mask(seg: torch.Tensor) -> torch.Tensor:
    """The document mask as one float tensor [rows, 1, seq, seq] (0 where allowed, the dtype's minimum
    elsewhere; padding attends to itself): O(seq²) memory per row, and SDPA's slow path. The reference
    ``segment_attention`` is checked against (tests, bench/trainer)."""
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    causal = torch.tril(torch.ones(seg.shape[1], seg.shape[1], dtype=torch.bool, device=seg.device))
    allowed = (same & causal) | torch.eye(seg.shape[1], dtype=torch.bool, device=seg.device)
    return torch.zeros(allowed.shape, dtype=torch.float32, device=seg.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)[:, None, :, :]


def token_losses(model, ids: torch.Tensor, cat, pos, seg, doc_mask: bool, buckets: Buckets | None = None,
                 dense: bool = False, z: list | None = None, sp: SequenceGroup | None = None, loss_chunk: int = 0):
    """Per-token cross-entropy [rows, width-1] (0 where ignored) and the category of each target (-1 = ignored).
    ``cat``, ``pos``, ``seg`` (``row_layout``'s) are arrays or tensors; all is computed on ``ids``'s device.
    With ``doc_mask`` each document attends only to itself: through ``segment_attention`` (``buckets``
    from ``segment_buckets`` of the inputs' segments, made here when not given), or with ``dense`` through
    today's dense mask (``dense_document_mask``). A list ``z`` receives each position's
    (log Σ exp logits)² [rows, width-1], the z-loss's terms (on the graph, for the backward pass).
    With ``sp`` (sequence parallelism) this rank computes its piece of the positions (``SequenceGroup.piece``
    of the width-1 targets), and both results are that piece's. ``loss_chunk`` > 0: the output layer
    and the loss a piece of that many positions at a time (``_chunked_head_losses``), same values."""
    device = ids.device
    here = sp.piece(ids.shape[1] - 1) if sp is not None else slice(None)
    inputs, targets = ids[:, :-1][:, here], ids[:, 1:][:, here]
    target_cat = torch.as_tensor(cat, device=device)[:, 1:][:, here]
    labels = torch.where(target_cat >= 0, targets, torch.full_like(targets, IGNORE))
    kwargs = {} if sp is None else {"sequence_group": sp}
    if doc_mask:
        kwargs["position_ids"] = torch.as_tensor(pos, device=device)[:, :-1][:, here]
        if dense:
            if sp is not None:
                raise ValueError("the dense document mask is the single-process reference: no sequence parallelism")
            kwargs["attention_mask"] = dense_document_mask(torch.as_tensor(seg, device=device)[:, :-1])
        else:
            if buckets is None:
                buckets = segment_buckets(np.asarray(torch.as_tensor(seg).cpu())[:, :-1])
            kwargs["doc_buckets"] = [tuple(torch.as_tensor(a, device=device) for a in bucket) for bucket in buckets]
    elif sp is not None:  # positions count along the whole row, not the piece
        kwargs["position_ids"] = torch.arange(here.start, here.stop, device=device)[None, :].expand(len(ids), -1)
    if not loss_chunk:
        loss, lse = _head_losses(model(input_ids=inputs, **kwargs).logits, labels, z is not None)
    else:
        loss, lse = _chunked_head_losses(model, inputs, labels, kwargs, loss_chunk, z is not None)
    if z is not None:
        z.append(lse ** 2)
    return loss, target_cat


def _head_losses(logits: torch.Tensor, labels: torch.Tensor, lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cross-entropy, with ``lse`` log Σ exp logits) per position, in float32."""
    logits = logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE, reduction="none").reshape(labels.shape)
    return loss, torch.logsumexp(logits, dim=-1) if lse else None


def _chunked_head_losses(model, inputs, labels, kwargs, chunk: int, lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``_head_losses`` a piece of ``chunk`` positions at a time, each piece's logits recomputed in the
    backward pass (activation checkpointing of the output layer): the logits of one piece live at a time,
    not [rows, width, vocabulary]."""
    from torch.utils.checkpoint import checkpoint

    llama = getattr(model, "module", model)  # the DeepSpeed engine's model, or the model
    hidden = llama.model(input_ids=inputs, **kwargs).last_hidden_state
    rows, width, size = hidden.shape
    flat_hidden, flat_labels = hidden.reshape(-1, size), labels.reshape(-1)
    pieces = [checkpoint(lambda h, y: _head_losses(llama.lm_head(h), y, lse), flat_hidden[a : a + chunk],
                         flat_labels[a : a + chunk], use_reentrant=False) for a in range(0, len(flat_labels), chunk)]
    loss = torch.cat([p[0] for p in pieces]).reshape(rows, width)
    return loss, torch.cat([p[1] for p in pieces]).reshape(rows, width) if lse else None


def model_from_state(state_dict: dict, model_cfg, vocab_size: int, rope_theta: float | None = None,
                     rope_scaling: dict | None = None):
    """The recipe's model (``model_cfg``; a continued run's is its base's architecture) with a checkpoint's
    weights (an engine's ``module.`` prefix or none)."""
    model = build_model(model_cfg, vocab_size, rope_theta, rope_scaling, weights=False)
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(model.config.tie_word_embeddings)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model


def export_hf(state_dict: dict, model_cfg, vocab_size: int, rope_theta: float, tokenizer_file: str, meta: dict,
              out: str, rope_scaling: dict | None = None) -> str:
    """A Hugging Face folder (LlamaForCausalLM + fast tokenizer) from a model state dict; its config
    carries the RoPE base and scaling the weights were trained with."""
    from transformers import PreTrainedTokenizerFast

    model = model_from_state(state_dict, model_cfg, vocab_size, rope_theta, rope_scaling)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.config.eos_token_id = meta["eos_id"]
    model.config.pad_token_id = meta["pad_id"]
    model.save_pretrained(out)
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token="<|endoftext|>", pad_token="<|pad|>")
    tok.save_pretrained(out)
    return out
