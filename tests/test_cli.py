import json
import re
from pathlib import Path

import pytest

from jobs import cli, ingest
from jobs.demo_corpus import MESSY_LINES, build_demo_corpus

from conftest import ROOT, make_recipe, write_jsonl

HAN = re.compile(r"[\u4e00-\u9fff]")


def test_status_lists_tables_versions_rows_and_rejections(spark, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(7)] + [{"text": 3}])
    recipe = make_recipe(tmp_path, [{"name": "s", "path": str(data)}])
    ingest.run(spark, recipe)
    (tmp_path / "recipe.yaml").write_text(f"lake: {recipe.lake}\nsources: [{{name: s, path: '{data}'}}]\n")
    assert cli.main(["status", "--recipe", str(tmp_path / "recipe.yaml")]) == 0
    out = capsys.readouterr().out
    raw_line = next(line for line in out.splitlines() if line.strip().startswith("documents_raw"))
    assert raw_line.split()[1:3] == ["0", "7"]  # version 0, 7 rows
    assert "by ingest" in raw_line
    assert re.search(r"ingest\s+text_not_string\s+1", out)
    assert "not written yet:" in out and "chunks" in out


def test_bad_recipe_is_one_clear_line_and_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("lake: l\nsources: [{name: s, path: x, colour: red}]\n")
    assert cli.main(["status", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sources.0.colour: unknown key" in err and "Traceback" not in err


def test_demo_corpus_is_real_mixed_text_and_deterministic(tmp_path):
    first = {b.name: b for b in build_demo_corpus(tmp_path / "a", {"zh_news": 30, "zh_reviews": 30, "en_docs": 30, "code": 30})}
    second = build_demo_corpus(tmp_path / "b", {"zh_news": 30, "zh_reviews": 30, "en_docs": 30, "code": 30})
    for b in second:
        assert b.path.read_bytes() == first[b.name].path.read_bytes()
    import gzip

    def texts(name):
        raw = first[name].path.read_bytes()
        raw = gzip.decompress(raw) if first[name].path.suffix == ".gz" else raw
        return [json.loads(line)["text"] for line in raw.decode().splitlines()]

    for name in ("zh_news", "zh_reviews"):
        docs = texts(name)
        assert len(docs) == 30
        assert all(len(HAN.findall(t)) / len(t) > 0.5 for t in docs), name
    english = texts("en_docs")
    assert all(len(HAN.findall(t)) == 0 for t in english)
    assert sum(" the " in t for t in english) >= 0.9 * len(english)
    assert all(re.search(r"^\s*(def|class|import|from|#|@|\w+ = )", t, re.M) for t in texts("code"))
    assert first["messy"].documents == len(MESSY_LINES)


def test_status_shows_the_chunk_backlog_once_chunks_exist(tmp_path, capsys):
    from datetime import datetime, timezone

    import pyarrow as pa

    from lake.tables import Lake

    now = datetime.now(timezone.utc)
    rows = [
        {"chunk_id": f"c{i}", "stage": "pretrain", "status": status, "n_tokens": 1000 * (i + 1), "n_rows": 1,
         "files": [], "sha256": [], "mix": None, "times_consumed": 0, "recipe_hash": None, "tokenizer_version": None,
         "run_id": None, "reason": None, "created_at": now, "updated_at": now}
        for i, status in enumerate(["ready", "ready", "training", "consumed"])
    ]
    from schemas import table

    Lake(str(tmp_path / "lake")).write_arrow("chunks", pa.Table.from_pylist(rows, table("chunks").schema))
    (tmp_path / "r.yaml").write_text("lake: lake\nsources: [{name: s, path: x}]\n")
    assert cli.main(["status", "--recipe", str(tmp_path / "r.yaml")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"ready\s+2 chunks\s+3,000 tokens", out)
    assert re.search(r"consumed\s+1 chunks\s+4,000 tokens", out)
    assert "ready for the trainer: 2" in out


@pytest.mark.slow
def test_a_command_that_succeeded_exits_0_every_time(tmp_path):
    """delta-rs's runtime threads can abort a plain interpreter exit ("terminate called without an
    active exception", exit code 134) after a command finished; Airflow would mark the run failed.
    A hundred runs of a short command that reads every table of a lake with delta-rs must all exit 0."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from jobs.synthetic_lake import make_lake

    make_lake(str(tmp_path / "lake"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"lake: {tmp_path / 'lake'}\nsources: [{{name: s, path: x.jsonl}}]\n")
    command = [os.path.join(os.path.dirname(sys.executable), "tokenmill"), "status", "--recipe", str(recipe)]

    def once(_):
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    # What aborts is the interpreter's own shutdown, after the command's work: simulated here by an exit
    # handler that aborts the way delta-rs's runtime does. A command run as a program never gets there.
    aborting = ("import atexit, os, sys; atexit.register(os.abort); from jobs.cli import main; "
                f"sys.argv = ['tokenmill', 'status', '--recipe', {str(recipe)!r}]; sys.exit(main())")
    simulated = subprocess.run([sys.executable, "-c", aborting], capture_output=True, text=True, timeout=120,
                               cwd=os.path.dirname(os.path.dirname(__file__)))
    assert simulated.returncode == 0 and "documents_dedup" in simulated.stdout, (simulated.returncode, simulated.stderr[-500:])
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(once, range(100)))
    failed = [(r.returncode, r.stderr[-300:]) for r in runs if r.returncode != 0]
    assert not failed, f"{len(failed)} of 100 runs failed: {failed[:3]}"
    assert all(re.search(r"^\s+documents_dedup\s+0\s+120\b", r.stdout, re.M) for r in runs), runs[0].stdout


@pytest.mark.parametrize("where", ["lake", "lake/inside"])
def test_a_lake_that_is_a_file_fails_before_any_work_in_one_line(tmp_path, capsys, where):
    (tmp_path / "lake").write_text("not a folder")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "doc"}])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"lake: {tmp_path / where}\nsources: [{{name: s, path: '{data}'}}]\n")
    for command in (["ingest", "--recipe", str(recipe)], ["refine", "--recipe", str(recipe)]):
        assert cli.main(command) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is a file, not a folder" in err and str(tmp_path / "lake") in err, err
    assert (tmp_path / "lake").read_text() == "not a folder"


def test_vacuum_lists_then_removes_only_a_write_folder_no_commit_names(tmp_path, capsys):
    from jobs.synthetic_lake import make_lake

    lake, *_ = make_lake(str(tmp_path / "lake"))
    table = tmp_path / "lake" / "tables" / "documents_dedup"
    dead = table / "w-20200101T000000-0123abcd"  # what a job killed in 2020 left
    dead.mkdir()
    (dead / "part-00000.parquet").write_bytes(b"PAR1 half-written")
    committed = sorted(p.name for p in table.iterdir() if p.name != "_delta_log")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"lake: {tmp_path / 'lake'}\nsources: [{{name: s, path: x.jsonl}}]\n")
    assert cli.main(["vacuum", "--recipe", str(recipe), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {dead}: 1 file(s)" in out and "1 uncommitted write folder(s)" in out and dead.exists()
    assert cli.main(["vacuum", "--recipe", str(recipe)]) == 0
    assert not dead.exists() and sorted(p.name for p in table.iterdir() if p.name != "_delta_log") == [
        n for n in committed if n != dead.name]
    assert lake.read_arrow("documents_dedup").num_rows == 120


def test_the_demo_builds_its_corpus_where_the_recipe_reads_it_whatever_lake_is_given(tmp_path):
    from jobs.cli import DEMO_RECIPE
    from jobs.demo import corpus_folder
    from lake.recipe import load_recipe

    recipe = load_recipe(str(DEMO_RECIPE), {"lake": str(tmp_path / "elsewhere" / "lake")})
    folder = corpus_folder(recipe)
    assert folder == ROOT / ".tokenmill" / "demo_corpus"
    assert all(Path(s.path).parent == folder / s.name for s in recipe.sources)
