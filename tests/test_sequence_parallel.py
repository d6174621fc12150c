"""Sequence parallelism (``trainer/parallel.py``): two gloo processes sharing each row compute what one
process computes, in the model (losses and gradients) and in the daemon (step by step)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.sp_worker import CASES, losses_and_grads
from tests.test_trainer import _setup

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".tokenmill" / "torch_extensions"))


def _port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _two_processes(args: list[str], cwd: Path = ROOT) -> list[str]:
    port, procs = _port(), []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(f"rank {r}:\n{o[-3000:]}" for r, o in enumerate(outs))
    return outs


def test_the_pieces_of_two_processes_give_one_processs_losses_and_gradients(tmp_path):
    out = tmp_path / "sp.pt"
    _two_processes([str(ROOT / "tests" / "sp_worker.py"), str(out)])
    shared = torch.load(out)
    assert set(shared) == set(CASES)
    for case, (loss, grads) in shared.items():
        alone, alone_grads = losses_and_grads(case)
        assert loss.shape == alone.shape and (alone > 0).sum() > 200
        assert torch.allclose(loss, alone, atol=1e-5), (case, (loss - alone).abs().max())
        for name, grad in alone_grads.items():
            assert torch.allclose(grads[name], grad, atol=1e-5, rtol=1e-4), (case, name)


def test_a_row_that_does_not_split_over_the_group_is_refused_naming_the_key():
    from trainer.parallel import SequenceGroup

    with pytest.raises(ValueError, match="trainer.sequence_parallel = 2.*multiple of 2"):
        SequenceGroup(2, 0, None).piece(65)


def test_sequence_parallel_must_divide_the_heads_and_every_stages_seq_len():
    from lake.recipe import RecipeError
    from tests.conftest import make_recipe

    source = [{"name": "t", "path": "x.jsonl"}]
    with pytest.raises(RecipeError, match="sequence_parallel"):
        make_recipe(Path("/tmp"), source, trainer={"sequence_parallel": 4, "model": {"heads": 4, "kv_heads": 2}})
    with pytest.raises(RecipeError, match=r"feed\.stages\.long\.seq_len = 4097"):
        make_recipe(Path("/tmp"), source, trainer={"sequence_parallel": 2},
                    feed={"stages": {"pretrain": {"seq_len": 2048}, "long": {"seq_len": 4097}}})
    recipe = make_recipe(Path("/tmp"), source, trainer={"sequence_parallel": 2},
                         feed={"stages": {"pretrain": {"seq_len": 2048}, "long": {"seq_len": 4096}}})
    assert recipe.trainer.sequence_parallel == 2


@pytest.mark.slow
def test_the_daemon_with_two_processes_per_row_trains_as_one_process(tmp_path):
    """Same chunks, same seed: one process, then two sharing every row (sequence_parallel 2) give the
    same loss, tokens and gradient norm at every step."""
    import yaml

    runs = {}
    for name, world in (("alone", 1), ("shared", 2)):
        recipe, _ = _setup(tmp_path / name, model={"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2,
                                                   "doc_mask": True}, sequence_parallel=world)
        recipe_file = tmp_path / name / "recipe.yaml"
        recipe_file.write_text(yaml.safe_dump({
            "lake": recipe.lake, "sources": [{"name": "t", "path": "x.jsonl"}],
            "trainer": recipe.trainer.model_dump(mode="json", exclude_none=True)}))
        args = ["-m", "trainer.daemon", "--recipe", str(recipe_file), "--max-steps", "5"]
        if world == 1:
            proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        else:
            outs = _two_processes(args)
            assert "2 process(es) (2 per row: sequence parallel)" in outs[0]
        lines = (Path(recipe.lake) / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()
        runs[name] = [json.loads(line) for line in lines]
    alone, shared = runs["alone"], runs["shared"]
    assert [r["step"] for r in shared] == [r["step"] for r in alone] == [1, 2, 3, 4, 5]
    for a, s in zip(alone, shared):
        assert s["tokens"] == a["tokens"] and s["batch_sequences"] == a["batch_sequences"]
        assert s["loss"] == pytest.approx(a["loss"], rel=1e-4), (a["step"], a["loss"], s["loss"])
        assert s["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
        assert s["loss_by_category"] == pytest.approx(a["loss_by_category"], rel=1e-4)
