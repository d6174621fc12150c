"""A run's checkpoints, ``<run>/checkpoints/step-NNNNNNNNN``: DeepSpeed's model, optimizer and
scheduler files plus a client state (the loop's ``State``, the RNG states and every callback's
``state_dict``). ``export`` turns one into a Hugging Face folder."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from lake.artifacts import load_tokenizer
from lake.recipe import Recipe
from trainer.engine import stage_settings


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng(state: dict) -> None:
    if state:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])


class Checkpoints:
    """``step-*`` folders; one counts only once complete: every rank saved its part and rank 0 then wrote
    ``COMPLETE`` into it (a folder a kill cut short has no marker and is never resumed from)."""

    MARKER = "COMPLETE"

    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = Path(folder), keep

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:09d}"

    def tags(self) -> list[str]:
        """The complete checkpoints, oldest first."""
        return [p.name for p in self._folders() if self._complete(p)]

    def partial(self) -> list[str]:
        return [p.name for p in self._folders() if not self._complete(p)]

    def _folders(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def _complete(self, folder: Path) -> bool:
        if (folder / self.MARKER).exists():
            return True
        if any((p / self.MARKER).exists() for p in self._folders()):
            return False  # the run writes markers: a folder without one is a save cut short
        latest = self.folder / "latest"  # DeepSpeed names the last save it finished (runs from before the marker)
        return latest.exists() and latest.read_text().strip() == folder.name

    def save(self, engine, step: int, client: dict, prune: bool) -> str:
        """Every rank saves its part; then rank 0 (``prune``) marks it complete and removes all but the
        newest ``keep`` complete ones."""
        import torch.distributed as dist

        tag = self.tag(step)
        engine.save_checkpoint(str(self.folder), tag=tag, client_state=client)
        if dist.is_initialized():
            dist.barrier()  # every rank's files are written before the marker says so
        if prune:
            (self.folder / tag / self.MARKER).write_text(f"{tag}\n")
            for old in self.tags()[: -self.keep]:
                shutil.rmtree(self.folder / old, ignore_errors=True)
        return tag

    def load_latest(self, engine) -> tuple[str, dict] | None:
        """(tag, client state) of the newest complete checkpoint, loaded into the engine; None when there
        is none. Partial folders (a kill during a save) are skipped, and removed by ``remove_partial``."""
        tags = self.tags()
        if not tags:
            return None
        _, client = engine.load_checkpoint(str(self.folder), tag=tags[-1])
        return tags[-1], client

    def remove_partial(self) -> list[str]:
        """Delete the folders of saves that never completed (rank 0, before training resumes)."""
        gone = self.partial()
        for tag in gone:
            shutil.rmtree(self.folder / tag, ignore_errors=True)
        return gone


def run_checkpoints(recipe: Recipe) -> Checkpoints:
    cfg = recipe.trainer
    return Checkpoints(Path(cfg.runs_dir or f"{recipe.lake}/runs") / cfg.run_name / "checkpoints", cfg.keep_checkpoints)


def model_state(folder: Path, tag: str, zero_stage: int) -> dict:
    """The model's weights (fp32 where ZeRO-3 partitioned them) of checkpoint ``tag`` in ``folder``."""
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    return torch.load(Path(folder) / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def export(recipe: Recipe, out: str, tag: str | None = None) -> str:
    """A checkpoint (default: the latest) of the recipe's run → a Hugging Face folder."""
    from trainer.model import export_hf

    cfg = recipe.trainer
    checkpoints = run_checkpoints(recipe)
    ckpt_dir, tags = checkpoints.folder, checkpoints.tags()
    if not tags:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first: tokenmill train --recipe {recipe.origin}")
    state = model_state(ckpt_dir, tag or tags[-1], cfg.zero_stage)
    _, meta = load_tokenizer(recipe)
    settings = stage_settings(cfg, cfg.stage or recipe.feed.stage)
    return export_hf(state, cfg.model, meta["model_vocab_size"], settings.rope_theta or cfg.model.rope_theta,
                     f"{meta['folder']}/tokenizer.json", meta, out, settings.rope_scaling)
