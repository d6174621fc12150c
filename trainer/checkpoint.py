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
    def __init__(self, folder: Path, keep: int):
        self.folder, self.keep = Path(folder), keep

    def tags(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir() if p.is_dir() and p.name.startswith("step-"))

    def save(self, engine, step: int, client: dict, prune: bool) -> str:
        """Every rank saves its part; ``prune`` (rank 0) then removes all but the newest ``keep``."""
        tag = f"step-{step:09d}"
        engine.save_checkpoint(str(self.folder), tag=tag, client_state=client)
        if prune:
            for old in self.tags()[: -self.keep]:
                shutil.rmtree(self.folder / old, ignore_errors=True)
        return tag

    def load_latest(self, engine) -> tuple[str, dict] | None:
        """(tag, client state) of the newest checkpoint, loaded into the engine; None when there is none."""
        tags = self.tags()
        if not tags:
            return None
        _, client = engine.load_checkpoint(str(self.folder), tag=tags[-1])
        return tags[-1], client


def export(recipe: Recipe, out: str, tag: str | None = None) -> str:
    """A checkpoint (default: the latest) of the recipe's run → a Hugging Face folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from trainer.model import export_hf

    cfg = recipe.trainer
    ckpt_dir = Path(cfg.runs_dir or f"{recipe.lake}/runs") / cfg.run_name / "checkpoints"
    tags = Checkpoints(ckpt_dir, cfg.keep_checkpoints).tags()
    if not tags:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}; train first: tokenmill train --recipe {recipe.origin}")
    tag = tag or tags[-1]
    if cfg.zero_stage == 3:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        state = torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    _, meta = load_tokenizer(recipe)
    theta = stage_settings(cfg, cfg.stage or recipe.feed.stage).rope_theta or cfg.model.rope_theta
    return export_hf(state, cfg.model, meta["model_vocab_size"], theta, f"{meta['folder']}/tokenizer.json", meta, out)
