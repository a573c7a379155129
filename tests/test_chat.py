"""`r1kit chat`: the thinking and the answer stream apart; commands and multi-line input work."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

import r1kit
from r1kit.chat import ChatSession, Display, read_messages
from r1kit.engine import Engine, SamplingParams
from r1kit.tokenizer import train_tokenizer
from test_serve import rigged_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rigged():
    tokenizer = train_tokenizer(["hello"], kind="char")
    return rigged_model(tokenizer), tokenizer


def test_read_messages_joins_continuations_and_blocks():
    lines = ["hello", "two \\", "lines", '"""', "a", "", "b", '"""', "/reset"]
    assert list(read_messages(lines)) == ["hello", "two \nlines", "a\n\nb", "/reset"]


def test_session_streams_thinking_then_answer_and_keeps_history(rigged):
    model, tokenizer = rigged
    out = io.StringIO()
    session = ChatSession(Engine(model, tokenizer, max_seq_len=256), SamplingParams(temperature=0.6, max_tokens=50),
                          display=Display(out=out))
    session.run(["Say OK", "again", "/think", "/reset", '"""', "multi", "line", '"""', "/bogus", "/exit", "never"])
    text = out.getvalue()
    assert text.count("<think>\nHm\n</think>\nOK") == 3  # plain output (not a terminal): tags around thinking
    assert "(new conversation)" in text and "unknown command /bogus" in text
    assert session.last_thinking == "Hm"
    assert session.messages == [{"role": "user", "content": "multi\nline"},
                                {"role": "assistant", "content": "Hm</think>OK"}]


def test_cli_chat_end_to_end_and_bad_path(rigged, tmp_path):
    model, tokenizer = rigged
    r1kit.save(model, tokenizer, tmp_path / "m")
    run = subprocess.run([sys.executable, "-m", "r1kit.cli", "chat", str(tmp_path / "m"), "--threads", "1"],
                         input="Say OK\n/exit\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Hm" in run.stdout and "OK" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "r1kit.cli", "chat", str(tmp_path / "nope")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "no such model folder" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
