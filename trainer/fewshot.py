"""Few-shot multiple-choice evaluation: accuracy by the log-likelihood of each option.

An item is a prompt and its choices, as token ids. Each choice is scored by the summed log-probability
of its tokens read right after the prompt, with ``shots`` solved examples of the same set (never the
item itself; chosen by the seed) prepended; the item counts as right when the true choice scores
highest (``acc``), and again when it scores highest per character of the choice (``acc_norm``): the
ARC method of lm-evaluation-harness, whose ``acc_norm`` divides by the choice's length in characters.

Two kinds of sets (``trainer.fewshot`` in the recipe):

- JSON Lines files, one ``{"question": str, "choices": [str, ...], "answer": int | str}`` a line
  (the answer is the choice's index or its text), read as ``Question: …\\nAnswer:`` and `` <choice>``,
  solved examples separated by a blank line;
- the built-in set, made from the lake's held-out documents (``lake.holdout``: never in a chunk):
  each document's first tokens, and four continuations of equal token length: its own next tokens,
  and windows of other held-out documents of the same source (of other sources only where its own
  has too few). It needs no file and no network, on any lake.

``model_loglikelihood`` scores on the model's device in batches of about ``batch_tokens``, right
padded (causal attention: padding after a sequence changes nothing before it); a prompt too long
for the model's context loses its first tokens (the oldest shots), never the choice's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lake import fs

Request = tuple[list[int], list[int]]  # (prompt, continuation) token ids
LogLikelihood = Callable[[list[Request]], list[float]]


class FewShotSetError(ValueError):
    """An evaluation set that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Item:
    prompt: list[int]  # the question as the model reads it, right before a choice
    choices: list[list[int]]  # each choice's tokens
    answer: int  # index of the right choice
    chars: list[int]  # each choice's length in characters: acc_norm divides by it


@dataclass(frozen=True)
class TaskSet:
    name: str
    items: list[Item]
    shots: int  # solved examples of the same set before each item
    separator: list[int]  # tokens between solved examples (and before the item)

    def solved(self, i: int) -> list[int]:
        item = self.items[i]
        return item.prompt + item.choices[item.answer]


@dataclass(frozen=True)
class SetResult:
    acc: float
    acc_norm: float
    items: int
    chance: float  # the accuracy of guessing: the mean of 1 / choices
    nll: float = float("nan")  # mean negative log-likelihood per token of the correct choice (Llama 3's
    # two-step method predicts accuracy from it: tokenmill lab fits the sigmoid)


# -- the sets ------------------------------------------------------------------------------------------


def read_jsonl_set(name: str, path: str, tokenizer, shots: int, max_items: int | None = None) -> TaskSet:
    """A JSON Lines file (local path or URI) of {question, choices, answer} records → a set."""
    try:
        text = fs.read_bytes(path).decode("utf-8")
    except FileNotFoundError:
        raise FewShotSetError(f"few-shot set {name!r}: no file {path} (trainer.fewshot.sets)") from None
    except UnicodeDecodeError as err:
        raise FewShotSetError(f"{path}: not UTF-8 text ({err})") from None
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
    items = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        question, choices, answer = parse_record(line, f"{path}:{number}")
        items.append(Item(encode(f"Question: {question}\nAnswer:"), [encode(f" {c}") for c in choices], answer,
                          [len(c) + 1 for c in choices]))
        if max_items is not None and len(items) >= max_items:
            break
    if not items:
        raise FewShotSetError(f"{path}: no records; a line is {{\"question\": ..., \"choices\": [...], \"answer\": ...}}")
    return TaskSet(name, items, shots, encode("\n\n"))


def parse_record(line: str, where: str) -> tuple[str, list[str], int]:
    """One line of a set: (question, choices, index of the answer); errors name ``where`` (file:line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise FewShotSetError(f"{where}: not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise FewShotSetError(f"{where}: a record is an object {{\"question\", \"choices\", \"answer\"}}, "
                              f"not {type(record).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in record]
    if missing:
        raise FewShotSetError(f"{where}: no {', '.join(missing)} (a record has question, choices and answer)")
    question, choices, answer = record["question"], record["choices"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise FewShotSetError(f"{where}: question must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise FewShotSetError(f"{where}: choices must be a list of at least two non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise FewShotSetError(f"{where}: answer must be the right choice's index (from 0) or its text")
    if isinstance(answer, str):
        if answer not in choices:
            raise FewShotSetError(f"{where}: answer {answer!r} is none of the choices {choices}")
        answer = choices.index(answer)
    elif not 0 <= answer < len(choices):
        raise FewShotSetError(f"{where}: answer {answer} is no choice's index (0 to {len(choices) - 1})")
    return question, choices, answer


def builtin_items(documents: dict[str, list[list[int]]], context_tokens: int, continuation_tokens: int, seed: int,
                  decode: Callable[[list[int]], str], choices: int = 4) -> list[Item]:
    """Which continuation is the real one: per document (token ids by source) with at least twice
    ``continuation_tokens`` tokens, its first tokens (up to ``context_tokens``) and ``choices``
    continuations of ``continuation_tokens`` tokens: its own next ones and windows of other documents,
    of the same source first, all different. Deterministic given ``seed``; a document for which not
    enough different windows exist is left out."""
    n = continuation_tokens
    usable = {src: [d for d in docs if len(d) >= n] for src, docs in sorted(documents.items())}
    items = []
    for source, docs in usable.items():
        others = [d for s, ds in usable.items() if s != source for d in ds]
        for i, doc in enumerate(docs):
            if len(doc) < 2 * n:
                continue
            rng = random.Random(f"{seed}/{source}/{i}")
            cut = min(context_tokens, len(doc) - n)
            real = doc[cut : cut + n]
            same = [d for j, d in enumerate(docs) if j != i]
            rng.shuffle(same)
            pool = others[:]
            rng.shuffle(pool)
            picked = _distinct_windows(same + pool, real, n, choices - 1, rng)
            if len(picked) < choices - 1:
                continue
            options = [real] + picked
            rng.shuffle(options)
            answer = next(k for k, o in enumerate(options) if o is real)
            items.append(Item(doc[:cut], options, answer, [max(len(decode(o)), 1) for o in options]))
    return items


def _distinct_windows(docs: list[list[int]], real: list[int], n: int, want: int, rng: random.Random) -> list[list[int]]:
    """Up to ``want`` windows of ``n`` tokens, one per document in order, each unlike ``real`` and the others."""
    seen, out = {tuple(real)}, []
    for doc in docs:
        starts = list(range(len(doc) - n + 1))
        rng.shuffle(starts)
        window = next((doc[s : s + n] for s in starts if tuple(doc[s : s + n]) not in seen), None)
        if window is not None:
            seen.add(tuple(window))
            out.append(window)
            if len(out) == want:
                break
    return out


def load_sets(cfg, lake, tokenizer, separator: list[int], only: list[str] | None = None, log=print) -> list[TaskSet]:
    """The sets of ``trainer.fewshot`` (``cfg``), or only those named in ``only``: the JSON Lines files,
    and the built-in set from ``lake``'s held-out documents (``separator``: between its solved examples,
    the end-of-text token). A lake with no held-out documents has no built-in set (said in ``log``)."""
    known = [*cfg.sets, *(["builtin"] if cfg.builtin else [])]
    unknown = [n for n in only or [] if n not in known]
    if unknown:
        raise FewShotSetError(f"unknown few-shot set(s) {unknown}: the recipe's are {known or 'none'} "
                              f"(trainer.fewshot.sets, trainer.fewshot.builtin)")
    names = only or known
    sets = [read_jsonl_set(n, cfg.sets[n], tokenizer, cfg.shots, cfg.max_items) for n in names if n != "builtin"]
    if "builtin" in names:
        from trainer.evaluation import holdout_documents

        documents = holdout_documents(lake, tokenizer, cfg.max_items, 4 * (cfg.context_tokens + cfg.continuation_tokens))
        items = builtin_items(documents, cfg.context_tokens, cfg.continuation_tokens, cfg.seed, tokenizer.decode)
        if items:
            sets.append(TaskSet("builtin", _spread(items, cfg.max_items), cfg.builtin_shots, separator))
        else:
            log(f"[fewshot] no built-in set: no held-out document in {lake.uri('holdout')} has "
                f"{2 * cfg.continuation_tokens} tokens (feed freezes them when it first runs)")
    return sets


def _spread(items: list[Item], limit: int) -> list[Item]:
    """At most ``limit`` items, evenly from the whole list (its sources follow one another)."""
    if len(items) <= limit:
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


# -- scoring -------------------------------------------------------------------------------------------


def shot_indices(n_items: int, i: int, shots: int, seed: int) -> list[int]:
    """The solved examples before item ``i``: ``shots`` other items of the set, chosen by the seed."""
    others = [j for j in range(n_items) if j != i]
    return random.Random(f"{seed}/shots/{i}").sample(others, min(shots, len(others)))


def requests_of(task: TaskSet, seed: int, max_length: int | None) -> list[Request]:
    """Every (prompt with its shots, choice) pair of the set, item by item; a pair longer than
    ``max_length`` tokens loses the prompt's first tokens."""
    out = []
    for i, item in enumerate(task.items):
        prompt = [t for j in shot_indices(len(task.items), i, task.shots, seed) for t in task.solved(j) + task.separator]
        prompt = prompt + item.prompt
        for choice in item.choices:
            keep = len(prompt) if max_length is None else max(max_length - len(choice), 1)
            out.append((prompt[-keep:], choice))
    return out


def evaluate_set(task: TaskSet, loglikelihood: LogLikelihood, seed: int = 0, max_length: int | None = None) -> SetResult:
    """acc and acc_norm of the set under ``loglikelihood`` (summed log-probability per request)."""
    requests = requests_of(task, seed, max_length)
    scores = loglikelihood(requests)
    right = right_norm = 0
    nll = 0.0
    at = 0
    for item in task.items:
        ll = scores[at : at + len(item.choices)]
        nll -= ll[item.answer] / len(requests[at + item.answer][1])
        at += len(item.choices)
        right += max(range(len(ll)), key=lambda k: ll[k]) == item.answer
        right_norm += max(range(len(ll)), key=lambda k: ll[k] / item.chars[k]) == item.answer
    n = len(task.items)
    return SetResult(right / n, right_norm / n, n, sum(1 / len(it.choices) for it in task.items) / n, nll / n)


def model_loglikelihood(model, batch_tokens: int = 8192, pad_id: int = 0) -> LogLikelihood:
    """``loglikelihood`` of a causal LM (``model(input_ids=...).logits``) on its own device."""

    @torch.no_grad()
    def score(requests: list[Request]) -> list[float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = [0.0] * len(requests)
        order = sorted(range(len(requests)), key=lambda r: -len(requests[r][0]) - len(requests[r][1]))
        at = 0
        while at < len(order):
            width = len(requests[order[at]][0]) + len(requests[order[at]][1]) - 1  # the longest of the batch
            batch = order[at : at + max(1, batch_tokens // max(width, 1))]
            at += len(batch)
            for r, ll in zip(batch, _batch_loglikelihood(model, [requests[r] for r in batch], width, pad_id, device)):
                out[r] = ll
        model.train(was_training)
        return out

    return score


def _batch_loglikelihood(model, requests: list[Request], width: int, pad_id: int, device) -> list[float]:
    ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
    rows, cols, targets, owner = [], [], [], []
    for b, (prompt, cont) in enumerate(requests):
        seq = (prompt + cont)[:-1]
        ids[b, : len(seq)] = torch.tensor(seq)
        start = len(prompt) - 1  # the position whose logits predict the continuation's first token
        rows += [b] * len(cont)
        cols += range(start, start + len(cont))
        targets += cont
        owner += [b] * len(cont)
    logits = model(input_ids=ids.to(device)).logits
    picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
    logp = torch.log_softmax(picked, dim=-1).gather(1, torch.tensor(targets, device=device)[:, None])[:, 0]
    sums = torch.zeros(len(requests), dtype=torch.float64, device=device).index_add_(
        0, torch.tensor(owner, device=device), logp.double())
    return sums.tolist()  # one trip to the host per batch


def evaluate(sets: list[TaskSet], loglikelihood: LogLikelihood, seed: int = 0,
             max_length: int | None = None) -> dict[str, SetResult]:
    return {task.name: evaluate_set(task, loglikelihood, seed, max_length) for task in sets}


def as_metrics(results: dict[str, SetResult]) -> dict[str, float]:
    """``{<set>/acc, <set>/acc_norm, <set>/nll, <set>/chance}``: logged under ``fewshot`` (TensorBoard:
    fewshot/<set>/acc)."""
    return {f"{name}/{key}": value for name, r in sorted(results.items())
            for key, value in (("acc", r.acc), ("acc_norm", r.acc_norm), ("nll", r.nll), ("chance", r.chance))}


def summary(results: dict[str, SetResult]) -> str:
    return "; ".join(f"{name} acc {r.acc:.3f} acc_norm {r.acc_norm:.3f} ({r.items} items, chance {r.chance:.3f})"
                     for name, r in sorted(results.items()))

