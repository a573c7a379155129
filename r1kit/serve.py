"""`r1kit serve PATH`: an OpenAI-compatible HTTP server that keeps the thinking apart, as DeepSeek's
API does.

    r1kit serve runs/quickstart/model --port 8000 [--api-key KEY] [--quantize int8]
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    msg = client.chat.completions.create(model="model", messages=[...]).choices[0].message
    msg.reasoning_content, msg.content          # the thinking, the answer

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both stream by SSE when
`stream` is true). Every request goes to one `Scheduler` (continuous batching), so concurrent
requests decode together; a client that disconnects frees its rows before the next step. Errors
are OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}} with a 4xx status.
"""

import argparse
import asyncio
import hmac
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from r1kit.tokenizer import THINK_CLOSE, THINK_OPEN, split_reasoning

DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_BATCH_SIZE = 8


# ---------------------------------------------------------------------------- reasoning in a stream


class ReasoningStream:
    """Splits streamed completion text into reasoning and content deltas, agreeing exactly with
    `split_reasoning(whole_text, prompt_opened_think)`: the reasoning deltas join to its `reasoning`
    and the content deltas to its `answer`. Text that may be part of a tag at a chunk edge, and
    whitespace that `strip()` would remove, are held back until the next chunk decides them."""

    def __init__(self, prompt_opened_think: bool):
        self.state = "reasoning" if prompt_opened_think else "start"
        self.buffer = ""
        self.at_start = True  # of the current part: leading whitespace is dropped
        self.saw_reasoning = prompt_opened_think

    def feed(self, text: str) -> list[tuple[str, str]]:
        """New text -> [("reasoning" | "content", delta), ...] in order."""
        self.buffer += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if not head or (len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head)):
                    return out  # could still become "<think>"
                if head.startswith(THINK_OPEN):
                    self.state, self.buffer, self.saw_reasoning = "reasoning", head[len(THINK_OPEN):], True
                else:
                    self.state, self.buffer = "content", head
                self.at_start = True
                continue
            if self.at_start:
                self.buffer = self.buffer.lstrip()
                if not self.buffer:
                    return out
                self.at_start = False
            if self.state == "reasoning":
                close = self.buffer.find(THINK_CLOSE)
                if close != -1:
                    self._emit(out, "reasoning", self.buffer[:close].rstrip())
                    self.state, self.buffer, self.at_start = "content", self.buffer[close + len(THINK_CLOSE):], True
                    continue
                hold = next((k for k in range(min(len(THINK_CLOSE) - 1, len(self.buffer)), 0, -1)
                             if self.buffer.endswith(THINK_CLOSE[:k])), 0)
                safe = self.buffer[: len(self.buffer) - hold].rstrip()
            else:
                safe = self.buffer.rstrip()
            self._emit(out, self.state, safe)
            self.buffer = self.buffer[len(safe):]
            return out

    def finish(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        if self.state == "start":
            self._emit(out, "content", self.buffer.strip())
        else:
            self._emit(out, self.state, self.buffer.strip() if self.at_start else self.buffer.rstrip())
        self.buffer = ""
        return out

    @staticmethod
    def _emit(out, kind, text):
        if text:
            out.append((kind, text))


def prompt_opens_think(prompt_text: str) -> bool:
    """R1's generation prompt ends in "<think>\\n": the completion starts inside the thinking."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


# ---------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------- request bodies


def _request_models():
    """pydantic models of the accepted bodies (built lazily: pydantic comes with fastapi)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Common(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str | None = None
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 or -1: off
        min_p: float = Field(0.0, ge=0.0, le=1.0)
        n: int = Field(1, ge=1, le=128)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict | None = None
        user: str | None = None
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0

    class ChatCompletionRequest(Common):
        messages: list[dict[str, Any]] = Field(..., min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)

    class CompletionRequest(Common):
        prompt: str | list[str] | list[int]

    return ChatCompletionRequest, CompletionRequest


def _chat_messages(messages: list[dict]) -> list[dict]:
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if "reasoning_content" in m:
            raise APIError(400, f"{where}: reasoning_content is not accepted in input messages; send back only "
                                "the assistant's content (as DeepSeek's API requires)", param=f"{where}.reasoning_content")
        unknown = set(m) - {"role", "content", "name"}
        if unknown:
            raise APIError(400, f"{where}: unknown fields {sorted(unknown)}", param=where)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role must be system, user or assistant, got {role!r}", param=f"{where}.role")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", param=f"{where}.content")
        out.append({"role": role, "content": content})
    return out


# ---------------------------------------------------------------------------- the app


def create_app(engine_or_model_path, model_name: str | None = None, api_key: str | None = None,
               max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_seq_len: int | None = None,
               max_waiting: int | None = None, quantize: str | None = None, dtype=None):
    """The FastAPI app serving one model. `engine_or_model_path`: an Engine (with a tokenizer), or a
    model folder to load (optionally quantized)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from r1kit.engine import Engine, QueueFull, SamplingParams, Scheduler

    if isinstance(engine_or_model_path, Engine):
        engine = engine_or_model_path
        model_name = model_name or "r1kit"
    else:
        engine = load_engine(engine_or_model_path, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                             quantize=quantize, dtype=dtype)
        model_name = model_name or Path(str(engine_or_model_path)).name
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("serving needs a tokenizer: the model folder has no tokenizer.json")
    scheduler = Scheduler(engine, max_waiting=max_waiting)
    ChatCompletionRequest, CompletionRequest = _request_models()
    created = int(time.time())

    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="r1kit", lifespan=lifespan)
    app.state.engine, app.state.scheduler, app.state.model_name = engine, scheduler, model_name

    # -------------------------------------------------------------- errors as OpenAI bodies
    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, err):
        return JSONResponse(APIError(400, str(err)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(request, err):
        return JSONResponse(APIError(500, f"internal error: {err}", type="server_error").body(), status_code=500)

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def parse(request: Request, schema):
        check_auth(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        try:
            req = schema.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(x) for x in first["loc"])
            msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
            raise APIError(400, f"{param}: {msg}", param=param) from None
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"model {req.model!r} is not served here; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported (leave them at 0)")
        return req

    def sampling_params(req, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        room = engine.max_seq_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this server's context is {engine.max_seq_len}",
                           param="messages", code="context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} is too large: the prompt has {prompt_len} tokens and "
                                f"the context is {engine.max_seq_len}, so at most {room}", param="max_tokens")
        if req.n > engine.max_batch_size:
            raise APIError(400, f"n={req.n} exceeds this server's max batch size ({engine.max_batch_size})", param="n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        try:
            return SamplingParams(n=req.n, max_tokens=max_tokens or room, temperature=req.temperature,
                                  top_p=req.top_p, top_k=req.top_k, min_p=req.min_p, stop=tuple(stop), seed=req.seed)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def submit_all(prompts: list[list[int]], params) -> tuple[list, asyncio.Queue]:
        """Submit each prompt; events arrive on one asyncio queue as (prompt_number, event)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        scheduler.start()
        requests = []
        try:
            for k, ids in enumerate(prompts):
                def on_event(ev, k=k):
                    loop.call_soon_threadsafe(events.put_nowait, (k, ev))
                requests.append(scheduler.submit(ids, params, on_event))
        except QueueFull as err:
            for r in requests:
                scheduler.cancel(r)
            raise APIError(429, str(err), type="rate_limit_error", code="rate_limit_exceeded") from None
        except ValueError as err:
            for r in requests:
                scheduler.cancel(r)
            raise APIError(400, str(err)) from None
        return requests, events

    async def next_events(requests, events, request: Request):
        """Yield (prompt_number, delta) until every request is done; cancel all if the client leaves."""
        remaining = len(requests)
        try:
            while remaining:
                try:
                    k, ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if ev is None:
                    remaining -= 1
                elif isinstance(ev, BaseException):
                    raise APIError(500, str(ev), type="server_error")
                else:
                    yield k, ev
        finally:
            for r in requests:
                if not r.done.is_set():
                    scheduler.cancel(r)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # -------------------------------------------------------------- endpoints
    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                             "owned_by": "r1kit", "max_model_len": engine.max_seq_len}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "busy_rows": scheduler.busy_rows, "waiting": len(scheduler.waiting)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await parse(request, ChatCompletionRequest)
        messages = _chat_messages(req.messages)
        try:
            prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as err:  # a template that refuses the conversation (jinja raise_exception)
            raise APIError(400, f"the chat template refused these messages: {err}", param="messages") from None
        opened = prompt_opens_think(prompt_text)
        ids = tokenizer.encode(prompt_text)
        params = sampling_params(req, len(ids), req.max_completion_tokens or req.max_tokens)
        requests, events = submit_all([ids], params)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not req.stream:
            texts, reasons, n_tokens = [""] * params.n, ["length"] * params.n, 0
            async for _, d in next_events(requests, events, request):
                texts[d.index] += d.text
                n_tokens += len(d.token_ids)
                if d.finish_reason:
                    reasons[d.index] = d.finish_reason
            choices = []
            for i in range(params.n):
                split = split_reasoning(texts[i], prompt_opened_think=opened)
                choices.append({"index": i, "message": {"role": "assistant", "content": split.answer,
                                                        "reasoning_content": split.reasoning},
                                "logprobs": None, "finish_reason": reasons[i]})
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": choices, "usage": usage(len(ids), n_tokens)}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(i, delta, finish=None, **extra):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

        async def body():
            splitters = [ReasoningStream(opened) for _ in range(params.n)]
            n_tokens = 0
            for i in range(params.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            try:
                async for _, d in next_events(requests, events, request):
                    n_tokens += len(d.token_ids)
                    parts = splitters[d.index].feed(d.text)
                    if d.finish_reason:
                        parts += splitters[d.index].finish()
                    for kind, text in parts:
                        key = "reasoning_content" if kind == "reasoning" else "content"
                        yield chunk(d.index, {key: text})
                    if d.finish_reason:
                        yield chunk(d.index, {}, d.finish_reason)
            except APIError as err:
                yield sse(err.body())
                return
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                           "choices": [], "usage": usage(len(ids), n_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        if isinstance(req.prompt, str):
            prompts = [tokenizer.encode(req.prompt)]
        elif req.prompt and all(isinstance(p, int) for p in req.prompt):
            prompts = [list(req.prompt)]
        else:
            prompts = [tokenizer.encode(p) for p in req.prompt]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        params = [sampling_params(req, len(p), req.max_tokens) for p in prompts]
        # one SamplingParams for all prompts: the tightest max_tokens when none was given
        params = min(params, key=lambda p: p.max_tokens)
        requests, events = submit_all(prompts, params)
        rid, now, n = f"cmpl-{uuid.uuid4().hex}", int(time.time()), params.n
        prompt_tokens = sum(len(p) for p in prompts)

        if not req.stream:
            texts, reasons, n_tokens = [""] * (len(prompts) * n), ["length"] * (len(prompts) * n), 0
            async for k, d in next_events(requests, events, request):
                texts[k * n + d.index] += d.text
                n_tokens += len(d.token_ids)
                if d.finish_reason:
                    reasons[k * n + d.index] = d.finish_reason
            choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                       for i in range(len(texts))]
            return {"id": rid, "object": "text_completion", "created": now, "model": model_name,
                    "choices": choices, "usage": usage(prompt_tokens, n_tokens)}

        async def body():
            n_tokens = 0
            try:
                async for k, d in next_events(requests, events, request):
                    n_tokens += len(d.token_ids)
                    if d.text or d.finish_reason:
                        yield sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                                   "choices": [{"index": k * n + d.index, "text": d.text, "logprobs": None,
                                                "finish_reason": d.finish_reason}]})
            except APIError as err:
                yield sse(err.body())
                return
            if (req.stream_options or {}).get("include_usage"):
                yield sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                           "choices": [], "usage": usage(prompt_tokens, n_tokens)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


# ---------------------------------------------------------------------------- loading and the CLI


def load_engine(path, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, max_seq_len: int | None = None,
                quantize: str | None = None, dtype=None, num_threads: int | None = None, compile: bool = False):
    """Load a model folder into an Engine (the shared start of `serve` and `chat`)."""
    import r1kit
    from r1kit.engine import Engine

    path = Path(str(path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model folder (expected config.json, *.safetensors, tokenizer.json)")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; point at a Hugging Face model folder")
    model, tokenizer = r1kit.load(path, dtype=dtype)
    if tokenizer is None:
        raise FileNotFoundError(f"{path}: no tokenizer.json; the model folder needs its tokenizer")
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"--quantize {quantize!r} is not supported; use int8")
        from r1kit.quantize import quantize_int8

        quantize_int8(model)
    context = model.config.max_position_embeddings
    max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, context)
    return Engine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=max_seq_len, num_threads=num_threads,
                  compile=compile, freeze=compile)  # weights loaded for inference never change


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="model folder (config.json + safetensors + tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only linear layers")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="rows decoded together (concurrent samples)")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help=f"context per row, prompt + completion (default min({DEFAULT_MAX_SEQ_LEN}, the model's))")
    parser.add_argument("--max-waiting", type=int, default=None,
                        help="requests queued beyond the busy rows before HTTP 429 (default 4 x max batch)")
    parser.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: folder name)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model")


def main(args) -> int:
    import uvicorn

    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0-65535)")
    if args.max_batch_size < 1:
        raise ValueError(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    engine = load_engine(args.path, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                         quantize=args.quantize, dtype=args.dtype, num_threads=args.threads)
    name = args.model_name or Path(args.path).name
    app = create_app(engine, model_name=name, api_key=args.api_key, max_waiting=args.max_waiting)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"r1kit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    print(f"r1kit serve: {name} ({engine.config.model_type}, context {engine.max_seq_len}, "
          f"{engine.max_batch_size} rows) on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    from r1kit.cli import main as cli_main

    sys.exit(cli_main(["serve", *sys.argv[1:]]))
