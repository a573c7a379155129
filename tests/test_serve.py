"""`r1kit serve` against the official openai client, on loopback, with a real server process.

The model is rigged so its output is known: every layer's residual write is zeroed, so each next
token depends only on the current one, and the output head maps "\\n" -> "H" -> "m" -> "</think>" ->
"O" -> "K" -> eos, and "Z" -> "Z" forever. R1's generation prompt ends in "<think>\\n", so a chat
completion is the reasoning "Hm" and the answer "OK".
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

import r1kit
from r1kit.model import ModelConfig, Transformer
from r1kit.serve import ReasoningStream
from r1kit.tokenizer import EOS_TOKEN, THINK_CLOSE, split_reasoning, train_tokenizer

REPO = Path(__file__).resolve().parent.parent


def rigged_model(tokenizer) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tokenizer.vocab_size,
                                            max_position_embeddings=4096)).eval()
    tid = lambda s: tokenizer.token_to_id(s) if s in (THINK_CLOSE, EOS_TOKEN) else tokenizer.encode(s)[0]
    chain = [("\n", "H"), ("H", "m"), ("m", THINK_CLOSE), (THINK_CLOSE, "O"), ("O", "K"), ("K", EOS_TOKEN), ("Z", "Z")]
    hidden = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.zero_()
        model.lm_head.weight.zero_()
        for j, (src, dst) in enumerate(chain):
            model.model.embed_tokens.weight[tid(src)] = torch.nn.functional.one_hot(torch.tensor(j), hidden).float()
        for j, (src, dst) in enumerate(chain):
            model.lm_head.weight[tid(dst)] += 10 * torch.nn.functional.one_hot(torch.tensor(j), hidden).float()
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_tokenizer(["hello"], kind="char")
    folder = tmp_path_factory.mktemp("serve") / "tiny-r1"
    r1kit.save(rigged_model(tokenizer), tokenizer, folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "r1kit.serve", str(model_dir), "--port", str(port), "--max-batch-size", "4",
         "--max-waiting", "1", "--threads", "1", "--max-seq-len", "2048"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("server did not start")
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "Say OK."}]


def test_models_and_plain_chat(client):
    assert [m.id for m in client.models.list().data] == ["tiny-r1"]
    resp = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, temperature=0.6, seed=1)
    msg = resp.choices[0].message
    assert msg.reasoning_content == "Hm"
    assert msg.content == "OK"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage.completion_tokens == 6  # H m </think> O K eos
    assert resp.usage.prompt_tokens > 0


def test_streaming_chat_sends_reasoning_first_then_content(client):
    stream = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True})
    kinds, reasoning, content, finish, usage = [], "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            r = getattr(choice.delta, "reasoning_content", None)
            if r:
                kinds.append("r")
                reasoning += r
            if choice.delta.content:
                kinds.append("c")
                content += choice.delta.content
            finish = choice.finish_reason or finish
    assert reasoning == "Hm" and content == "OK" and finish == "stop"
    assert kinds == sorted(kinds, key=lambda k: k != "r") and "r" in kinds and "c" in kinds
    assert usage.completion_tokens == 6


def test_n_samples_and_stop_strings(client):
    resp = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, n=3, temperature=1.0)
    assert len(resp.choices) == 3 and sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.message.content == "OK" and c.message.reasoning_content == "Hm" for c in resp.choices)
    resp = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, stop=["K"])
    assert resp.choices[0].message.content == "O" and resp.choices[0].finish_reason == "stop"
    resp = client.chat.completions.create(model="tiny-r1", messages=MESSAGES, max_tokens=2)
    assert resp.choices[0].message.reasoning_content == "Hm"
    assert resp.choices[0].message.content == "" and resp.choices[0].finish_reason == "length"
    text = client.completions.create(model="tiny-r1", prompt="go\n", max_tokens=20)
    assert text.choices[0].text == "Hm</think>OK" and text.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-r1", prompt="go\n", max_tokens=20, stream=True) if c.choices)
    assert streamed == "Hm</think>OK"


def test_bad_requests_get_openai_style_4xx(client, server):
    def check(call, status, words):
        with pytest.raises(openai.APIStatusError) as info:
            call()
        assert info.value.status_code == status
        error = info.value.response.json()["error"]
        assert words in error["message"] and error["type"]

    create = client.chat.completions.create
    check(lambda: create(model="tiny-r1", messages=MESSAGES, extra_body={"frobnicate": 1}), 400, "unknown field")
    check(lambda: create(model="tiny-r1", messages=MESSAGES, max_tokens=100_000), 400, "max_tokens")
    check(lambda: create(model="tiny-r1", messages=MESSAGES, max_tokens=0), 400, "max_tokens")
    check(lambda: create(model="tiny-r1", messages=MESSAGES, temperature=-1), 400, "temperature")
    check(lambda: create(model="tiny-r1", messages=[{"role": "user", "content": "x " * 1100}]), 400, "context")
    check(lambda: create(model="nope", messages=MESSAGES), 404, "not served")
    check(lambda: create(model="tiny-r1", messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "OK", "reasoning_content": "Hm"},
        {"role": "user", "content": "again"}]), 400, "reasoning_content")
    raw = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=10,
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "JSON" in raw.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/nothing", timeout=10).json()["error"]["code"] == "not_found"
    # the server is still fine
    assert create(model="tiny-r1", messages=MESSAGES).choices[0].message.content == "OK"


def test_disconnect_frees_rows_and_queue_is_bounded(server):
    body = {"model": "tiny-r1", "prompt": "Z", "max_tokens": 2000, "n": 4, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server}/v1/completions", json=body) as long:
            lines = long.iter_lines()  # kept alive: closing the iterator would close the connection
            while not next(lines).startswith("data:"):
                pass  # the first token is out: all 4 rows are busy
            waiting = {}

            def queued():  # waits for rows: fills the one-request queue
                with httpx.Client(timeout=60) as h2:
                    r = h2.post(f"{server}/v1/completions", json={"model": "tiny-r1", "prompt": "go\n",
                                                                   "max_tokens": 20})
                    waiting["response"] = r

            t = threading.Thread(target=queued)
            t.start()
            deadline = time.time() + 10
            while httpx.get(f"{server}/health").json()["waiting"] < 1 and time.time() < deadline:
                time.sleep(0.05)
            too_many = http.post(f"{server}/v1/completions", json={"model": "tiny-r1", "prompt": "go\n"})
            assert too_many.status_code == 429
            assert too_many.json()["error"]["code"] == "rate_limit_exceeded"
        # the long stream's client went away: its rows free up and the queued request runs
        t.join(timeout=60)
    assert waiting["response"].status_code == 200
    assert waiting["response"].json()["choices"][0]["text"] == "Hm</think>OK"
    deadline = time.time() + 10
    while httpx.get(f"{server}/health").json()["busy_rows"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "busy_rows": 0, "waiting": 0}


def test_api_key_and_bad_checkpoint_in_process(model_dir, tmp_path):
    from fastapi.testclient import TestClient

    from r1kit.serve import create_app

    app = create_app(str(model_dir), api_key="sekrit", max_batch_size=2, max_seq_len=128)
    with TestClient(app) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
        ok = http.post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "OK"
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        create_app(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ValueError, match="not supported"):
        create_app(str(tmp_path / "bad"))
    cli = subprocess.run([sys.executable, "-m", "r1kit.serve", str(tmp_path / "missing")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "no such model folder" in cli.stderr and "Traceback" not in cli.stderr


@pytest.mark.parametrize("text,opened", [
    ("Let me think.\n\nSo 4.\n</think>\n\nThe answer is 4.  \n", True),
    ("  <think>\nhmm</think>ok", False),
    ("no thinking at all  ", False),
    ("truncated thinking", True),
    ("a</thin>b</think>c</think>d", True),
    ("<thi", False),
])
def test_reasoning_stream_agrees_with_split_reasoning(text, opened):
    whole = split_reasoning(text, prompt_opened_think=opened)
    for size in (1, 2, 3, 7, len(text)):
        stream = ReasoningStream(opened)
        parts = []
        for i in range(0, len(text), size):
            parts += stream.feed(text[i:i + size])
        parts += stream.finish()
        reasoning = "".join(t for k, t in parts if k == "reasoning")
        content = "".join(t for k, t in parts if k == "content")
        assert reasoning == (whole.reasoning or "") and content == whole.answer
        kinds = [k for k, _ in parts]
        assert kinds == sorted(kinds, key=lambda k: k != "reasoning")  # reasoning first
