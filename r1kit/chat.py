"""`r1kit chat PATH`: talk to a reasoning model in the terminal.

The thinking streams dimmed as it is written; once the answer starts it folds into one line
("thought for 2.1 s") and `/think` unfolds it. Commands: /reset (new conversation), /think, /exit.
Multi-line input: end a line with a backslash to continue it, or wrap a block in lines of three
double quotes.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator

HELP = ('commands: /reset  new conversation | /think  show the last thinking | /exit  quit\n'
        'multi-line: end a line with \\ to continue, or put """ on its own line before and after a block')


def read_messages(lines: Iterable[str]) -> Iterator[str]:
    """Lines typed -> messages: backslash continuations and triple-quoted blocks join lines."""
    block: list[str] | None = None
    pending: list[str] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if block is not None:
            if line.strip() == '"""':
                yield "\n".join(block)
                block = None
            else:
                block.append(line)
            continue
        if line.strip() == '"""' and not pending:
            block = []
            continue
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        yield "\n".join(pending + [line])
        pending = []
    if block:
        yield "\n".join(block)
    elif pending:
        yield "\n".join(pending)


class Display:
    """Where the conversation is shown: rich with a folding thinking panel on a terminal, plain text
    (thinking between <think> tags) otherwise."""

    def __init__(self, out=None, fold: bool = True):
        from rich.console import Console

        self.out = out or sys.stdout
        self.console = Console(file=self.out, highlight=False, soft_wrap=True)
        self.fancy = self.console.is_terminal
        self.fold = fold and self.fancy
        self.live = None
        self.thinking = ""
        self.started = 0.0

    def begin(self) -> None:
        self.thinking, self.started, self.live = "", time.time(), None

    def reasoning(self, text: str) -> None:
        if not self.thinking and not self.fancy:
            self.out.write("<think>\n")
        self.thinking += text
        if self.fold:
            from rich.live import Live
            from rich.text import Text

            tail = "\n".join(self.thinking.splitlines()[-6:])  # a window on the latest thinking
            if self.live is None:
                self.live = Live(Text(tail, style="dim"), console=self.console, transient=True,
                                 refresh_per_second=12)
                self.live.start()
            else:
                self.live.update(Text(tail, style="dim"))
        elif self.fancy:
            self.console.print(text, style="dim", end="")
        else:
            self.out.write(text)
            self.out.flush()

    def end_reasoning(self) -> None:
        if not self.thinking:
            return
        seconds = time.time() - self.started
        if self.live is not None:
            self.live.stop()
            self.live = None
        if self.fancy:
            note = "; /think shows it" if self.fold else ""
            lead = "" if self.fold else "\n"
            self.console.print(f"{lead}[dim]▸ thought for {seconds:.1f} s ({len(self.thinking)} chars{note})[/dim]")
        else:
            self.out.write("\n</think>\n")

    def content(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def line(self, text: str = "", style: str | None = None) -> None:
        if self.fancy and style:
            self.console.print(text, style=style)
        else:
            self.out.write(text + "\n")
            self.out.flush()


class ChatSession:
    def __init__(self, engine, params, system: str | None = None, display: Display | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.display = display or Display()
        self.messages: list[dict] = []
        self.last_thinking = ""

    def reset(self) -> None:
        self.messages = []

    def handle(self, message: str) -> bool:
        """One input; False to quit."""
        text = message.strip()
        if text in ("/exit", "/quit"):
            return False
        if text == "/reset":
            self.reset()
            self.display.line("(new conversation)", style="dim")
            return True
        if text == "/think":
            self.display.line(self.last_thinking or "(no thinking yet)", style="dim")
            return True
        if text in ("/help", "/?"):
            self.display.line(HELP, style="dim")
            return True
        if not text:
            return True
        if text.startswith("/"):
            self.display.line(f"unknown command {text.split()[0]}; {HELP}", style="red")
            return True
        self.respond(message)
        return True

    def respond(self, user_text: str) -> None:
        from dataclasses import replace

        from r1kit.serve import ReasoningStream, prompt_opens_think

        tokenizer, engine = self.engine.tokenizer, self.engine
        messages = self.messages + [{"role": "user", "content": user_text}]
        if self.system:
            messages = [{"role": "system", "content": self.system}] + messages
        prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer.encode(prompt_text)
        room = engine.max_seq_len - len(ids)
        if room < 1:
            self.display.line(f"error: the conversation ({len(ids)} tokens) no longer fits the context of "
                              f"{engine.max_seq_len} tokens; /reset to start over", style="red")
            return
        params = replace(self.params, max_tokens=min(self.params.max_tokens, room), n=1)
        splitter = ReasoningStream(prompt_opens_think(prompt_text))
        display = self.display
        display.begin()
        whole, in_content = "", False
        for delta in engine.stream(ids, params):
            whole += delta.text
            parts = splitter.feed(delta.text)
            if delta.finish_reason:
                parts += splitter.finish()
            for kind, text in parts:
                if kind == "reasoning":
                    display.reasoning(text)
                else:
                    if not in_content:
                        display.end_reasoning()
                        in_content = True
                    display.content(text)
            if delta.finish_reason == "length":
                if not in_content:
                    display.end_reasoning()
                    in_content = True
                display.line("")
                display.line(f"[stopped at max tokens ({params.max_tokens})]", style="yellow")
        if not in_content:
            display.end_reasoning()
        display.line("")
        self.last_thinking = display.thinking
        # the template keeps only the answer of earlier turns; the whole text is passed and cut there
        self.messages = messages[1:] if self.system else messages
        self.messages.append({"role": "assistant", "content": whole})

    def run(self, lines: Iterable[str]) -> None:
        for message in read_messages(lines):
            if not self.handle(message):
                break


def _input_lines(display: Display) -> Iterator[str]:
    """Lines from the terminal (with a prompt) or from a pipe."""
    interactive = sys.stdin.isatty()
    continuing = False
    while True:
        try:
            line = input("... " if continuing else ">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and line == "":
            return
        line = line.rstrip("\n")
        continuing = line.endswith("\\") or (line.strip() == '"""' and not continuing) or (
            continuing and line.strip() != '"""')
        yield line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="model folder (config.json + safetensors + tokenizer.json)")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only linear layers")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--temperature", type=float, default=0.6, help="R1's recommended 0.6")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=2048, help="most tokens per answer (thinking included)")
    parser.add_argument("--max-seq-len", type=int, default=None, help="context (default min(4096, the model's))")
    parser.add_argument("--system", default=None, help="system prompt (R1 recommends none)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--show-thinking", action="store_true", help="keep the thinking on screen (no folding)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step (CUDA graphs on a GPU; on a CPU the default C decode path is faster for small models); the first answer waits for it")


def main(args) -> int:
    from r1kit.engine import SamplingParams
    from r1kit.serve import load_engine

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    engine = load_engine(args.path, max_batch_size=1, max_seq_len=args.max_seq_len, quantize=args.quantize,
                         dtype=args.dtype, num_threads=args.threads, compile=args.compile)
    display = Display(fold=not args.show_thinking)
    session = ChatSession(engine, params, system=args.system, display=display)
    display.line(f"r1kit chat: {args.path} ({engine.config.model_type}). /help for commands.", style="bold")
    session.run(_input_lines(display))
    return 0


if __name__ == "__main__":
    from r1kit.cli import main as cli_main

    sys.exit(cli_main(["chat", *sys.argv[1:]]))
