"""Tokenizer training: byte-level BPE on a mix-weighted sample of the kept documents.

    tokenmill tokenizer --recipe R   |   spark-submit jobs/train_tokenizer.py --recipe R
    tokenmill tokenizer --recipe R --extend-from FOLDER (--add-tokens FILE | --learn N)   (jobs/extend_vocab.py)

Digits are split one per token; the vocabulary (special tokens, learned tokens, the recipe's domain
tokens, reserved tokens) is a multiple of 128, and the model's embedding size leaves a buffer of
about ``tokenizer.embedding_buffer`` ids above it for tokens added later (alignment). Compression
is measured on held-out documents per category. Saved as ``<lake>/models/tokenizer/vN/`` with
``tokenizer.json`` and ``metadata.json``; ``tokenizer.version`` in the recipe pins what feed uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by spark-submit: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable

from quality_models.arrowtext import HAN_RANGES
from lake.tables import Lake
from lake.recipe import Recipe, TokenizerCfg
from jobs import extend_vocab as ev
from jobs.stages import StageError, TokenizerOptions, stage_main
from lake.artifacts import TOKENIZER, ModelError, model_root, new_version, tokenizer_hash, versions, write_metadata
from lake.fs import filesystem, is_local

STAGE = "tokenizer"
EOS, PAD = "<|endoftext|>", "<|pad|>"


def round_up(n: int, multiple: int = 128) -> int:
    return -(-n // multiple) * multiple


def build_tokenizer(texts: Iterable[str], vocab_size: int, special_tokens: list[str], domain_tokens: list[str],
                    min_frequency: int = 2):
    """A byte-level BPE tokenizer with one-digit tokens, trained on ``texts``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(domain_tokens), 300), min_frequency=min_frequency,
        special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if domain_tokens:
        # a word must stand alone to match (not "aspirin" in "aspirinate"); Chinese has no spaces to stand
        # between, so a token with a Han character matches inside running text
        tok.add_tokens([AddedToken(w, single_word=not _has_han(w), normalized=False) for w in domain_tokens])
    return tok


def _has_han(text: str) -> bool:
    return any(lo <= ord(ch) <= hi for ch in text for lo, hi in HAN_RANGES)


def _merge_parts(merge) -> tuple[str, str]:
    return tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1))


def remove_tokens(tok, remove: list[str]):
    """The tokenizer without the given learned tokens, nor the tokens only reachable through them;
    ids are renumbered contiguously. Single bytes of the base alphabet cannot be removed."""
    from tokenizers import Tokenizer, pre_tokenizers

    if not remove:
        return tok
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    unknown = [t for t in remove if t not in vocab]
    if unknown:
        raise ModelError(f"tokenizer.remove_tokens: {unknown} are not learned tokens of this vocabulary "
                         "(byte-level form: a leading space is 'Ġ')")
    base = [t for t in remove if t in alphabet]
    if base:
        raise ModelError(f"tokenizer.remove_tokens: {base} are single bytes of the base alphabet and cannot be removed")
    gone = set(remove)
    merges = [_merge_parts(m) for m in spec["model"]["merges"]]
    changed = True
    while changed:
        changed = False
        for a, b in merges:
            if (a in gone or b in gone) and (a + b) not in gone:
                gone.add(a + b)
                changed = True
    kept = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in gone]
    remap = {t: i for i, t in enumerate(kept)}
    spec["model"]["vocab"] = remap
    spec["model"]["merges"] = [[a, b] for a, b in merges if a not in gone and b not in gone and (a + b) not in gone]
    offset = len(kept)
    for i, added in enumerate(sorted(spec.get("added_tokens", []), key=lambda t: t["id"])):
        if added["content"] in remap:
            added["id"] = remap[added["content"]]
        else:
            added["id"] = offset
            offset += 1
    return Tokenizer.from_str(json.dumps(spec))


def pad_to_multiple(tok, multiple: int = 128) -> list[str]:
    """Adds reserved special tokens until the vocabulary is a multiple of ``multiple``; returns them."""
    size = tok.get_vocab_size(with_added_tokens=True)
    reserved = [f"<|reserved_{i}|>" for i in range(round_up(size, multiple) - size)]
    if reserved:
        tok.add_special_tokens(reserved)
    return reserved


def han_count(text: str) -> int:
    return sum(1 for ch in text if any(lo <= ord(ch) <= hi for lo, hi in HAN_RANGES))


def compression(tok, texts_by_category: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Per category: characters, Chinese characters and UTF-8 bytes per token on the given texts."""
    out = {}
    for category, texts in texts_by_category.items():
        if not texts:
            continue
        tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)) or 1
        out[category] = {
            "documents": len(texts),
            "tokens": tokens,
            "chars_per_token": sum(map(len, texts)) / tokens,
            "han_per_token": sum(map(han_count, texts)) / tokens,
            "bytes_per_token": sum(len(t.encode()) for t in texts) / tokens,
        }
    return out


def read_domain_tokens(cfg: TokenizerCfg) -> list[str]:
    words = list(cfg.domain_tokens)
    if cfg.domain_tokens_file:
        path = Path(cfg.domain_tokens_file)
        if not path.is_file():
            raise ModelError(f"tokenizer.domain_tokens_file {path} does not exist")
        words += [w.strip() for w in path.read_text(encoding="utf-8").splitlines() if w.strip() and not w.startswith("#")]
    return list(dict.fromkeys(words))


def sample_by_mix(spark, recipe: Recipe, lake: Lake) -> tuple[dict[str, list[str]], dict[str, list[str]], str]:
    """(training texts per category, held-out texts per category, the table sampled).

    Each category of the current stage's mix gets its share of ``sample_bytes``; a category with
    fewer bytes than its share gives all it has."""
    from pyspark.sql import functions as F

    cfg = recipe.tokenizer
    mix = recipe.feed.current.mix
    total = sum(mix.values())
    source = lake.kept_documents()
    docs = lake.read(source).where(F.col("category").isin(list(mix))).select(
        "doc_id", "text", "category", F.length(F.encode("text", "utf-8")).alias("bytes"))
    sizes = {r["category"]: r["b"] for r in docs.groupBy("category").agg(F.sum("bytes").alias("b")).collect()}
    # a stable pseudo-random order per document: the same sample on every run with the same seed
    ranked = docs.withColumn("r", F.xxhash64(F.lit(cfg.seed), "doc_id"))
    # at most half of a category is held out, so a small corpus still trains on every category
    holdout = ranked.orderBy("r").groupBy("category").agg(F.collect_list("doc_id").alias("all")).select(
        F.slice("all", F.lit(1), F.least(F.lit(cfg.holdout_docs), F.floor(F.size("all") / 2).cast("int"))).alias("ids"))
    held_ids = {i for r in holdout.collect() for i in r["ids"]}
    train, held = {c: [] for c in mix}, {c: [] for c in mix}
    for r in ranked.where(F.col("doc_id").isin(list(held_ids))).select("text", "category").collect():
        held[r["category"]].append(r["text"])
    for category, share in mix.items():
        want, have = cfg.sample_bytes * share / total, sizes.get(category, 0)
        if not have:
            continue
        fraction = min(1.0, want / have * 1.05)
        rows = ranked.where((F.col("category") == category) & ~F.col("doc_id").isin(list(held_ids))
                            & ((F.abs(F.col("r")) % 1_000_000) < int(fraction * 1_000_000))).select("text").collect()
        train[category] = [r["text"] for r in rows]
    return train, held, source


@dataclass
class TokenizerReport:
    version: str
    folder: str
    vocab_size: int
    model_vocab_size: int
    trained_on: dict[str, int]
    compression: dict[str, dict[str, float]]
    seconds: float

    def __str__(self) -> str:
        lines = [f"tokenizer {self.version}: vocabulary {self.vocab_size} (embedding {self.model_vocab_size}); "
                 f"trained on {', '.join(f'{c} {b / 1e6:.1f} MB' for c, b in self.trained_on.items())} "
                 f"in {self.seconds:.1f} s; saved in {self.folder}",
                 f"  {'category':10} {'held-out docs':>13} {'chars/token':>11} {'zh chars/token':>14} {'bytes/token':>11}"]
        for category, c in self.compression.items():
            lines.append(f"  {category:10} {c['documents']:13d} {c['chars_per_token']:11.2f} "
                         f"{c['han_per_token']:14.2f} {c['bytes_per_token']:11.2f}")
        return "\n".join(lines)


def run(spark, recipe: Recipe, options: TokenizerOptions = TokenizerOptions()) -> TokenizerReport | ev.ExtensionReport:
    """Train a byte-level BPE tokenizer on a mix-weighted sample of the kept documents (or, with
    ``--extend-from`` or the recipe's ``tokenizer.extend``, extend an exported model's: ``extend``)."""
    planned = recipe.tokenizer.extend  # the recipe's extension; the flags override it key by key
    if planned is not None and not options.extend_from:
        options = TokenizerOptions(extend_from=planned.base, add_tokens=options.add_tokens or planned.add_tokens,
                                   learn=options.learn or planned.learn, category=options.category or planned.category,
                                   out=options.out or planned.out)
    if options.extend_from:
        return extend(spark, recipe, options)
    if options.add_tokens or options.learn or options.out or options.category:
        raise StageError("--add-tokens, --learn, --category and --out extend an existing tokenizer: "
                         "give its model folder with --extend-from FOLDER")
    started = time.perf_counter()
    cfg = recipe.tokenizer
    lake = Lake(recipe.lake, spark)
    train, held, source = sample_by_mix(spark, recipe, lake)
    texts = [t for category in train for t in train[category]]
    if not texts:
        raise ModelError(f"no documents of the mix's categories ({', '.join(recipe.feed.current.mix)}) in {source}")
    specials = list(dict.fromkeys(cfg.special_tokens + [EOS, PAD]))
    domain = read_domain_tokens(cfg)
    target = round_up(cfg.vocab_size)
    tok = build_tokenizer(texts, target, specials, domain, cfg.min_frequency)
    tok = remove_tokens(tok, cfg.remove_tokens)
    reserved = pad_to_multiple(tok)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    measured = compression(tok, held)
    with new_version(recipe.lake, TOKENIZER) as folder:
        tok.save(str(folder / "tokenizer.json"))
        write_metadata(
            folder, task="tokenizer", backend="bpe", vocab_size=vocab_size,
            model_vocab_size=round_up(vocab_size + cfg.embedding_buffer), embedding_buffer=cfg.embedding_buffer,
            eos_id=tok.token_to_id(EOS), pad_id=tok.token_to_id(PAD), special_tokens=specials, reserved_tokens=reserved,
            domain_tokens=domain, removed_tokens=list(cfg.remove_tokens), trained_from=source,
            trained_bytes={c: sum(len(t.encode()) for t in v) for c, v in train.items()}, compression=measured,
            sha256=tokenizer_hash((folder / "tokenizer.json").read_bytes()),
        )
    return TokenizerReport(folder.name, f"{model_root(recipe.lake)}/{TOKENIZER}/{folder.name}", vocab_size, round_up(vocab_size + cfg.embedding_buffer),
                           {c: sum(len(t.encode()) for t in v) for c, v in train.items()}, measured,
                           time.perf_counter() - started)


def extend(spark, recipe: Recipe, options: TokenizerOptions) -> ev.ExtensionReport:
    """Extend the tokenizer of the model folder ``--extend-from``: ``--add-tokens`` and/or ``--learn`` N
    merges learnt on the kept documents (of ``--category``), checked on the held-out documents of every
    category of the mix. Refused (StageError naming the harmful tokens), nothing is written; else a new
    tokenizer version is published and the model, its embeddings grown, is written to ``--out``."""
    started = time.perf_counter()
    cfg = recipe.tokenizer
    if not options.add_tokens and not options.learn:
        raise StageError("--extend-from needs tokens to add: --add-tokens FILE (one per line) or --learn N")
    if options.learn is not None and options.learn <= 0:
        raise StageError(f"--learn {options.learn}: give the number of merges to learn, at least 1")
    old, _ = ev.load_base(options.extend_from)
    missing = [t for t in (EOS, PAD) if old.token_to_id(t) is None]
    if missing:
        raise StageError(f"--extend-from {options.extend_from}: its tokenizer has no {' and no '.join(missing)}, which "
                         f"feed ends documents with and pads rows with; extend a tokenmill export (tokenmill train "
                         f"--export), or add them to its tokenizer.json as special tokens first")
    if options.out is None and not is_local(recipe.lake):
        raise StageError(f"the lake {recipe.lake} is not a local folder: give the grown model's folder with --out DIR")
    published = versions(recipe.lake, TOKENIZER)
    upcoming = f"v{int(published[-1][1:]) + 1 if published else 1}"
    out = Path(options.out or Path(filesystem(recipe.lake)[1]) / "exports" / f"extended-{upcoming}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StageError(f"--out {out} exists and is not empty; choose a new folder")
    lake = Lake(recipe.lake, spark)
    train, held, source = sample_by_mix(spark, recipe, lake)
    if options.category and options.category not in train:
        raise StageError(f"--category {options.category} is not a category of the mix ({', '.join(train)})")
    if not any(held.values()):
        raise ModelError(f"no held-out documents of the mix's categories in {source} to check the extension on")
    new, new_tokens, added, learned = _extended(old, options, train)
    check = ev.check_extension(old, new, new_tokens, held, added)
    if not check.passed:
        raise StageError(ev.refusal(check, "leave these tokens out (or give a word with the space before it, "
                                           "' word'), or learn merges instead: --learn N"))
    vocab_before, vocab_after = ev.vocab_size(old), ev.vocab_size(new)
    embedding = round_up(vocab_after + cfg.embedding_buffer)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))  # beside out: moved in one rename
    try:
        sizes = ev.grow_model(options.extend_from, str(staging), new, vocab_before, vocab_after, embedding, EOS, PAD)
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        staging.rename(out)  # the model is in place before the version naming it is published
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        with new_version(recipe.lake, TOKENIZER) as folder:
            new.save(str(folder / "tokenizer.json"))
            write_metadata(
                folder, task="tokenizer", backend="bpe", vocab_size=vocab_after, model_vocab_size=sizes["after"],
                embedding_buffer=cfg.embedding_buffer, eos_id=new.token_to_id(EOS), pad_id=new.token_to_id(PAD),
                extended_from=str(Path(options.extend_from).resolve()), base_vocab_size=vocab_before,
                base_sha256=tokenizer_hash((Path(options.extend_from) / "tokenizer.json").read_bytes()),
                model_folder=str(out.resolve()),
                added_tokens={str(i): new_tokens[i] for i in sorted(added)},
                learned_merges=[{"id": i, "left": a, "right": b, "tokens_saved_on_sample": saved}
                                for i, (a, b, saved) in zip(sorted(set(new_tokens) - added), learned)],
                learned_from=(options.category or "every category of the mix") if learned else None,
                trained_from=source, compression=compression(new, held), compression_before=compression(old, held),
                check={"documents": check.texts, "changed": check.changed,
                       "per_token": {str(i): v for i, v in check.per_token.items()}},
                sha256=tokenizer_hash((folder / "tokenizer.json").read_bytes()),
            )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no version names it: the model goes too
        raise
    return ev.ExtensionReport(folder.name, f"{model_root(recipe.lake)}/{TOKENIZER}/{folder.name}", str(out),
                              options.extend_from, vocab_before, vocab_after, sizes, new_tokens, check,
                              time.perf_counter() - started, frozenset(added))


def _extended(old, options: TokenizerOptions, train: dict[str, list[str]]):
    """(new tokenizer, {new id: token}, the ids of added tokens, the learned merges): ``--add-tokens``
    first, then ``--learn`` merges on the training sample (of ``--category``)."""
    new, new_tokens, added, learned = old, {}, set(), []
    if options.add_tokens:
        new, added_ids = ev.add_tokens(new, ev.read_token_file(options.add_tokens), f"--add-tokens {options.add_tokens}")
        new_tokens.update(added_ids)
        added = set(added_ids)
    if options.learn:
        domain = train[options.category] if options.category else [t for c in train for t in train[c]]
        learned = ev.learn_merges(new, domain, options.learn)
        if not learned:
            raise StageError(f"--learn: no pair of tokens occurs twice in the {len(domain)} documents sampled "
                             f"({options.category or 'every category'}) that is not a token already")
        new, merged_ids = ev.add_merges(new, [(a, b) for a, b, _ in learned])
        new_tokens.update(merged_ids)
    return new, new_tokens, added, learned


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, argv)


if __name__ == "__main__":
    sys.exit(main())
