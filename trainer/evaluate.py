"""Few-shot accuracy of one checkpoint, on demand (the loop measures it every ``trainer.fewshot.every`` steps).

    tokenmill eval --recipe R [--checkpoint PATH] [--sets builtin,arc] [--out FILE]

``--checkpoint`` is a checkpoint of the recipe's run (its folder ``<run>/checkpoints/step-NNNNNNNNN``
or only its name; default: the latest) or a Hugging Face folder (``tokenmill train --export``). The
sets are ``trainer.fewshot``'s (``trainer/fewshot.py``), all of them unless ``--sets`` names some.
It prints each set's accuracy with its number of items and the chance level, and writes them as JSON:
for a run's checkpoint to ``<run>/fewshot/<checkpoint>.json`` and, at the checkpoint's step, to the
run's TensorBoard (``fewshot/<set>/acc``); for a Hugging Face folder to ``<folder>/fewshot.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from lake.artifacts import load_tokenizer
from lake.recipe import Recipe, parse_with_recipe
from lake.tables import Lake
from trainer import fewshot
from trainer.checkpoint import Checkpoints, model_state, run_checkpoints
from trainer.engine import stage_settings


def main(argv: list[str] | None = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", help="a checkpoint folder (or name) of the run, or a Hugging Face folder; "
                                                 "default: the run's latest checkpoint")
        parser.add_argument("--sets", help="comma-separated set names (default: all of trainer.fewshot's)")
        parser.add_argument("--out", help="the JSON file to write (default: beside the run's checkpoints, or in the "
                                          "Hugging Face folder)")

    args, recipe = parse_with_recipe("tokenmill eval", __doc__.split("\n\n")[0], argv, arguments)
    if recipe is None:
        return 2
    only = [s.strip() for s in args.sets.split(",") if s.strip()] if args.sets else None
    try:
        evaluate_checkpoint(recipe, args.checkpoint, only, args.out)
    except (fewshot.FewShotSetError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def evaluate_checkpoint(recipe: Recipe, checkpoint: str | None = None, only: list[str] | None = None,
                        out: str | None = None, log=print) -> dict:
    """Every set's result for the checkpoint (see the module's docstring); the JSON written."""
    cfg = recipe.trainer
    loaded = _load(recipe, checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.bf16 and device == "cuda" else torch.float32
    model = loaded.model.to(device=device, dtype=dtype)
    sets = fewshot.load_sets(cfg.fewshot, Lake(recipe.lake), loaded.tokenizer, [loaded.eos_id], only, log=log)
    if not sets:
        raise fewshot.FewShotSetError(f"no few-shot set to evaluate: trainer.fewshot has no sets and no built-in "
                                      f"set (trainer.fewshot.builtin, or no held-out documents in {recipe.lake})")
    stage = cfg.stage or recipe.feed.stage
    width = recipe.feed.stages[stage].seq_len + 1 if stage in recipe.feed.stages else None
    score = fewshot.model_loglikelihood(model, cfg.fewshot.batch_tokens, loaded.pad_id)
    results = fewshot.evaluate(sets, score, cfg.fewshot.seed, width)
    step = f"step {loaded.step}" if loaded.step is not None else "no step (a Hugging Face folder)"
    log(f"few-shot evaluation of {loaded.path} ({step}) on {device}:")
    log(f"  {'set':<16} {'items':>6} {'chance':>7} {'acc':>6} {'acc_norm':>9}")
    for name, r in results.items():
        log(f"  {name:<16} {r.items:>6} {r.chance:>7.3f} {r.acc:>6.3f} {r.acc_norm:>9.3f}")
    shots = {t.name: t.shots for t in sets}
    payload = {"checkpoint": str(loaded.path), "step": loaded.step, "evaluated_at": datetime.now(timezone.utc).isoformat(),
               "sets": {name: {"acc": r.acc, "acc_norm": r.acc_norm, "items": r.items, "chance": r.chance,
                               "shots": shots[name]} for name, r in results.items()}}
    target = Path(out) if out else loaded.default_out
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if loaded.run_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(loaded.run_dir / "tensorboard")) as tb:
            for key, value in fewshot.as_metrics(results).items():
                tb.add_scalar(f"fewshot/{key}", value, loaded.step)
    log(f"wrote {target}")
    return payload


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    eos_id: int
    pad_id: int
    path: Path
    step: int | None  # None for a Hugging Face folder
    default_out: Path
    run_dir: Path | None  # the run whose checkpoint it is


def _load(recipe: Recipe, checkpoint: str | None) -> _Loaded:
    folder = Path(checkpoint) if checkpoint else None
    if folder is not None and (folder / "config.json").is_file():
        return _hugging_face(folder)
    return _run_checkpoint(recipe, checkpoint)


def _hugging_face(folder: Path) -> _Loaded:
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: a Hugging Face folder without tokenizer.json (tokenmill train --export "
                                f"writes both)")
    model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
    return _Loaded(model, Tokenizer.from_file(str(folder / "tokenizer.json")), eos, pad, folder, None,
                   folder / "fewshot.json", None)


def _run_checkpoint(recipe: Recipe, checkpoint: str | None) -> _Loaded:
    from trainer.model import model_from_state

    cfg = recipe.trainer
    run = run_checkpoints(recipe)
    if checkpoint and Path(checkpoint).is_dir():  # a folder of this run's or of another run's checkpoints
        folder = Path(checkpoint).resolve()
        checkpoints = Checkpoints(folder.parent, cfg.keep_checkpoints)
    elif checkpoint:  # a checkpoint's name in the recipe's run
        folder, checkpoints = run.folder / checkpoint, run
    elif run.tags():
        folder, checkpoints = run.folder / run.tags()[-1], run
    else:
        raise FileNotFoundError(f"no checkpoint in {run.folder}; train first: tokenmill train --recipe {recipe.origin}")
    if folder.name not in checkpoints.tags():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: neither a complete checkpoint (those in "
                                f"{checkpoints.folder}: {checkpoints.tags() or 'none'}) nor a Hugging Face folder "
                                f"(config.json)")
    tokenizer, meta = load_tokenizer(recipe)
    settings = stage_settings(cfg, cfg.stage or recipe.feed.stage)
    state = model_state(checkpoints.folder, folder.name, cfg.zero_stage)
    model = model_from_state(state, cfg.model, meta["model_vocab_size"], settings.rope_theta or cfg.model.rope_theta,
                             settings.rope_scaling)
    run_dir = checkpoints.folder.parent
    return _Loaded(model, tokenizer, meta["eos_id"], meta["pad_id"], folder, int(folder.name.removeprefix("step-")),
                   run_dir / "fewshot" / f"{folder.name}.json", run_dir)


if __name__ == "__main__":
    sys.exit(main())
