"""The recipe's sections of the refinery and the lake: one pydantic model per top-level key (sources,
ingest, filter, pii, score, dedup, tokenizer, spark), each with its defaults and checks, in pipeline
order. Feed's section (mixes, curricula, adaptive mixing) is ``lake/feed_sections.py`` and the
trainer's ``lake/trainer_sections.py``; ``lake/recipe.py`` puts them together into the ``Recipe`` and
loads it from YAML.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="unique source name, used in doc_id")
    path: str = Field(description="glob of input files (local path or URI); .gz/.zst/.bz2 are read compressed")
    format: Literal["jsonl", "parquet"] = "jsonl"
    text_field: str = "text"
    id_field: str | None = None
    url_field: str | None = None
    license: str | None = Field(default=None, description="the source's licence (an SPDX id such as cc-by-4.0), for "
                                                          "tokenmill card")
    kind: Literal["text", "instruction"] = Field(
        default="text", description="instruction: each record is a prompt and a completion (prompt_field and "
        "completion_field) or a conversation (messages_field); the loss falls on the completion only")
    prompt_field: str = Field(default="prompt", description="instruction: the prompt's field")
    completion_field: str = Field(default="completion", description="instruction: the completion's field")
    messages_field: str | None = Field(
        default=None, description="instruction: a list of {role, content} turns instead; the last assistant turn "
        "is the completion, the turns before it (in ChatML) the prompt")

    @model_validator(mode="after")
    def _instruction_fields(self) -> "Source":
        if self.kind == "text" and self.messages_field is not None:
            raise ValueError(f"source {self.name!r}: messages_field is for kind: instruction")
        return self


class Ingest(Section):
    max_doc_bytes: int = Field(default=1_000_000, gt=0, description="larger documents are rejected")
    split_bytes: int = Field(
        default=128 * 1024 * 1024, gt=0, description="uncompressed JSONL files are read in splits of this size"
    )


class EvalSet(Section):
    path: str = Field(description="a JSON Lines or Parquet file of the evaluation set (local path or URI)")
    fields: list[str] | None = Field(default=None, description="the text fields (strings or lists of strings); "
                                                               "unset: every string field")


class Decontaminate(Section):
    sets: dict[str, EvalSet] = Field(default_factory=dict, description="evaluation set name → its file and fields")
    n: int = Field(default=13, ge=3, description="tokens per n-gram (words; a Han character is one token)")
    action: Literal["remove", "flag"] = Field(
        default="remove", description="remove: a contaminated document is rejected naming the set and the n-gram; "
                                      "flag: kept, with signal decontam_<set> = its matching n-grams")

    @field_validator("sets")
    @classmethod
    def _names(cls, sets: dict[str, EvalSet]) -> dict[str, EvalSet]:
        for name, eval_set in sets.items():
            if not re.fullmatch(r"[a-z0-9_]+", name):
                raise ValueError(f"evaluation set name {name!r}: use lower-case letters, digits and '_' (it names "
                                 f"the rule decontam_{name})")
            _check_file(eval_set.path, f"evaluation set {name!r}")
        return sets


class UrlBlocklist(Section):
    domains: list[str] = Field(default_factory=list, description="files of blocked domains, one per line; a domain "
                                                                 "blocks its subdomains too")
    words: list[str] = Field(default_factory=list, description="files of banned words: a URL containing one as an "
                                                               "alphanumeric part is blocked")

    @model_validator(mode="after")
    def _check(self) -> "UrlBlocklist":
        for path in [*self.domains, *self.words]:
            _check_file(path, "url_blocklist")
        return self


def _check_file(path: str, what: str) -> None:
    if "://" not in path and not Path(path).is_file():
        raise ValueError(f"{what}: file {path} does not exist")


class Language(Section):
    model: str | None = Field(default=None, description="null: script statistics only; 'lid176': fastText's lid.176 "
                                                        "(fetched once by `tokenmill models fetch-lid`); or a path to "
                                                        "a fastText language-ID model")
    min_confidence: float = Field(default=0.5, ge=0, le=1, description="below it, the script statistics decide")
    keep: list[str] | None = Field(default=None, description="languages to keep (ISO 639 codes, e.g. [zh, en]): a "
                                                             "document confidently in another is rejected as "
                                                             "`language`; code never is")

    @model_validator(mode="after")
    def _keep_needs_a_model(self) -> "Language":
        if self.keep is not None and self.model is None:
            raise ValueError("keep needs a language-ID model: set filter.language.model (lid176, after "
                             "`tokenmill models fetch-lid`)")
        return self


class Filter(Section):
    thresholds: dict[str, float | None | dict[str, float | None]] = Field(
        default_factory=dict,
        description="rule name → threshold, or {default: x, zh: y, en: z, code: w}; null disables (jobs/rules.py; "
                    "the filter stage checks the names before any Spark work)",
    )
    domain_thresholds: dict[str, dict[str, float | None | dict[str, float | None]]] = Field(
        default_factory=dict,
        description="domain → thresholds in the same form, on top of `thresholds`, for documents of that domain as "
                    "the weak labels see it (score.weak_labels.source_domains, then URL patterns, then code)",
    )
    source_thresholds: dict[str, dict[str, float | None | dict[str, float | None]]] = Field(
        default_factory=dict,
        description="source name → thresholds in the same form, on top of `thresholds` and `domain_thresholds`, for "
                    "that source's documents (a licence collection may repeat more than news)",
    )
    keyword_lists: dict[str, str] = Field(
        default_factory=dict, description="list name → file with one keyword or phrase per line"
    )
    keyword_limits: dict[str, float] = Field(
        default_factory=dict, description="list name → most hits per 1000 characters a kept document may have (default 1.0)"
    )
    drop_line_patterns: list[str] | None = Field(
        default=None, description="regular expressions of lines to drop; unset: the defaults of jobs/rules.py")
    truncate_patterns: list[str] | None = Field(
        default=None, description="a matching heading in the second half ends the document; unset: jobs/rules.py's")
    report_samples: int = Field(default=5, ge=0, description="removed documents shown per rule in the report")
    language: Language = Field(default_factory=Language, description="language identification (quality_models/lid.py)")
    decontaminate: Decontaminate = Field(default_factory=Decontaminate, description="documents sharing an n-gram "
                                         "with an evaluation set (jobs/decontam.py)")
    url_blocklist: UrlBlocklist = Field(default_factory=UrlBlocklist, description="blocked domains and URL words")
    warn_share: float = Field(default=0.3, gt=0, le=1, description="a rule that removes more than this share of a "
                              "source's documents is a warning with samples (and with --strict the stage fails "
                              "before it commits)")

    @model_validator(mode="after")
    def _check(self) -> "Filter":
        for pattern in [*(self.drop_line_patterns or []), *(self.truncate_patterns or [])]:
            re.compile(pattern)
        for name, path in self.keyword_lists.items():
            _check_file(path, f"keyword list {name!r}")
        unknown = set(self.keyword_limits) - set(self.keyword_lists)
        if unknown:
            raise ValueError(f"keyword_limits names lists that keyword_lists does not define: {sorted(unknown)}")
        return self

    def limits(self) -> dict[str, float]:
        return {name: self.keyword_limits.get(name, 1.0) for name in self.keyword_lists}


class Pii(Section):
    patterns: dict[str, str] = Field(default_factory=dict, description="placeholder name → regular expression")
    word_lists: dict[str, str] = Field(default_factory=dict, description="placeholder name → file, one word per line")
    max_pii_fraction: float = Field(
        default=0.3, gt=0, le=1, description="documents whose characters are more PII than this are rejected"
    )

    @model_validator(mode="after")
    def _check(self) -> "Pii":
        for name, pattern in self.patterns.items():
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                raise ValueError(f"placeholder name {name!r} must be UPPER_CASE (it becomes <{name}>)")
            re.compile(pattern)
        for name, path in self.word_lists.items():
            if not Path(path).is_file():
                raise ValueError(f"word list {name!r}: file {path} does not exist")
        return self


class ModelPin(Section):
    backend: Literal["fasttext", "bert"] = "fasttext"
    version: str = Field(default="latest", pattern=r"^(latest|v\d+)$", description="v1, v2, ... or latest")


class Cascade(Section):
    """Score quality with fastText first; run the BERT quality model only where fastText is unsure."""

    version: str = Field(default="latest", pattern=r"^(latest|v\d+)$")
    low: float = Field(default=0.3, ge=0, le=1)
    high: float = Field(default=0.7, ge=0, le=1)


class WeakLabels(Section):
    source_domains: dict[str, str] = Field(default_factory=dict, description="source name → domain label")
    curated_sources: list[str] = Field(default_factory=list, description="sources whose kept documents are 'high'")
    low_quality_sources: list[str] = Field(
        default_factory=list, description="sources whose documents are 'low' (a crawl against a reference, as in GPT-3)"
    )


class PerplexityFilter(Section):
    model: str = Field(description="a local Hugging Face causal LM folder with its tokenizer (tokenmill train --export)")
    max_tokens: int = Field(default=256, ge=2, description="tokens of each document the model reads")
    batch_size: int = Field(default=1, gt=0, description="documents per forward pass on a CPU (1 is fastest there: "
                                                        "bench/perplexity.py)")
    gpu_batch_size: int = Field(default=64, gt=0, description="documents per forward pass on a GPU")
    percentile: dict[str, float | None] = Field(
        default_factory=lambda: {"default": 95.0},
        description="category → percentile of its documents' perplexity above which a document is removed (null: "
                    "the category is kept whole); 'default' (95 unless given) for categories not named")

    @field_validator("percentile")
    @classmethod
    def _in_range(cls, value: dict[str, float | None]) -> dict[str, float | None]:
        for key, p in value.items():
            if p is not None and not 0 < p < 100:
                raise ValueError(f"percentile.{key} = {p}: a percentile lies strictly between 0 and 100")
        return value


class Score(Section):
    perplexity: PerplexityFilter | None = Field(default=None, description="CCNet-style perplexity filter "
                                                "(quality_models/perplexity.py); unset: off")
    quality: ModelPin = ModelPin()
    domain: ModelPin = ModelPin()
    cascade: Cascade | None = None
    backbone: str | None = Field(default=None, description="local encoder folder; default: the packaged MiniLM")
    max_tokens: int = Field(default=256, gt=0)
    batch_size: int = Field(default=32, gt=0)
    gpu_batch_size: int = Field(default=256, gt=0, description="documents per encoder batch on a GPU")
    quantize: bool = Field(default=False, description="dynamic int8 quantisation of the encoder for CPU")
    lang_categories: dict[str, str] = Field(default_factory=lambda: {"zh": "zh", "en": "en", "code": "code"})
    domain_categories: dict[str, str] = Field(default_factory=lambda: {"code": "code"}, description="wins over lang")
    default_category: str = "other"
    instruction_category: str = Field(default="instruction", description="the category of every instruction "
                                      "example (a source of kind: instruction), whatever its language and domain")
    holdout: float = Field(default=0.2, gt=0, lt=1)
    weak_labels: WeakLabels = WeakLabels()

    @model_validator(mode="after")
    def _cascade_needs_fasttext_first(self) -> "Score":
        if self.cascade is not None and self.quality.backend != "fasttext":
            raise ValueError("cascade scores with fastText first: set score.quality.backend to fasttext")
        return self


class Shingling(Section):
    unit: Literal["word", "char"] = "word"
    n: int = Field(default=5, gt=0)


class LineDedup(Section):
    """Remove lines (or paragraphs) that recur across many documents before document dedup."""

    min_repeats: int = Field(default=20, gt=1, description="a line in more than this many documents is boilerplate")
    unit: Literal["line", "paragraph"] = "line"
    min_chars: int = Field(default=10, ge=0, description="shorter lines are never removed")


class SemanticDedup(Section):
    enabled: bool = Field(default=False, description="after near-dedup, remove semantic duplicates (SemDeDup)")
    threshold: float = Field(default=0.85, gt=0, le=1, description="cosine of the encoder's embeddings at or above "
                             "which the lower-ranked document goes (all-MiniLM-L6-v2: rewritten paraphrases score "
                             "about 0.75-0.8, light edits 0.9 and more)")
    cluster_size: int = Field(default=1000, ge=2, description="k-means clusters of about this many documents "
                              "(k = ceil(n / cluster_size)); pairs are compared inside a cluster only")
    max_tokens: int = Field(default=128, ge=8, description="tokens of each document the encoder reads")
    backbone: str | None = Field(default=None, description="a local Hugging Face encoder folder; unset: the packaged "
                                                           "all-MiniLM-L6-v2")


class Dedup(Section):
    exact: bool = Field(default=True, description="drop copies of the same normalised text first")
    num_perm: int = Field(default=256, ge=16, le=1024, description="MinHash permutations (signature length)")
    seed: int = 1
    thresholds: dict[str, float] = Field(
        default_factory=lambda: {"news": 0.70, "knowledge": 0.85, "encyclopedia": 0.85},
        description="domain or category → Jaccard threshold; a pair across two uses the stricter (higher)",
    )
    default_threshold: float = Field(default=0.80, gt=0, lt=1)
    warn_share: float = Field(default=0.3, gt=0, le=1, description="a threshold key that removes more than this "
                              "share of a source's documents is a warning (with --strict the stage fails before "
                              "it commits)")
    shingles: dict[str, Shingling] = Field(
        default_factory=lambda: {"zh": Shingling(unit="char", n=5)},
        description="lang → shingling; other languages use word 5-grams",
    )
    fp_weight: float = Field(
        default=0.1, ge=0, le=1,
        description="LSH banding: weight of false positives (1 - this weighs false negatives); candidates are "
        "verified against the full signatures, so a missed pair costs more than an extra candidate",
    )
    max_bucket_pairs: int = Field(
        default=100, gt=0, description="in an LSH bucket, each document is paired with at most this many next ones"
    )
    line_dedup: LineDedup | None = None
    semantic: SemanticDedup = Field(default_factory=SemanticDedup, description="semantic dedup (jobs/semantic_dedup.py)")

    @field_validator("thresholds")
    @classmethod
    def _in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for key, th in value.items():
            if not 0.0 < th < 1.0:
                raise ValueError(f"thresholds.{key} = {th}: a Jaccard threshold lies strictly between 0 and 1")
        return value

    def shingling(self, lang: str) -> Shingling:
        return self.shingles.get(lang, Shingling())

    def threshold_for(self, domain: str | None, category: str | None) -> tuple[float, str]:
        """(threshold, the key that set it): the domain's, else the category's, else the default."""
        for key in (domain, category):
            if key is not None and key in self.thresholds:
                return self.thresholds[key], key
        return self.default_threshold, category or "default"


class Extension(Section):
    """Continued pretraining: the tokenizer is a base model's, extended (``jobs/extend_vocab.py``); the
    ``tokenmill tokenizer`` flags of the same names override these."""

    base: str = Field(description="the base model's Hugging Face folder (tokenmill train --export)")
    add_tokens: str | None = Field(default=None, description="a file of tokens to add, one per line")
    learn: int | None = Field(default=None, gt=0, description="learn the N merges that save the most tokens")
    category: str | None = Field(default=None, description="learn from this category's documents (default: every "
                                                           "category of the mix)")
    out: str | None = Field(default=None, description="the grown model's folder (trainer.model.init_from reads it); "
                                                      "default <lake>/exports/extended-<version>")

    @model_validator(mode="after")
    def _something_to_add(self) -> "Extension":
        if self.add_tokens is None and self.learn is None:
            raise ValueError("tokenizer.extend needs tokens to add: add_tokens (a file) or learn (a number of merges)")
        return self


class TokenizerCfg(Section):
    """Byte-level BPE trained by ``tokenmill tokenizer`` (jobs/train_tokenizer.py), or a base model's
    extended (``extend``)."""

    version: str = Field(default="latest", pattern=r"^(latest|v\d+)$", description="the version feed uses")
    vocab_size: int = Field(default=32_000, ge=512, description="rounded up to a multiple of 128")
    sample_bytes: int = Field(default=50_000_000, gt=0, description="training sample, split by the mix")
    min_frequency: int = Field(default=2, ge=1)
    special_tokens: list[str] = Field(default_factory=lambda: ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"])
    domain_tokens: list[str] = Field(default_factory=list, description="kept as one token each: a word where it "
                                     "stands alone, a token with a Han character wherever it occurs")
    domain_tokens_file: str | None = Field(default=None, description="file with one domain token per line")
    remove_tokens: list[str] = Field(default_factory=list, description="learned tokens to drop from the vocabulary")
    embedding_buffer: int = Field(default=1000, ge=0, description="ids reserved between vocabulary and embedding")
    extend: Extension | None = Field(default=None, description="continued pretraining: extend the base model's "
                                     "tokenizer instead of training one")
    holdout_docs: int = Field(default=200, gt=0, description="held-out documents per category for compression (at most half of a category)")
    seed: int = 0


class Spark(Section):
    master: str = Field(default="local[*]", description="used only when spark-submit did not set one")
    shuffle_partitions: int = Field(default=8, gt=0)
    driver_memory: str = "4g"
    conf: dict[str, str] = Field(default_factory=dict, description="any other spark.* settings")
