"""``tokenmill package``: what a Spark cluster needs to run the jobs without installing tokenmill.

    tokenmill package --out dist/
    cd dist && spark-submit --master spark://head:7077 --py-files tokenmill.zip jobs/filter_rules.py --recipe R

Writes ``<out>/tokenmill.zip`` (the packages jobs, lake, schemas, quality_models and trainer, with
their data files) for ``--py-files``, and ``<out>/jobs/<stage>.py``, one small entry script per stage that
imports the stage from the archive (one per stage of ``jobs/stages.py``). The cluster's Python still needs the third-party libraries
(pyarrow, deltalake, numpy, pydantic, PyYAML, fasttext, tokenizers, ...): ``pip install`` them there,
or ship a packed virtual environment with ``--archives``.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from jobs.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "lake", "schemas", "quality_models", "trainer")
ENTRY_POINTS = tuple(s.module for s in STAGES)
_LAUNCHER = '''"""spark-submit entry point for jobs/{stage}.py; the code comes from tokenmill.zip (--py-files)."""
import sys

from jobs.{stage} import main

sys.exit(main())
'''


def build(out: str | Path) -> Path:
    out = Path(out)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    archive = out / "tokenmill.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for package in PACKAGES:
            for path in sorted((ROOT / package).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    zf.write(path, path.relative_to(ROOT).as_posix())
    for stage in ENTRY_POINTS:
        (out / "jobs" / f"{stage}.py").write_text(_LAUNCHER.format(stage=stage))
    return archive


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="dist", help="folder for tokenmill.zip and the entry scripts (default dist/)")
    args = parser.parse_args(argv)
    archive = build(args.out)
    print(f"wrote {archive} ({archive.stat().st_size / 1e6:.1f} MB) and {len(ENTRY_POINTS)} entry scripts in "
          f"{Path(args.out) / 'jobs'}")
    print(f"  cd {args.out} && spark-submit --py-files tokenmill.zip jobs/filter_rules.py --recipe R")
    return 0


if __name__ == "__main__":
    sys.exit(main())
