"""Batch text kernels: script languages and fastText inference on whole Arrow batches must give
exactly what the one-document-at-a-time definitions give."""

from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from jobs import demo_corpus
from quality_models.arrowtext import ascii_letters, segment_sums
from quality_models.language import _script_table, script_lang, script_langs
from quality_models.fasttext_backend import FastTextClassifier, fnv1a32, prepare_many, tokenize


def test_segment_sums_leave_empty_segments_at_zero():
    values = np.array([[1, 2], [3, 4], [5, 6]])
    got = segment_sums(values, np.array([0, 0, 2, 2, 3, 3]))
    assert got.tolist() == [[0, 0], [4, 6], [0, 0], [5, 6], [0, 0]]
    assert segment_sums(np.zeros((0, 2)), np.array([0, 0])).tolist() == [[0.0, 0.0]]
    assert ascii_letters(pa.array(["ab1 Z", "", "9_9", "xyzXYZ@["], pa.large_string())).tolist() == [3, 0, 0, 6]


def _fnv_reference(word: str) -> int:
    h = 2166136261
    for byte in word.encode("utf-8"):
        signed = byte - 256 if byte >= 128 else byte  # fastText hashes ``char``, signed on x86
        h = ((h ^ (signed & 0xFFFFFFFF)) * 16777619) & 0xFFFFFFFF
    return h - (1 << 32) if h >= 1 << 31 else h


def test_fnv_hash_matches_fasttexts_byte_by_byte_definition():
    words = ["", "a", "the", "</s>", "中", "naïve", "😀", "x" * 63, "y" * 64, "z" * 65, "长" * 40 + "ab", "é" * 100]
    assert fnv1a32(words).tolist() == [_fnv_reference(w) for w in words]


# The code-line statistic as first written: Python's ``re`` line by line. The batch version must agree.
_REFERENCE_HINT = re.compile(
    r"^\s*(def |class |import |from \S+ import|#include|public |private |function |return\b|if \(|for \(|"
    r"}\s*$|{\s*$|[A-Za-z_][\w.]* = |@\w+|//|/\*|\*/|if .*:$|elif |else:|try:|except|raise |with .*:$|"
    r"for .* in .*:$|while .*:$|#)"
)
_REFERENCE_END = re.compile(r"[:;{}()\[\],]\s*$")


def _reference_lang(text: str) -> str:
    table = _script_table()
    flags = table[np.frombuffer(text[:20_000].encode("utf-32-le"), np.uint32)]
    letters = max(int(((flags & 1) != 0).sum()), 1)
    if ((flags & 4) != 0).sum() / letters >= 0.3:
        return "zh"
    head = list(islice((ln for ln in text.split("\n") if ln and not ln.isspace()), 400))
    if not head:
        return "other"
    if sum(bool(_REFERENCE_HINT.match(ln) or _REFERENCE_END.search(ln)) for ln in head) / len(head) >= 0.35:
        return "code"
    return "en" if ((flags & 2) != 0).sum() / letters >= 0.7 else "other"


def _mixed_texts(n: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    lines = ["def f(x):", "  x = 1", "return(x)", "return\u00e9 x", "hello world, again", "中文句子。", "}", "{\xa0",
             "", "  ", "\u3000", "end;", "fin;\u2003", "Ünïcödé wörds", "@décor", "@x", "İstanbul K", "ſelect",
             "for i in x:", "if (a) {", "\x1c\x1d", "#include <a.h>", "import os", "x.y_z = 3", "a\tb\x0bc"]
    out = ["", " ", "\n\n", "x = 1\ny = 2", "a" * 25_000 + "中" * 9_000, "def f():\n" + "    pass\n" * 500]
    out += ["\n".join(rnd.choice(lines) for _ in range(rnd.randint(0, 30))) for _ in range(n)]
    return out


def test_script_langs_in_batches_and_one_by_one_match_the_line_by_line_definition():
    texts = _mixed_texts(600)
    want = [_reference_lang(t) for t in texts]
    assert script_langs(texts) == want  # Arrow kernels over the whole batch (RE2 on >256 ASCII lines)
    assert script_langs(pa.array(texts)) == want
    assert [script_lang(t) for t in texts] == want  # a document at a time
    assert set(want) == {"zh", "en", "code", "other"}


# -- fastText --------------------------------------------------------------------------------------

_TRAIN = textwrap.dedent("""
    import json, sys, fasttext
    from quality_models.fasttext_backend import INIT_THREADS, prepare_many
    rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
    with open(sys.argv[2] + ".txt", "w", encoding="utf-8") as f:
        for row, line in zip(rows, prepare_many([r["text"] for r in rows])):
            f.write(f"__label__{row['label']} {line}\\n")
    options = json.loads(sys.argv[3])
    model = fasttext.train_supervised(input=sys.argv[2] + ".txt", epoch=5, dim=16, bucket=20000, minCount=1,
                                      thread=INIT_THREADS, seed=1, verbose=0, **options)
    model.save_model(sys.argv[2])
""")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    # Real documents of each kind, as the demo builds them, labelled by source.
    sizes = {"zh_news": 60, "zh_reviews": 60, "en_docs": 60, "code": 60}
    rows = []
    for source in demo_corpus.build_demo_corpus(tmp / "corpus", sizes):
        if source.name in sizes:
            raw = source.path.read_bytes()
            lines = (gzip.decompress(raw) if source.path.suffix == ".gz" else raw).decode("utf-8").splitlines()
            rows += [{"text": json.loads(line)["text"], "label": source.name} for line in lines]
    data = tmp / "labelled.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return tmp, data, [r["text"] for r in rows]


def _train(tmp: Path, data: Path, name: str, **options) -> FastTextClassifier:
    # Its own process, to train with options FastTextClassifier.train does not expose.
    model = tmp / f"{name}.bin"
    proc = subprocess.run([sys.executable, "-c", _TRAIN, str(data), str(model), json.dumps(options)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    import fasttext

    loaded = fasttext.load_model(str(model))
    return FastTextClassifier(loaded, sorted(lab.removeprefix("__label__") for lab in loaded.labels))


def _edge_texts(texts: list[str]) -> list[str]:
    return texts + ["", "   ", "Hello\tWORLD\x0bx\x0cy\rz\x00w", "İstanbul ΣΟΦΙΑ", "中文，测试abc中", "\u3000全角\u3000空格",
                    "__label__news foo __LABEL__code bar", "a" * 5000, "x " * 3000, "naïve café ﬁ ß", "😀 👍🏽 done",
                    "\x1c\x1d sep \x85 nel", "def f(x):\n    return x\n"]


@pytest.mark.parametrize("options", [{"wordNgrams": 2}, {"wordNgrams": 3}, {"wordNgrams": 1}])
def test_vectorised_fasttext_equals_the_librarys_predict(labelled, options):
    tmp, data, texts = labelled
    model = _train(tmp, data, f"n{options['wordNgrams']}", **options)
    assert model.supports_vectorised()
    texts = _edge_texts(texts)
    want = model._predict_with_library(prepare_many(texts))
    got = model.predict_proba(texts)
    # fastText reports exp(log(p + 1e-5)); everything else is float rounding.
    assert np.abs(got - want).max() < 1e-4
    # the same label wherever the library's top two are apart by more than float rounding: this little
    # model's probabilities lie within 1e-3 of each other, and a tie within 1e-6 can go either way
    top2 = np.sort(want, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 1e-6
    assert decided.mean() > 0.9
    assert (got.argmax(axis=1) == want.argmax(axis=1))[decided].all()
    shared = tokenize(pa.array(texts))
    assert np.array_equal(model.predict_proba(pa.array(texts), shared), got)  # Arrow input, shared tokens


def test_sub_word_models_go_through_the_library(labelled):
    tmp, data, texts = labelled
    model = _train(tmp, data, "subwords", minn=2, maxn=4)
    assert not model.supports_vectorised()
    got = model.predict_proba(texts[:50])
    assert got.shape == (50, len(model.labels)) and np.allclose(got.sum(axis=1), 1.0, atol=1e-3)


def test_tokens_follow_fasttexts_reader():
    tokens = tokenize(["Hello  World\tfoo", "", "中国abc Def", "__label__x y __LABEL__Z", "  ", "a\x00b"])
    words = [[tokens.vocab[int(i)].as_py() for i in tokens.sequence[tokens.offsets[k]:tokens.offsets[k + 1]]]
             for k in range(len(tokens))]
    assert words == [["hello", "world", "foo", "</s>"], ["</s>"], ["中", "国", "abc", "def", "</s>"], ["y", "</s>"],
                     ["</s>"], ["a", "b", "</s>"]]


def test_fasttext_trains_inside_a_process_that_runs_spark(spark, labelled):
    # fastText 0.9.3 with one thread leaves 9/10 of its input matrix uninitialised; in a process with a
    # used heap (this one runs Spark) that garbage made training abort with "Encountered NaN".
    _, data, _ = labelled
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    for seed in range(4):
        model = FastTextClassifier.train([r["text"] for r in rows], [r["label"] for r in rows], epoch=3, dim=16,
                                         bucket=5000, seed=seed)
        matrix = model.model.get_input_matrix()
        assert np.isfinite(matrix).all() and (np.abs(matrix).max(axis=1) > 0).all()  # every row initialised
        assert model.labels == ["code", "en_docs", "zh_news", "zh_reviews"]
