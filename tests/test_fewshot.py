"""Few-shot evaluation (trainer/fewshot.py): scoring by option log-likelihood with a stand-in
likelihood and a tiny real model, the JSON Lines sets and their errors, the built-in set from
held-out documents; then a short CPU run whose metrics show the built-in accuracy rising above
chance, and ``tokenmill eval`` on that run's checkpoint and on its Hugging Face export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_jsonl
from trainer import fewshot
from trainer.fewshot import FewShotSetError, Item, TaskSet

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".tokenmill" / "torch_extensions"))


class CharTokenizer:
    """One token per character (its code point): enough to read sets without a trained tokenizer."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text, add_special_tokens=False):
        return self._Encoding([ord(c) for c in text])

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def _by_table(table: dict[tuple, float]):
    """A log-likelihood that looks each (prompt, continuation) up by its continuation, recording the requests."""
    seen = []

    def score(requests):
        seen.extend(requests)
        return [table[tuple(cont)] for _, cont in requests]

    return score, seen


# -- scoring -------------------------------------------------------------------------------------------


def test_the_highest_likelihood_choice_wins_and_acc_norm_divides_by_characters():
    items = [Item([1], [[10], [11], [12]], 1, [1, 1, 1]),  # 11 is most likely: right
             Item([2], [[20], [21]], 0, [1, 1]),  # 21 is more likely: wrong
             Item([3], [[30, 30], [31]], 0, [2, 10])]  # 30 30 wins the sum, 31 wins per character
    table = {(10,): -3.0, (11,): -1.0, (12,): -2.0, (20,): -2.0, (21,): -1.0, (30, 30): -2.0, (31,): -3.0}
    score, _ = _by_table(table)
    result = fewshot.evaluate_set(TaskSet("s", items, 0, []), score)
    assert result.acc == pytest.approx(2 / 3) and result.acc_norm == pytest.approx(1 / 3)
    assert result.items == 3 and result.chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert result.nll == pytest.approx((1.0 / 1 + 2.0 / 1 + 2.0 / 2) / 3)  # per token of the right choice
    assert fewshot.as_metrics({"s": result}) == {"s/acc": result.acc, "s/acc_norm": result.acc_norm,
                                                 "s/nll": result.nll, "s/chance": result.chance}


def test_shots_are_other_items_of_the_set_prepended_never_the_item_asked():
    items = [Item([100 + i], [[200 + i], [300 + i]], 0, [1, 1]) for i in range(6)]
    task = TaskSet("s", items, 3, [9])
    requests = fewshot.requests_of(task, seed=7, max_length=None)
    assert len(requests) == 12
    for i in range(6):
        shots = fewshot.shot_indices(6, i, 3, seed=7)
        assert len(shots) == 3 and i not in shots and len(set(shots)) == 3
        prompt = [t for j in shots for t in [100 + j, 200 + j, 9]] + [100 + i]  # solved: prompt + right choice
        assert requests[2 * i] == (prompt, [200 + i]) and requests[2 * i + 1] == (prompt, [300 + i])
    assert fewshot.requests_of(task, 7, None) == requests  # the seed decides
    assert fewshot.requests_of(task, 8, None) != requests
    small = TaskSet("s", items[:2], 5, [9])  # fewer others than shots: all the others
    assert fewshot.requests_of(small, 0, None)[0][0] == [101, 201, 9, 100]


def test_a_prompt_too_long_loses_its_first_tokens_never_the_choice():
    task = TaskSet("s", [Item(list(range(10)), [[50, 51, 52], [60]], 0, [3, 1])], 0, [])
    (p1, c1), (p2, c2) = fewshot.requests_of(task, 0, max_length=6)
    assert (p1, c1) == ([7, 8, 9], [50, 51, 52]) and (p2, c2) == ([5, 6, 7, 8, 9], [60])


def test_the_model_likelihood_batched_and_padded_equals_one_sequence_at_a_time():
    import torch

    from lake.trainer_sections import ModelCfg
    from trainer.model import build_model

    torch.manual_seed(0)
    model = build_model(ModelCfg(hidden=32, layers=2, heads=4, kv_heads=2), vocab_size=64)
    gen = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 64, (n,), generator=gen).tolist()  # noqa: E731
    requests = [(rand(p), rand(c)) for p, c in [(5, 3), (1, 1), (12, 4), (7, 2), (3, 6)]]
    batched = fewshot.model_loglikelihood(model, batch_tokens=20, pad_id=0)(requests)  # several batches
    with torch.no_grad():
        for (prompt, cont), got in zip(requests, batched):
            ids = torch.tensor([prompt + cont])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            want = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(cont))
            assert got == pytest.approx(want, abs=1e-4)
    assert model.training  # left as it was found


# -- JSON Lines sets -----------------------------------------------------------------------------------


def test_a_jsonl_set_reads_answers_as_index_or_text(tmp_path):
    path = write_jsonl(tmp_path / "arc.jsonl", [
        {"question": "2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
        {"question": "Sky?", "choices": ["green", "blue"], "answer": "blue"}])
    task = fewshot.read_jsonl_set("arc", str(path), CharTokenizer(), shots=1)
    assert [it.answer for it in task.items] == [1, 1]
    assert CharTokenizer().decode(task.items[0].prompt) == "Question: 2 + 2?\nAnswer:"
    assert [CharTokenizer().decode(c) for c in task.items[1].choices] == [" green", " blue"]
    assert task.items[1].chars == [6, 5] and CharTokenizer().decode(task.separator) == "\n\n"
    assert len(fewshot.read_jsonl_set("arc", str(path), CharTokenizer(), 1, max_items=1).items) == 1


@pytest.mark.parametrize("line, says", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a record is an object"),
    ('{"question": "q", "choices": ["a", "b"]}', "no answer"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two"),
    ('{"question": "q", "choices": "ab", "answer": 0}', "at least two"),
    ('{"question": "", "choices": ["a", "b"], "answer": 0}', "question must be"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer 2 is no choice's index (0 to 1)"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "answer 'c' is none of the choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "answer must be"),
])
def test_a_malformed_record_names_the_file_and_line(tmp_path, line, says):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "fine", "choices": ["a", "b"], "answer": 0}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(FewShotSetError) as err:
        fewshot.read_jsonl_set("bad", str(path), CharTokenizer(), shots=0)
    assert f"{path}:3: " in str(err.value) and says in str(err.value)


def test_a_missing_or_empty_file_and_an_unknown_set_name_are_clear_errors(tmp_path):
    with pytest.raises(FewShotSetError, match="few-shot set 'x': no file"):
        fewshot.read_jsonl_set("x", str(tmp_path / "none.jsonl"), CharTokenizer(), 0)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(FewShotSetError, match="empty.jsonl: no records"):
        fewshot.read_jsonl_set("x", str(tmp_path / "empty.jsonl"), CharTokenizer(), 0)
    from lake.trainer_sections import FewShotCfg

    cfg = FewShotCfg(sets={"arc": str(tmp_path / "empty.jsonl")}, builtin=False)
    with pytest.raises(FewShotSetError, match=r"unknown few-shot set\(s\) \['mmlu'\]: the recipe's are \['arc'\]"):
        fewshot.load_sets(cfg, None, CharTokenizer(), [0], only=["mmlu"])


def test_the_recipe_resolves_set_paths_and_refuses_the_builtin_name(tmp_path):
    from lake.recipe import RecipeError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lake: lake\nsources: [{name: a, path: x}]\n"
                      "trainer: {fewshot: {every: 10, sets: {arc: evals/arc.jsonl}}}\n")
    cfg = load_recipe(recipe).trainer.fewshot
    assert cfg.sets == {"arc": str(tmp_path / "evals" / "arc.jsonl")} and cfg.every == 10 and cfg.builtin
    recipe.write_text("lake: lake\nsources: [{name: a, path: x}]\ntrainer: {fewshot: {sets: {builtin: a.jsonl}}}\n")
    with pytest.raises(RecipeError, match="not 'builtin'"):
        load_recipe(recipe)


def test_few_shot_evaluation_is_a_callback_only_when_every_is_set():
    from lake.trainer_sections import FewShotCfg, TrainerCfg
    from trainer.callbacks import default_callbacks

    assert "fewshot" not in [cb.name for cb in default_callbacks(TrainerCfg())]
    names = [cb.name for cb in default_callbacks(TrainerCfg(fewshot=FewShotCfg(every=20)))]
    assert names.index("evaluation") < names.index("fewshot") < names.index("metrics")


def test_eval_without_a_checkpoint_says_to_train_first(tmp_path, capsys):
    from jobs.cli import main as cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("lake: lake\nsources: [{name: a, path: x}]\n")
    assert cli(["eval", "--recipe", str(recipe)]) == 2
    assert f"no checkpoint in {tmp_path / 'lake' / 'runs' / 'tiny' / 'checkpoints'}; train first" in capsys.readouterr().err
    assert cli(["eval", "--recipe", str(recipe), "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "neither a complete checkpoint" in capsys.readouterr().err


# -- the built-in set ----------------------------------------------------------------------------------


def _documents():
    """Token ids by source: each document its own run of numbers (no window repeats another's)."""
    return {"a": [list(range(100 * i, 100 * i + 20)) for i in range(5)],
            "b": [list(range(1000 + 100 * i, 1000 + 100 * i + 12)) for i in range(2)] + [[7, 8, 9]]}


def test_the_builtin_set_asks_for_the_real_continuation_among_same_source_windows():
    docs = _documents()
    items = fewshot.builtin_items(docs, context_tokens=8, continuation_tokens=4, seed=3, decode=str)
    a_items = items[:5]
    for i, item in enumerate(a_items):
        doc = docs["a"][i]
        assert item.prompt == doc[:8] and item.choices[item.answer] == doc[8:12]
        assert len(item.choices) == 4 and all(len(c) == 4 for c in item.choices)
        assert len({tuple(c) for c in item.choices}) == 4
        for k, c in enumerate(item.choices):
            if k != item.answer:  # a window of another document of source a
                owner = [j for j, d in enumerate(docs["a"]) if c[0] in d]
                assert owner and owner[0] != i and c == docs["a"][owner[0]][c[0] - 100 * owner[0]:][:4]
    # source b has two usable documents: one window of the other, two of source a; [7, 8, 9] is too short
    b_items = items[5:]
    assert len(b_items) == 2 and len(items) == 7
    for item, doc in zip(b_items, docs["b"]):
        assert item.prompt == doc[:8] and item.choices[item.answer] == doc[8:12]
        wrong = [c for k, c in enumerate(item.choices) if k != item.answer]
        assert sum(c[0] >= 1000 for c in wrong) == 1 and sum(c[0] < 1000 for c in wrong) == 2
    assert fewshot.builtin_items(docs, 8, 4, 3, str) == items  # deterministic given the seed
    assert fewshot.builtin_items(docs, 8, 4, 4, str) != items
    assert {it.answer for it in items} != {items[0].answer}  # the right one is not always in one place


def test_a_short_document_gets_a_shorter_context_and_too_few_windows_no_item():
    items = fewshot.builtin_items({"a": [list(range(10)), list(range(20, 40)), list(range(50, 60)),
                                         list(range(70, 80))]}, 16, 4, 0, decode=str)
    assert items[0].prompt == list(range(6)) and items[0].choices[items[0].answer] == [6, 7, 8, 9]
    assert fewshot.builtin_items({"a": [list(range(10)), list(range(20, 30))]}, 16, 4, 0, decode=str) == []


# -- in the loop, and tokenmill eval -------------------------------------------------------------------


@pytest.mark.slow
def test_builtin_accuracy_rises_above_chance_in_the_metrics_and_eval_reads_the_checkpoint(tmp_path, capsys):
    """A short CPU run on a synthetic lake (jobs/synthetic_lake.py, as in tests/test_trainer.py): the
    built-in set every 2 steps.
    Its English and Chinese documents are random words, so their continuations are equally likely
    whatever the model; its code documents count up (def f0, f1, …), which a tiny model learns in a
    few steps: the accuracy starts near chance and ends well above it."""
    import yaml

    from jobs.cli import main as cli
    from lake.recipe import load_recipe
    from jobs.synthetic_lake import add_chunk, make_lake
    from trainer.checkpoint import export
    from trainer.loop import Trainer

    lake, tok, meta, docs = make_lake(str(tmp_path / "lake"), n_docs=900)
    add_chunk(lake, "pretrain-000000", docs, tok, meta, seed=0)
    arc = write_jsonl(tmp_path / "counting.jsonl", [
        {"question": f"def f{i}(x): return x + ?", "choices": [str(i), str(i + 1), str(i + 2)], "answer": str(i)}
        for i in range(6)])
    fewshot_cfg = {"every": 2, "context_tokens": 16, "continuation_tokens": 8, "sets": {"counting": str(arc)},
                   "shots": 2}
    cfg = {"eval_every": 1000, "checkpoint_every": 10, "micro_batch": 8, "batch_ramp": [[0, 8]],
           "planned_tokens": 200000, "poll_seconds": 0.05, "fewshot": fewshot_cfg}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"lake": "lake", "sources": [{"name": "t", "path": "x.jsonl"}], "trainer": cfg}))
    recipe = load_recipe(path)
    Trainer(recipe, max_steps=30).run()

    run = Path(recipe.lake) / "runs" / "tiny"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["fewshot"]) for r in records if "fewshot" in r]
    assert [s for s, _ in evals] == list(range(2, 31, 2))
    assert all(set(f) == {f"{s}/{k}" for s in ("builtin", "counting") for k in ("acc", "acc_norm", "nll", "chance")}
               for _, f in evals)
    acc = [f["builtin/acc"] for _, f in evals]
    with capsys.disabled():
        print(f"\nbuilt-in accuracy by step: {dict(zip(range(2, 31, 2), acc))}")
    late = sum(acc[-5:]) / 5
    assert late > 0.25 + 0.1 and late > acc[0] + 0.1  # above chance, and above the first evaluation
    assert acc[-1] > 0.25 and acc[-1] > acc[0]

    capsys.readouterr()
    assert cli(["eval", "--recipe", str(path),
                "--checkpoint", str(run / "checkpoints" / "step-000000030")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run / "fewshot" / "step-000000030.json").read_text())
    assert saved["step"] == 30 and set(saved["sets"]) == {"builtin", "counting"}
    builtin = saved["sets"]["builtin"]
    assert builtin["chance"] == 0.25 and builtin["items"] > 60 and builtin["shots"] == 0
    assert saved["sets"]["counting"]["shots"] == 2 and saved["sets"]["counting"]["items"] == 6
    assert builtin["acc"] == pytest.approx(evals[-1][1]["builtin/acc"])  # the same weights as the loop's step 30
    with capsys.disabled():
        print(out)
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == ["builtin"])
    assert row == ["builtin", str(builtin["items"]), "0.250", f"{builtin['acc']:.3f}", f"{builtin['acc_norm']:.3f}"]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    hf = export(recipe, str(tmp_path / "hf"))  # the same checkpoint as a Hugging Face folder
    assert cli(["eval", "--recipe", str(path), "--checkpoint", hf, "--sets", "builtin"]) == 0
    exported = json.loads((Path(hf) / "fewshot.json").read_text())
    assert exported["step"] is None and set(exported["sets"]) == {"builtin"}
    assert exported["sets"]["builtin"]["acc"] == pytest.approx(builtin["acc"])
    assert cli(["eval", "--recipe", str(path), "--sets", "mmlu"]) == 2
    assert "unknown few-shot set(s) ['mmlu']" in capsys.readouterr().err
