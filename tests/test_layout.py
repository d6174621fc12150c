"""The layout promises of DESIGN.md ("Where code lives"), checked on the code itself."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

from jobs import package
from jobs.stages import REFINE, STAGES, markdown_table, stage
from tests.conftest import ROOT


def test_the_import_contracts_hold():
    """lake/ under both halves, the trainer off the refinery, nothing importing the CLI, no cycles
    (pyproject.toml, [tool.importlinter])."""
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


def test_the_readme_lists_exactly_the_declared_stages():
    assert markdown_table() in (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_consumer_takes_its_stages_from_the_registry():
    from airflow_dags import tokenmill_feed, tokenmill_refine  # noqa: F401 - parsing the DAGs

    refine_dag = tokenmill_refine.dag
    assert [t.task_id for t in refine_dag.topological_sort()] == [s.name for s in REFINE]
    assert {t.task_id: t.application for t in refine_dag.tasks} == {
        s.name: str(ROOT / "jobs" / f"{s.module}.py") for s in REFINE}
    feed_dag = tokenmill_feed.dag
    assert feed_dag.get_task("feed").application == str(ROOT / "jobs" / f"{stage('feed').module}.py")
    assert package.ENTRY_POINTS == tuple(s.module for s in STAGES)
    for s in STAGES:  # each declared module is a stage entry point with its typed options
        assert (ROOT / "jobs" / f"{s.module}.py").is_file()
        assert dataclasses.is_dataclass(s.options)


def test_options_become_flags_and_back(tmp_path):
    import argparse

    from jobs.stages import FeedOptions, add_option_flags, options_from

    parser = argparse.ArgumentParser()
    add_option_flags(parser, FeedOptions)
    args = parser.parse_args(["--until-ready", "3", "--follow"])
    assert options_from(args, FeedOptions) == FeedOptions(until_ready=3, follow=True, verify=False)


def test_every_test_file_the_code_and_docs_cite_exists():
    import re

    cited = {}
    for path in [ROOT / "README.md", *(p for d in ("jobs", "trainer", "lake", "quality_models", "schemas",
                                                   "airflow_dags", "bench", "tests") for p in (ROOT / d).rglob("*.py"))]:
        for name in re.findall(r"tests/[A-Za-z0-9_]+\.py", path.read_text(encoding="utf-8")):
            cited.setdefault(name, path.relative_to(ROOT))
    assert cited, "no citation found: the pattern is wrong"
    missing = {name: str(where) for name, where in cited.items() if not (ROOT / name).is_file()}
    assert not missing, missing


def test_every_test_the_readme_names_exists():
    """The README backs its promises with ``tests/<file>.py::<test>``: each such test is defined there."""
    import re

    named = re.findall(r"(tests/[A-Za-z0-9_]+\.py)::([A-Za-z0-9_]+)", (ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(named) >= 4, named
    missing = [f"{f}::{t}" for f, t in named if f"def {t}(" not in (ROOT / f).read_text(encoding="utf-8")]
    assert not missing, missing
