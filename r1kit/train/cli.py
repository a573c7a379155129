"""`r1kit train sft|pretrain|grpo --config FILE [key=value ...]`

The recipe is a TOML file of the trainer's settings; any key can be overridden on the command line
(`learning_rate=1e-4 output_dir=runs/x`). Under torchrun, run the same command with
`python -m torch.distributed.run ... -m r1kit train sft --config FILE` (see README).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from r1kit.train.config import load_recipe, parse_overrides, read_toml

KINDS = ("sft", "pretrain", "grpo")


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="TOML recipe (recipes/*.toml)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the newest checkpoint in output_dir (or the given checkpoint folder)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed dataset rows")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="sft: loss on completions; pretrain: on all text; grpo: RL")
    _add_options(parser)
    # argparse cannot take positionals after options (`sft --config F lr=1e-4`), so everything after
    # the kind is collected here and parsed intermixed in main()
    parser.add_argument("rest", nargs=argparse.REMAINDER, metavar="KEY=VALUE ...",
                        help="recipe keys to override, e.g. learning_rate=1e-4 output_dir=runs/x")


def _parse_rest(args: argparse.Namespace) -> list[str]:
    inner = argparse.ArgumentParser(prog=f"r1kit train {args.kind}")
    _add_options(inner)
    inner.add_argument("overrides", nargs="*")
    extra = inner.parse_intermixed_args(args.rest or [])
    if extra.resume and "=" in extra.resume and not Path(extra.resume).exists():
        extra.overrides.insert(0, extra.resume)  # `--resume key=value`: the flag took an override
        extra.resume = "latest"
    for name in ("config", "resume"):
        if getattr(extra, name) is not None:
            setattr(args, name, getattr(extra, name))
    args.skip_bad_rows = args.skip_bad_rows or extra.skip_bad_rows
    args.debug = args.debug or extra.debug
    return extra.overrides


def main(args: argparse.Namespace) -> int:
    overrides = parse_overrides(_parse_rest(args))
    if args.kind == "grpo":
        from r1kit.train import grpo  # written by the RL side; imported only when asked for

        cfg = read_toml(args.config) if args.config else {}
        if args.resume is not None:
            overrides["resume"] = True
        table = cfg["grpo"] if isinstance(cfg.get("grpo"), dict) else cfg  # keys at top level or in [grpo]
        table.update(overrides)
        grpo.main_from_config(cfg, source=str(args.config or "command line"))
        return 0

    from r1kit.train.sft import SFTConfig, main_from_config

    if args.resume is not None:
        overrides["resume_from_checkpoint"] = args.resume
    if args.skip_bad_rows:
        overrides["skip_bad_rows"] = True
    recipe_mode = overrides.get("mode") or (read_toml(args.config).get("mode") if args.config else None)
    if recipe_mode is not None and recipe_mode != args.kind:
        raise ValueError(f"{args.config or 'command line'}: the recipe says mode={recipe_mode!r} but the command "
                         f"is `r1kit train {args.kind}`; use `r1kit train {recipe_mode}`")
    overrides["mode"] = args.kind
    config = load_recipe(SFTConfig, args.config, overrides)
    return main_from_config(config)
