"""The streaming trainer: tails the chunk store and trains a Llama model with DeepSpeed.

    tokenmill train --recipe R [--max-steps N] [--exit-when-idle S] [--export FOLDER]
    deepspeed --num_gpus N -m trainer.daemon --recipe R        torchrun --nproc-per-node N -m trainer.daemon ...

Each loop claims the next ready chunk of the stage, verifies it, trains on it and marks it consumed
(``trainer/loop.py``); callbacks watch the run (``trainer/callbacks.py``). Everything it does to
chunks goes to ``trainer_events``; metrics and checkpoints go to the run's folder.
"""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from lake.fs import check_lake_writable, end_process
from lake.recipe import parse_with_recipe
from trainer.checkpoint import export
from trainer.loop import Trainer


def main(argv: list[str] | None = None) -> int:
    code = _train(argv)
    if argv is not None:
        return code
    if dist.is_initialized():  # every rank has finished its last collective: leave the group, then the process
        dist.destroy_process_group()
    return end_process(code)  # run as a program: see lake/fs.end_process


def _train(argv: list[str] | None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (in all)")
        parser.add_argument("--exit-when-idle", type=float, help="stop after this many seconds with no ready chunk")
        parser.add_argument("--export", metavar="FOLDER", help="export the latest checkpoint to a Hugging Face folder")
        parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # set by the deepspeed launcher

    args, recipe = parse_with_recipe("tokenmill train", __doc__.split("\n\n")[0], argv, arguments)
    if recipe is None:
        return 2
    check_lake_writable(recipe.lake)
    if args.export:
        print(f"exported to {export(recipe, args.export)}")
        return 0
    Trainer(recipe, args.max_steps, args.exit_when_idle).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
