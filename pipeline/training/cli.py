"""Train FakeReasoning with DeepSpeed.

The same command as `fakereasoning-train`, `python -m pipeline.training` and
(from a checkout) `launch/train.py`. Under the launcher:

    deepspeed --num_gpus 8 launch/train.py --config fakereasoning-13b           (a checkout)
    deepspeed --num_gpus 8 --module pipeline.training --config fakereasoning-13b (installed package)
    deepspeed --hostfile launch/hostfile.example launch/train.py --config RECIPE.yaml optim.lr=1e-5
    deepspeed --num_gpus 2 launch/train.py --config tiny-cpu data.train_shards=DIR

--config is a recipe file or the name of a packaged recipe (tiny-cpu,
fakereasoning-13b; they live in pipeline/training/recipes/, which a checkout
also shows as launch/recipes/). Anything after the recipe is a
`dotted.field=value` override of the recipe (values are YAML: 1e-4, true,
null, [0.9, 0.95]). This file only parses arguments; pipeline/training/run.py
does the work.

Before queueing, without a GPU (pipeline/training/plan.py):

    fakereasoning-train --config fakereasoning-13b --check --plan --gpus 8 --gpu a800-40gb
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    from pipeline.training.plan import GPUS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="training recipe: a YAML file or a packaged recipe's name (tiny-cpu, fakereasoning-13b)")
    p.add_argument("--resume", default=None,
                   help="shorthand for checkpoint.resume: 'auto' (newest complete checkpoint) or a tag folder")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe, the overrides and every input path, print the config, exit")
    plan = p.add_argument_group("planning (--check --plan: memory and time on a cluster, no GPU needed)")
    plan.add_argument("--plan", action="store_true",
                      help="with --check: print the per-GPU memory, the verdict and the time of this recipe on "
                           "--nodes x --gpus GPUs of kind --gpu (the model on the meta device; no weights read)")
    plan.add_argument("--gpus", type=int, default=8, help="GPUs per node for --plan (default 8)")
    plan.add_argument("--nodes", type=int, default=1, help="nodes for --plan (default 1)")
    plan.add_argument("--gpu", default="h100-80gb", choices=list(GPUS), metavar="KIND",
                      help=f"GPU kind for --plan (default h100-80gb): {', '.join(GPUS)}")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the time (default 0.4)")
    plan.add_argument("--samples", type=int, default=None,
                      help="training samples per epoch (default: the shard set's count, else MMFR's 100,000)")
    plan.add_argument("--positions", type=int, default=None,
                      help="mean LLM positions per sample for the time (default: the longest, an upper bound)")
    plan.add_argument("--plan-json", default=None, metavar="FILE", help="also write the plan as JSON")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment anyway.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = p.parse_args(argv)
    if args.plan and not args.check:
        p.error("--plan goes with --check (it starts nothing)")
    for name in ("gpus", "nodes", "samples", "positions"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if not 0 < args.mfu <= 1:
        p.error(f"--mfu must be in (0, 1], got {args.mfu}")
    return args


def main(argv=None) -> int:
    # Before torch starts any thread: threads and loader workers inherit the mask,
    # so the stop signals reach only the thread that waits for them
    # (pipeline/training/preemption.py; preemption.enabled=false unblocks them).
    # Only a run that trains keeps them blocked to its exit; --check, a bad
    # config or --help give the caller its mask back (tests call main in-process).
    from pipeline.process_signals import block_signals, restore_signal_mask

    previous_mask = block_signals()
    try:
        checked = _checked_config(argv)
    except BaseException:  # --help and argparse errors exit through here
        restore_signal_mask(previous_mask)
        raise
    if isinstance(checked, int):
        restore_signal_mask(previous_mask)
        return checked
    from pipeline.training.run import train

    train(checked)
    return 0


def _checked_config(argv):
    """The validated config; or the exit status: 0 after --check, 2 on a config error."""
    args = parse_args(argv)
    from pipeline.cli_config import checked_config
    from pipeline.input_paths import check_train_inputs
    from pipeline.training.batch import launcher_world_size, plan_for
    from pipeline.training.config import load_train_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")

    def build():
        cfg = load_train_config(args.config, overrides)
        check_train_inputs(cfg)  # every input path, for --check and at start-up alike
        # The global batch on the launcher's world size, before a process group exists.
        plan_for(cfg, launcher_world_size())
        return cfg

    if args.plan:
        return _plan(args, overrides)
    return checked_config(build, args.check)


def _plan(args, overrides: list[str]) -> int:
    """--check --plan: the plan printed (and written as JSON); 2 on a config error.
    The input paths are checked but not needed: a missing one is a note, so that a
    recipe can be planned before its data and models are downloaded."""
    from common.config_loading import ConfigError
    from pipeline.cli_config import EXIT_BAD_CONFIG
    from pipeline.input_paths import check_train_inputs
    from pipeline.training.config import load_train_config
    from pipeline.training.plan import PlanInputs, format_plan, make_plan, write_plan_json

    try:
        cfg = load_train_config(args.config, overrides)
        plan = make_plan(cfg, PlanInputs(gpus_per_node=args.gpus, nodes=args.nodes, gpu=args.gpu, mfu=args.mfu,
                                         samples=args.samples, positions=args.positions))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    try:
        check_train_inputs(cfg)
    except ConfigError as e:
        plan.notes.append(f"inputs not ready for a run (the plan does not need them): {e}")
    print(format_plan(plan, args.config))
    if args.plan_json:
        write_plan_json(plan, args.plan_json)
        print(f"plan JSON: {args.plan_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
