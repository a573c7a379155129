"""The `r1kit` command. It only parses arguments and calls one function per command.

Each command lives in the module that owns it: that module defines `add_arguments(parser)` and
`main(args)`. Modules are imported only when their command runs, so `r1kit --help` stays fast
and a command's heavy dependencies (torch, fastapi) load only when needed.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("r1kit.quickstart", "the whole R1 story in miniature on this machine (tokenizer, base, R1-Zero GRPO, distillation, report)"),
    "run": ("r1kit.pipeline", "run a pipeline recipe (recipes/*.toml), resuming at the first unfinished stage"),
    "train": ("r1kit.train.cli", "train: `r1kit train sft|pretrain|grpo --config FILE`"),
    "distill": ("r1kit.train.distill", "rejection-sample a teacher and train a student on what verifies"),
    "eval": ("r1kit.eval", "evaluate a checkpoint on a benchmark (pass@1 over k samples, cons@k, pass@k)"),
    "chat": ("r1kit.chat", "terminal chat with a reasoning model"),
    "serve": ("r1kit.serve", "OpenAI-compatible HTTP server with reasoning_content"),
    "export": ("r1kit.export", "export a checkpoint for other tools (gguf)"),
    "plan": ("r1kit.train.plan", "estimate a run's peak memory per device before launching it"),
    "info": ("r1kit.model.info", "show a model preset or checkpoint: shapes, parameters, cache size"),
}


def build_parser(argv_command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1kit", description="DeepSeek-R1 end to end in PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == argv_command:  # only the chosen command's module is imported
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        result = module.main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, KeyError) as err:
        # errors a user can cause carry a message that names the problem and the fix
        if getattr(args, "debug", False):
            raise
        print(f"r1kit {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
