"""Vocabulary extension: new tokens appended to an existing tokenizer, checked on held-out text, and
the model's embeddings grown to match.

    tokenmill tokenizer --recipe R --extend-from FOLDER (--add-tokens FILE | --learn N) [--category C] [--out DIR]

Old ids never change: new tokens take the ids after the old vocabulary. ``--add-tokens`` adds whole
strings, matched in the text before BPE (as the recipe's domain tokens are), which can split an old
token: add "中华人民" and "中华人民共和国" is never produced again. ``--learn`` appends the BPE merges
that save the most tokens on the domain documents, ranked after every old merge.

Every extension is checked (``check_extension``) on held-out documents per category: a text passes
when its new encoding, with each new token replaced by the old encoding of that token, is exactly its
old encoding. One failing text refuses the whole extension, naming the new token and the old tokens
it made unreachable. The model folder's embedding (and untied output head) grows so that the reserve
of spare ids above the vocabulary stays whole; new rows are the mean of the old vocabulary's rows.
The Spark side (sampling the lake, publishing the version) is ``jobs/train_tokenizer.extend``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lake.errors import ArtifactError


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte → character table, which byte-level BPE writes its tokens in (a space is 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


BYTE_CHARS = _byte_chars()
CHAR_BYTES = {c: b for b, c in BYTE_CHARS.items()}


def byte_level(text: str) -> str:
    return "".join(BYTE_CHARS[b] for b in text.encode("utf-8"))


def readable(token: str) -> str:
    """A token as text: its bytes decoded (a piece of a character shows as �); added tokens are text already."""
    if all(c in CHAR_BYTES for c in token):
        return bytes(CHAR_BYTES[c] for c in token).decode("utf-8", errors="replace")
    return token


def shown(token: str) -> str:
    """A token quoted for a message; one holding part of a character also shows its bytes."""
    text = readable(token)
    if "\ufffd" in text and all(c in CHAR_BYTES for c in token):
        return f"{text!r} (bytes {bytes(CHAR_BYTES[c] for c in token).hex(' ')})"
    return repr(text)


# -- inputs ------------------------------------------------------------------------------------------------


def load_base(folder: str):
    """(tokenizers.Tokenizer, config.json as a dict) of a Hugging Face model folder."""
    from tokenizers import Tokenizer

    path = Path(folder)
    if not path.is_dir():
        raise ArtifactError(f"--extend-from {path}: no such folder; give a model folder written by "
                            "tokenmill train --export FOLDER")
    for name in ("tokenizer.json", "config.json"):
        if not (path / name).is_file():
            raise ArtifactError(f"--extend-from {path}: no {name} there; export the model with its tokenizer first: "
                                "tokenmill train --recipe R --export FOLDER")
    return Tokenizer.from_file(str(path / "tokenizer.json")), json.loads((path / "config.json").read_text())


def read_token_file(path: str) -> list[str]:
    """One token per line, taken literally (a leading space is part of the token); blank lines and lines
    starting with '#' are skipped; repeats are dropped."""
    file = Path(path)
    if not file.is_file():
        raise ArtifactError(f"--add-tokens {file}: no such file; write one token per line")
    words = [line.rstrip("\r\n") for line in file.read_text(encoding="utf-8").splitlines()]
    words = [w for w in words if w.strip() and not w.startswith("#")]
    if not words:
        raise ArtifactError(f"--add-tokens {file}: no token in it (one per line; '#' starts a comment)")
    return list(dict.fromkeys(words))


def vocab_size(tok) -> int:
    """One more than the highest id, added tokens included."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


# -- extending ------------------------------------------------------------------------------------------------


def add_tokens(tok, words: list[str], origin: str = "--add-tokens"):
    """(the tokenizer with ``words`` as added tokens, {new id: word}); a word that is already one token fails."""
    from tokenizers import AddedToken, Tokenizer

    vocab = tok.get_vocab(with_added_tokens=True)
    for w in words:
        single = tok.encode(w, add_special_tokens=False).ids
        known = vocab.get(w, vocab.get(byte_level(w), single[0] if len(single) == 1 else None))
        if known is not None:
            raise ArtifactError(f"{origin}: {w!r} is already in the vocabulary (id {known}); remove it from the file")
    new = Tokenizer.from_str(tok.to_str())
    new.add_tokens([AddedToken(w, single_word=False, normalized=False) for w in words])
    ids = {new.token_to_id(w): w for w in words}
    _same_old_ids(tok, new, origin)
    if sorted(ids) != list(range(vocab_size(tok), vocab_size(tok) + len(words))):
        raise ArtifactError(f"{origin}: the new tokens did not get the ids after the old vocabulary ({sorted(ids)})")
    return new, ids


def word_pieces(tok, texts: list[str]) -> Counter:
    """How often each pre-tokenized word occurs in ``texts``, as the tuple of its BPE tokens; words that
    hold an added token (special or domain tokens, matched before BPE) are left out."""
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    words: Counter = Counter()
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        current, last, spoiled = [], None, False
        for token, word in zip(enc.tokens, enc.word_ids):
            if word != last and current:
                if not spoiled:
                    words[tuple(current)] += 1
                current, spoiled = [], False
            last = word
            current.append(token)
            spoiled = spoiled or word is None or token in added
        if current and not spoiled:
            words[tuple(current)] += 1
    return words


def _merge_word(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges(tok, texts: list[str], n: int, min_count: int = 2) -> list[tuple[str, str, int]]:
    """The ``n`` merges that save the most tokens on ``texts``, learnt greedily after the tokenizer's own
    (BPE continued on the domain data): each step takes the adjacent pair seen most often (ties in
    token order) whose joined token is not in the vocabulary yet. Returns (left, right, tokens saved
    at that step); fewer than ``n`` when no pair occurs ``min_count`` times."""
    vocab = set(tok.get_vocab(with_added_tokens=True))
    words = word_pieces(tok, texts)
    learned: list[tuple[str, str, int]] = []
    while len(learned) < n:
        pairs: Counter = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                if a + b not in vocab:
                    pairs[a, b] += count
        if not pairs:
            break
        (a, b), count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < min_count:
            break
        before = sum(len(w) * c for w, c in words.items())
        merged: Counter = Counter()
        for word, c in words.items():
            merged[_merge_word(word, a, b)] += c
        words = merged
        learned.append((a, b, before - sum(len(w) * c for w, c in words.items())))
        vocab.add(a + b)
    return learned


def add_merges(tok, merges: list[tuple[str, str]]):
    """(the tokenizer with ``merges`` ranked after all of its own, {new id: token}); each merge's token
    takes the next id after the vocabulary (added tokens included)."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    model = spec["model"]
    # an added token takes the model's id for its text when it has one, else the next free id at load
    # time: with the BPE vocabulary growing, the added tokens (reserved, domain) would move, so each
    # keeps its id in the BPE vocabulary too (BPE never produces it: no merge leads to it)
    for added in spec.get("added_tokens", []):
        model["vocab"].setdefault(added["content"], added["id"])
    next_id = vocab_size(tok)
    ids = {}
    for a, b in merges:
        for part in (a, b):
            if part not in model["vocab"]:
                raise ArtifactError(f"merge {a!r} + {b!r}: {part!r} is not a token of the BPE vocabulary")
        if a + b in model["vocab"]:
            raise ArtifactError(f"merge {a!r} + {b!r}: {a + b!r} is already in the vocabulary")
        model["vocab"][a + b] = next_id
        model["merges"].append([a, b] if isinstance(model["merges"][0], list) else f"{a} {b}")
        ids[next_id] = a + b
        next_id += 1
    new = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    _same_old_ids(tok, new, "the learned merges")
    return new, ids


def _same_old_ids(old, new, what: str) -> None:
    moved = [t for t, i in old.get_vocab(with_added_tokens=True).items() if new.token_to_id(t) != i]
    if moved:
        raise ArtifactError(f"{what} would move the ids of old tokens ({', '.join(map(repr, moved[:5]))}); "
                            "old ids must never change")


def expansions(old, new_tokens: dict[int, str], added: set[int]) -> dict[int, list[int]]:
    """Each new id → the old ids of its token: the old tokenizer's encoding of an added token's text,
    or the old BPE's split of a merged token's bytes."""
    out = {}
    for i, token in new_tokens.items():
        if i in added:
            out[i] = old.encode(token, add_special_tokens=False).ids
        else:
            out[i] = [t.id for t in old.model.tokenize(token)]
    return out


# -- the check ------------------------------------------------------------------------------------------------


@dataclass
class Harm:
    """A new token that changed a text beyond its own place: the old tokens no longer produced there."""

    token: str
    token_id: int
    lost: list[str]  # the old tokens (as text) most often in the old encodings and not in the new ones, expanded
    texts: int = 0
    category: str = ""
    example: str = ""


@dataclass
class ExtensionCheck:
    texts: int = 0
    changed: int = 0
    per_token: dict[int, dict[str, int]] = field(default_factory=dict)  # id → texts, uses, tokens_saved
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    harms: list[Harm] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.harms


def _blame(new_ids: list[int], old_ids: list[int], expand: dict[int, list[int]]) -> int | None:
    """The new token whose place holds the first difference between the old and the expanded new encoding."""
    flat_at, flat = [], []
    for i in new_ids:
        flat_at.append(len(flat))
        flat.extend(expand.get(i, [i]))
    first = next((k for k, (x, y) in enumerate(zip(flat, old_ids)) if x != y), min(len(flat), len(old_ids)))
    nearest = [(abs(at - first), i) for at, i in zip(flat_at, new_ids) if i in expand]
    return min(nearest)[1] if nearest else None


def _excerpt(text: str, offsets: tuple[int, int], width: int = 30) -> str:
    a, b = offsets
    return ("…" if a > width else "") + text[max(0, a - width):b + width].replace("\n", "⏎") + ("…" if b + width < len(text) else "")


def check_extension(old, new, new_tokens: dict[int, str], texts_by_category: dict[str, list[str]],
                    added: set[int] = frozenset()) -> ExtensionCheck:
    """Encode every text with the old and the new tokenizer. A text passes when the encodings are equal,
    or when replacing each new token of the new encoding by its old ids (``expansions``) gives the old
    encoding back; otherwise the new token nearest to the first difference is blamed, with the old
    tokens that went missing. Also counts, per new token, the texts and uses and the tokens it saves,
    and per category the tokens and bytes per token before and after."""
    expand = expansions(old, new_tokens, set(added))
    result = ExtensionCheck(per_token={i: {"texts": 0, "uses": 0, "tokens_saved": 0} for i in new_tokens})
    harms: dict[int, Harm] = {}
    lost: dict[int, Counter] = {}
    for category, texts in texts_by_category.items():
        if not texts:
            continue
        before_total = after_total = 0
        olds = old.encode_batch(texts, add_special_tokens=False)
        news = new.encode_batch(texts, add_special_tokens=False)
        for text, o, n in zip(texts, olds, news):
            before_total += len(o.ids)
            after_total += len(n.ids)
            result.texts += 1
            if o.ids == n.ids:
                continue
            result.changed += 1
            expanded = [j for i in n.ids for j in expand.get(i, [i])]
            if expanded != o.ids:
                culprit = _blame(n.ids, o.ids, expand)
                key = -1 if culprit is None else culprit
                harm = harms.setdefault(key, Harm(
                    readable(new_tokens[culprit]) if culprit is not None else "(none of the new tokens)", key, [],
                    0, category, _excerpt(text, n.offsets[n.ids.index(culprit)] if culprit is not None else (0, 0))))
                harm.texts += 1
                lost[key] = lost.get(key, Counter()) + (Counter(o.ids) - Counter(expanded))
                continue
            uses = Counter(i for i in n.ids if i in expand)
            for i, count in uses.items():
                stats = result.per_token[i]
                stats["texts"] += 1
                stats["uses"] += count
                stats["tokens_saved"] += count * (len(expand[i]) - 1)
        size = sum(len(t.encode("utf-8")) for t in texts)
        result.per_category[category] = {
            "documents": len(texts), "tokens_before": before_total, "tokens_after": after_total,
            "bytes_per_token_before": size / max(before_total, 1), "bytes_per_token_after": size / max(after_total, 1),
        }
    for key, harm in harms.items():  # the old tokens lost most often, over all the texts it changed
        harm.lost = [readable(old.id_to_token(i)) for i, _ in sorted(lost[key].items(), key=lambda kv: (-kv[1], kv[0]))[:5]]
    result.harms = sorted(harms.values(), key=lambda h: -h.texts)
    return result


def refusal(check: ExtensionCheck, fix: str) -> str:
    """The message that refuses an extension: each harmful token, what it made unreachable, an example."""
    lines = [f"vocabulary extension refused: on {check.texts} held-out documents, "
             f"{sum(h.texts for h in check.harms)} documents change beyond the new tokens' own places; nothing was written"]
    for h in check.harms[:10]:
        lines.append(f"  new token {h.token!r} (id {h.token_id}) makes old token(s) "
                     f"{', '.join(repr(t) for t in h.lost) or '(none lost, only reordered)'} unreachable in "
                     f"{h.texts} document(s); e.g. {h.category}: {h.example!r}")
    lines.append(f"  {fix}")
    return "\n".join(lines)


# -- the model ------------------------------------------------------------------------------------------------


def grow_model(source: str, out: str, new_tok, old_vocab: int, new_vocab: int, embedding_size: int,
               eos: str, pad: str) -> dict[str, int]:
    """Write ``out``: the model of ``source`` with ``embedding_size`` embedding rows (and output-head
    rows when untied) and ``new_tok`` as its tokenizer. Rows of the new tokens (ids ``old_vocab`` to
    ``new_vocab``) and rows added above the old embedding are the mean of the old vocabulary's rows;
    the old rows stay as they were. Returns the embedding sizes before and after."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype="auto")
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < old_vocab:
        raise ArtifactError(f"--extend-from {source}: its embedding has {rows} rows, fewer than the "
                            f"{old_vocab} ids of its tokenizer; it is not that tokenizer's model")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights = [model.get_input_embeddings().weight] + ([] if tied else [model.get_output_embeddings().weight])
    means = [w[:old_vocab].float().mean(0) for w in weights]
    size = max(rows, embedding_size)
    if size > rows:
        model.resize_token_embeddings(size, mean_resizing=False)
    weights = [model.get_input_embeddings().weight] + ([] if tied else [model.get_output_embeddings().weight])
    with torch.no_grad():
        for w, mean in zip(weights, means):
            w[old_vocab:new_vocab] = mean.to(w.dtype)
            w[rows:] = mean.to(w.dtype)
    if tied:
        model.tie_weights()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    PreTrainedTokenizerFast(tokenizer_object=new_tok, eos_token=eos, pad_token=pad).save_pretrained(out)
    return {"before": rows, "after": size}


# -- the report -------------------------------------------------------------------------------------------------


@dataclass
class ExtensionReport:
    version: str
    folder: str
    model_folder: str
    base: str
    vocab_before: int
    vocab_after: int
    embedding: dict[str, int]
    new_tokens: dict[int, str]
    check: ExtensionCheck
    seconds: float
    added: frozenset[int] = frozenset()  # the ids of added tokens (the rest are merges)

    def __str__(self) -> str:
        c = self.check
        lines = [f"tokenizer {self.version}: {self.base}'s vocabulary {self.vocab_before} + {len(self.new_tokens)} "
                 f"new tokens = {self.vocab_after} (embedding {self.embedding['before']} → {self.embedding['after']}, "
                 f"new rows the mean of the old ones) in {self.seconds:.1f} s; saved in {self.folder}; "
                 f"model in {self.model_folder}",
                 f"  check on {c.texts} held-out documents: {c.changed} changed, each only where a new token stands "
                 "for the old tokens it joins",
                 f"  {'id':>7} {'kind':5} {'documents':>9} {'uses':>7} {'tokens saved':>12}  new token"]
        for i, token in self.new_tokens.items():
            s = c.per_token[i]
            kind = "added" if i in self.added else "merge"
            lines.append(f"  {i:7d} {kind:5} {s['texts']:9d} {s['uses']:7d} {s['tokens_saved']:12d}  {shown(token)}")
        lines.append(f"  {'category':10} {'documents':>9} {'tokens before':>13} {'after':>9} {'bytes/token before':>18} {'after':>6}")
        for category, p in c.per_category.items():
            lines.append(f"  {category:10} {p['documents']:9d} {p['tokens_before']:13d} {p['tokens_after']:9d} "
                         f"{p['bytes_per_token_before']:18.2f} {p['bytes_per_token_after']:6.2f}")
        return "\n".join(lines)
