"""Batched generation with a preallocated KV cache (the compressed latent cache for MLA).

    engine = Engine(model, tokenizer)
    outs = engine.generate([ids_a, ids_b], SamplingParams(n=4, max_tokens=128, temperature=1.0))
    for delta in engine.stream(ids_a, SamplingParams(temperature=0.6)): print(delta.text, end="")

One `generate` call: allocate the cache once for max(prompt) + max_tokens slots, prefill every
distinct prompt in one right-padded forward, copy each prompt's cache rows to its `n` samples, then
run one forward per decode step for all rows still generating. Finished rows are compacted out of
the batch when that halves it. Every token's log-probability under log_softmax(logits / T) is kept
(GRPO's "old log-probs"). `Scheduler` runs the same model as a continuous batch for the server:
requests join free rows between decode steps and leave as soon as they finish or are cancelled.
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from r1kit.model import Cache
from r1kit.model import cpu_kernels
from r1kit.model.fuse import prepare_for_decode
from r1kit.model.updates import version

FINISH_REASONS = ("stop", "length")
PREFILL_ACTIVATION_BUDGET = 1 << 27  # floats of (rows x tokens x hidden x 16) one prefill forward may hold


# ---------------------------------------------------------------------------- parameters and results


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1): off
    min_p: float = 0.0
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        self.stop_token_ids = tuple(int(t) for t in (self.stop_token_ids or ()))
        if self.top_k == -1:  # vLLM's spelling of "off"
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, field_name: str, rule: str):
            if not ok:
                raise ValueError(f"SamplingParams.{field_name} = {getattr(self, field_name)!r}: {rule}")

        need(isinstance(self.n, int) and self.n >= 1, "n", "must be an integer >= 1")
        need(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        need(self.temperature >= 0, "temperature", "must be >= 0 (0 means greedy)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an integer >= 0 (0 or -1: off)")
        need(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    prompt_index: int
    token_ids: list[int]  # includes the token that stopped the sequence (eos / stop token / stop string end)
    logprobs: list[float]  # log_softmax(logits / T)[token] of each token (T = 1 when greedy), float32
    text: str | None  # decoded completion without the stop string / eos; None without a tokenizer
    finish_reason: str  # "stop" | "length"


@dataclass
class GenerationDelta:
    """What one sample gained since the last delta. `text` may lag `token_ids` by a few tokens: text
    that could be the start of a stop string or the middle of a character is held back."""
    index: int  # sample index 0..n-1 within the request
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str | None = None  # set on the sample's last delta


# ---------------------------------------------------------------------------- sampling


def _column(value, batch: int, device, dtype) -> torch.Tensor | float:
    return value.to(device=device, dtype=dtype).view(batch, 1) if torch.is_tensor(value) else value


def _draw(weights: torch.Tensor, generator, device) -> torch.Tensor:
    """One column per row of `weights` (B, V; non-negative, not normalised), drawn with probability
    proportional to its weight: the first column whose running sum exceeds a uniform draw times the
    row's total (the inverse CDF, as torch.multinomial draws, without its per-call cost). One random
    number per row, where Gumbel-max needs one per token: torch's CPU generator makes those at about
    4 ns each, most of a step's sampling at a 150k vocabulary. A column of weight 0 is never drawn
    (its running sum equals the one before it)."""
    cdf = weights.cumsum(dim=-1)
    total = cdf[:, -1:]
    if isinstance(generator, (list, tuple)):  # one generator per row (seeded server requests)
        u = torch.cat([torch.rand(1, generator=g, device=device) for g in generator]).view(-1, 1)
    else:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=device)
    # u * total < total, kept so under rounding: some column's running sum exceeds it
    u = torch.minimum(u.mul_(total), torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


@torch.inference_mode()
def sample(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, generator=None):
    """Choose one token per row. logits (B, V); each parameter is a number or a (B,) tensor.

    Order and meaning follow transformers' warpers: divide by temperature, keep the top_k logits,
    keep the smallest set of tokens whose probability reaches top_p, drop tokens whose probability is
    below min_p times the most likely one's; then draw from what is left in proportion to the
    probabilities (`_draw`, one uniform number per row). Temperature 0 is
    greedy. Returns (tokens (B,) long, logprobs (B,) float32) where logprobs are log_softmax(logits/T)
    of the chosen tokens before any filtering (T = 1 for greedy rows), what GRPO trains against.
    """
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    if not torch.is_tensor(temperature) and temperature == 0:
        tokens = logits.argmax(dim=-1)  # log_softmax is one fused kernel; logsumexp is several
        return tokens, logits.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)

    t = _column(temperature, B, dev, torch.float32)
    greedy_rows = (t == 0) if torch.is_tensor(t) else None
    if greedy_rows is not None:
        t = torch.where(greedy_rows, torch.ones_like(t), t)
    scaled = logits / t if (torch.is_tensor(t) or t != 1.0) else logits
    logp = scaled.log_softmax(dim=-1)  # one fused kernel (logsumexp is several)

    k = _column(top_k, B, dev, torch.long)
    p = _column(top_p, B, dev, torch.float32)
    mp = _column(min_p, B, dev, torch.float32)
    use_k = bool((k > 0).any()) if torch.is_tensor(k) else k > 0
    use_p = bool((p < 1).any()) if torch.is_tensor(p) else p < 1
    use_mp = bool((mp > 0).any()) if torch.is_tensor(mp) else mp > 0

    if use_k or use_p:
        # filter in sorted order (descending), sample there, map back to token ids
        values, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=dev).expand(B, V)
        if use_k:
            kk = torch.where(k > 0, k, V) if torch.is_tensor(k) else k
            values = values.masked_fill(rank >= kk, float("-inf"))
        probs = values.softmax(dim=-1)
        if use_p:
            mass_before = probs.cumsum(dim=-1) - probs
            drop = (mass_before >= p) & (rank > 0)  # always keep the most likely token
            probs = probs.masked_fill(drop, 0.0)
        if use_mp:
            probs = probs.masked_fill(probs < mp * probs[:, :1], 0.0)
        pick = _draw(probs, generator, dev)
        tokens = order.gather(1, pick[:, None]).squeeze(1)
    else:
        probs = logp.exp()
        if use_mp:
            probs = probs.masked_fill(probs < mp * probs.amax(dim=-1, keepdim=True), 0.0)
        tokens = _draw(probs, generator, dev)
    if greedy_rows is not None and bool(greedy_rows.any()):
        tokens = torch.where(greedy_rows.squeeze(1), logits.argmax(dim=-1), tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


# ---------------------------------------------------------------------------- text and stop strings


class TextTracker:
    """One sample's text: decodes tokens as they come, finds stop strings, and says how much text is
    safe to show (never the start of a stop string that may still complete, never half a character)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder = tokenizer.decode_stream(skip_special_tokens=True) if tokenizer is not None else None
        self.stop = tuple(stop)
        self.text = ""
        self.emitted = 0
        self.stopped = False  # a stop string was found; text is cut before it

    def add(self, token_id: int, final_token: bool = False) -> bool:
        """Add a token (final_token: an eos / stop token, whose text is not shown). True if a stop
        string completed."""
        if self.decoder is None or self.stopped:
            return False
        if not final_token:
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += self.decoder.step(token_id)
            if self.stop:
                hits = [i for i in (self.text.find(s, start) for s in self.stop) if i != -1]
                if hits:
                    self.text = self.text[: min(hits)]
                    self.stopped = True
        return self.stopped

    def finish(self) -> None:
        if self.decoder is not None and not self.stopped:
            self.text += self.decoder.flush()
            for s in self.stop:  # a stop string completed by the flushed rest
                cut = self.text.find(s)
                if cut != -1:
                    self.text = self.text[:cut]

    def pop(self, final: bool = False) -> str:
        """The text not yet emitted that is safe to show."""
        end = len(self.text)
        if not final and not self.stopped:
            for s in self.stop:  # hold back a suffix that is a prefix of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


# ---------------------------------------------------------------------------- cache helpers


def _map_cache(cache: Cache, fn) -> Cache:
    layers = [tuple(fn(t) for t in layer) if isinstance(layer, tuple) else fn(layer) for layer in cache.layers]
    return Cache(layers, cache.max_seq_len)


def _cache_tensors(cache: Cache):
    for layer in cache.layers:
        yield from (layer if isinstance(layer, tuple) else (layer,))


def _copy_rows(dst: Cache, dst_rows, src: Cache, src_rows, length: int) -> None:
    """dst[dst_rows, :length] = src[src_rows, :length] for every cache tensor."""
    for d, s in zip(_cache_tensors(dst), _cache_tensors(src)):
        d[dst_rows, :length] = s[src_rows, :length]


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(model.config, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids


# ---------------------------------------------------------------------------- the engine


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run a block with `n` intra-op CPU threads (None: leave torch's setting). Tiny models decode
    fastest with one thread, and far faster when other processes share the cores (no OpenMP stalls)."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Engine:
    def __init__(self, model, tokenizer=None, max_batch_size: int = 64, max_seq_len: int | None = None,
                 num_threads: int | None = None, fuse: bool = True, compile: bool | str = False,
                 freeze: bool = False, pack_weights: bool | None = None):
        """`compile`: run decode steps through torch.compile (True: inductor, with CUDA graphs on a
        GPU; a string names another backend). Shapes are made static for it: every step attends over
        the whole cache under the mask, and each batch size compiles once. It pays where a step is
        launch-bound: a GPU. On a CPU the eager step runs every block in one C call
        (model/cpu_kernels.decode_stack) and is faster (bench/decode.py on this project's CPU: the
        compiled step 0.81-0.90x the eager one at batch 1, 0.56-0.85x at batch 16, for the tiny and
        25M Qwen2 and the tiny MoE model). Each new batch size compiles for 10-40 s, so the default is off. The server's continuous batch (Scheduler) always runs eagerly.

        `freeze` (with compile=True, on a CPU): inductor's freezing -- the weights become constants
        of the compiled step, prepacked for the CPU's GEMM kernels (dense batch-1 decoding about
        10-30% faster here). For inference only: the step keeps the weights it was compiled with,
        so generating after the weights changed (an optimizer step) raises instead. `chat --compile`
        and `serve --compile` use it; GRPO's compile_generation does not.

        `pack_weights` (eager steps on a CPU with AVX2): products over 2-64 rows (batched decoding,
        GRPO's groups, the server's continuous batch) run r1kit's own kernels on a packed copy of
        the weights (model/cpu_kernels.py), 1.2-2.5x MKL's on one thread here, more on two. The copy
        costs the linear weights' size again, allocated at the first such batch and refreshed when
        the weights change (15-20 ms per 25M parameters). None: on when those weights fit in cpu_kernels.AUTO_BYTES (1 GiB)."""
        self.num_threads = num_threads
        # fused projections and transposed weights (model/fuse.py), in place: a CPU BLAS layout. Not on a
        # GPU, where cuBLAS takes either layout and the column views would not suit fused AdamW's kernel
        if fuse and next(model.parameters()).device.type == "cpu":
            if pack_weights is None:
                pack_weights = cpu_kernels.linear_bytes(model) <= cpu_kernels.AUTO_BYTES
            prepare_for_decode(model, transpose=False)
            if not (pack_weights and not compile and cpu_kernels.attach(model)):
                # torch's products decode: transposed storage suits them. Packed copies read any
                # layout, and the weights keep theirs, which training (GRPO's update) prefers
                prepare_for_decode(model)
        self.model = model  # switched to eval mode only while generating (see eval_mode)
        self.tokenizer = tokenizer
        self.config = model.config
        self.max_batch_size = int(max_batch_size)
        self.max_seq_len = int(max_seq_len or self.config.max_position_embeddings)
        if self.max_batch_size < 1 or self.max_seq_len < 2:
            raise ValueError(f"Engine needs max_batch_size >= 1 and max_seq_len >= 2, got "
                             f"{self.max_batch_size} and {self.max_seq_len}")
        param = next(model.parameters())
        self.device = param.device
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = self.config.vocab_size
        self.freeze = bool(freeze and compile is True and self.device.type == "cpu")
        # CUDA graphs write the cache in place at the addresses they were recorded with
        self._graph_caches: dict[int, Cache] | None = {} if compile is True and self.device.type == "cuda" else None
        self.compiled_step = self._compile(compile) if compile else None
        self._frozen = self._weight_versions() if self.freeze else None

    def _compile(self, backend: bool | str):
        model = self.model
        # grow the rope table now: the compiled step must only read it
        model.rotary.cos_sin(torch.zeros(1, 1, dtype=torch.long, device=self.device), torch.float32,
                             bound=self.max_seq_len)
        kw: dict = {"backend": backend}
        if backend is True:  # CUDA graphs on a GPU; a C++ wrapper on a CPU (no Python between kernels)
            kw = ({"backend": "inductor", "mode": "reduce-overhead"} if self.device.type == "cuda"
                  else {"backend": "inductor", "options": {"cpp_wrapper": True, "freezing": self.freeze}})

        def decode(ids, positions, cache):
            return model(ids, positions=positions, cache=cache, kv_len=cache.max_seq_len)

        # graphs are cached per function code, shared by every engine in the process: one per
        # (model, batch size), and batches shrink as rows finish; torch's default allows 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if self.freeze:
            # Dynamo re-checks ~200 guards before every step, most of them on the model's modules and
            # weights (~0.2 ms of a 1-2 ms tiny-model step here). A frozen engine's model cannot change
            # under it (check_frozen raises first), so only the guards on the inputs and the cache stay;
            # its graphs are its own (isolate_recompiles), never another engine's with other weights.
            kw["options"]["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
            kw["isolate_recompiles"] = True
        return torch.compile(decode, dynamic=False, **kw)

    def decode_cache(self, batch_size: int, slots: int) -> Cache:
        """A cache for a batch of decode rows (zeros when new). Under CUDA graphs each batch size
        reuses one cache, marked static: a recorded graph writes it in place at fixed addresses, and
        a new cache per call would make inductor skip the graphs (mutated inputs) or re-record them.
        Reuse is safe for one batch at a time, as generate and stream run: slots past a row's
        position are masked out, and their stale values are finite. The caches live as long as the
        engine, one per batch size met: each call's own size, then the powers of two it shrinks to
        as rows finish (under twice its size together)."""
        if self._graph_caches is None:
            return self.model.new_cache(batch_size, slots)
        cache = self._graph_caches.get(batch_size)
        if cache is None or cache.max_seq_len != slots:
            cache = self.model.new_cache(batch_size, slots)
            for t in _cache_tensors(cache):
                torch._dynamo.mark_static_address(t)
            self._graph_caches[batch_size] = cache
        return cache

    def _weight_versions(self) -> tuple | None:
        """In-place updates and optimizer steps (model/updates.py): a cheap fingerprint."""
        versions = tuple(version(t) for t in (*self.model.parameters(), *self.model.buffers()))
        if all(v[0] == -1 for v in versions):  # inference tensors: nothing outside inference mode can update them
            return None
        return versions

    def check_frozen(self) -> None:
        if self._frozen is not None and self._weight_versions() != self._frozen:
            raise RuntimeError("the model's weights changed after this Engine compiled them in (freeze=True); "
                               "build a new Engine, or use freeze=False for a model that is still training")

    @contextlib.contextmanager
    def eval_mode(self):
        """Generate in eval mode and give the model back as it was: a GRPO policy stays in training
        mode between rollouts (MoE load counting and balance losses must not see rollout tokens)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    # -------------------------------------------------------------- checks
    def check_prompt(self, prompt: Sequence[int], max_tokens: int, where: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            raise ValueError(f"{where} is a string; the engine takes token ids (use generate_text for strings)")
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"{where} is empty; a prompt needs at least one token (e.g. bos)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{where} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        if len(ids) + max_tokens > self.max_seq_len:
            raise ValueError(
                f"{where} has {len(ids)} tokens; with max_tokens={max_tokens} that is {len(ids) + max_tokens} "
                f"> the context of {self.max_seq_len} tokens: shorten the prompt or lower max_tokens")
        return ids

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return sorted(ids)

    def _generator(self, seed):
        if seed is None:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(int(seed))
        return g

    # -------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], cache: Cache, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Run `prompts` at positions 0..len-1 into cache rows `rows` (default 0..P-1); return each
        prompt's next-token logits (P, V). Rows are right-padded to the longest prompt; the pad
        tokens write slots past each prompt's end, which its own decode tokens overwrite before any
        query reads them."""
        P = len(prompts)
        lengths = [len(p) for p in prompts]
        L = max(lengths)
        # the head runs on each row's last token only, so activations bound the chunk, not logits
        per_forward = max(1, PREFILL_ACTIVATION_BUDGET // (L * self.model.config.hidden_size * 16))
        out = []
        for a in range(0, P, per_forward):
            chunk = prompts[a:a + per_forward]
            ids = torch.zeros(len(chunk), L, dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, : len(p)] = torch.tensor(p)
            ids = ids.to(self.device)
            positions = torch.arange(L, device=self.device).expand(len(chunk), L)
            if rows is None:  # rows a.. of the cache itself (slices are views: writes land in place)
                target, scratch = _map_cache(cache, lambda t, a=a, m=len(chunk): t[a:a + m]), None
            else:  # a scratch cache, copied into the scattered rows afterwards
                target = scratch = self.model.new_cache(len(chunk), L)
            last = torch.tensor([[len(p) - 1] for p in chunk], device=self.device)
            logits = self.model(ids, positions=positions, cache=target, kv_len=L, logits_at=last)
            out.append(logits[:, 0])
            if scratch is not None:
                dst = torch.tensor(list(rows[a:a + len(chunk)]), device=self.device)
                _copy_rows(cache, dst, scratch, torch.arange(len(chunk), device=self.device), L)
        return torch.cat(out)

    # -------------------------------------------------------------- generate
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 progress: bool = False) -> list[Generation]:
        """Complete each prompt `params.n` times. Returns len(prompts) * n Generations, prompt-major
        (prompt 0's n samples first)."""
        params = params or SamplingParams()
        prompts = [self.check_prompt(p, params.max_tokens, f"prompt {i}") for i, p in enumerate(prompts)]
        generator = self._generator(params.seed)
        per_chunk = max(1, self.max_batch_size // params.n)
        results: list[Generation] = []
        bar = _progress(len(prompts) * params.n) if progress else None
        with intra_op_threads(self.num_threads), self.eval_mode():
            for start in range(0, len(prompts), per_chunk):
                chunk = prompts[start:start + per_chunk]
                batch = _Batch(self, chunk, params, generator, first_index=start)
                while not batch.done:
                    batch.step()
                results.extend(batch.results())
                if bar is not None:
                    bar(len(chunk) * params.n)
        return results

    def stream(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Iterator[GenerationDelta]:
        """Yield deltas for one prompt's n samples as tokens are chosen; each sample's last delta has
        its finish_reason."""
        params = params or SamplingParams()
        prompt = self.check_prompt(prompt_ids, params.max_tokens)
        if params.n > self.max_batch_size:
            raise ValueError(f"n={params.n} exceeds max_batch_size={self.max_batch_size}")
        with self.eval_mode():
            batch = _Batch(self, [prompt], params, self._generator(params.seed), track_text=True)
            yield from batch.deltas()
            while not batch.done:
                batch.step()
                yield from batch.deltas()


class _Batch:
    """The rows of one generate call: prompts x n samples, decoded together until all finish."""

    @torch.inference_mode()  # every tensor of a batch is an inference tensor: one compiled graph per size
    def __init__(self, engine: Engine, prompts, params: SamplingParams, generator, first_index: int = 0,
                 track_text: bool = False):
        self.engine, self.params, self.generator = engine, params, generator
        engine.check_frozen()
        model, dev = engine.model, engine.device
        n = params.n
        self.B = B = len(prompts) * n
        self.first_index = first_index
        self.prompt_len = [len(p) for p in prompts for _ in range(n)]
        self.stop_ids = engine._stop_ids(params)
        self.stop_set = frozenset(self.stop_ids)
        # sampling by temperature alone (what cpu_kernels.decode_step can draw)
        self.plain = (not torch.is_tensor(params.temperature) and params.temperature >= 0 and not params.top_k
                      and params.top_p >= 1 and not params.min_p
                      and isinstance(generator, (torch.Generator, type(None))))
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.logprobs: list[list[float]] = [[] for _ in range(B)]
        self.finish: list[str | None] = [None] * B
        # text is tracked per step only when it must be: stop strings or streaming
        self.trackers = ([TextTracker(engine.tokenizer, params.stop) for _ in range(B)]
                         if (params.stop and engine.tokenizer is not None) or track_text else None)
        self.sent = [0] * B  # tokens already streamed, per sample
        self.reported = [False] * B
        self.steps = 0  # tokens chosen so far per live sample

        longest = max(self.prompt_len)
        # a compiled step attends over the whole cache: one length (the engine's) keeps one graph per batch size
        slots = engine.max_seq_len if engine.compiled_step is not None else longest + params.max_tokens
        self.cache = engine.decode_cache(B, slots)
        if n == 1:
            logits = engine.prefill(prompts, self.cache)
        else:  # one prefill per distinct prompt; its n samples copy the rows
            small = model.new_cache(len(prompts), longest)
            logits = engine.prefill(prompts, small)
            src = torch.arange(len(prompts), device=dev).repeat_interleave(n)
            _copy_rows(self.cache, slice(None), small, src, longest)
            logits = logits.repeat_interleave(n, dim=0)
        # batch row i of the cache holds sample rows[i]; None once that sample finished (its row is
        # still decoded, and ignored, until dropping the dead rows halves the batch)
        self.rows: list[int | None] = list(range(B))
        self.live = B
        self.position = torch.tensor(self.prompt_len, device=dev)  # slot of each batch row's next input
        self.longest = longest
        self._take(logits)

    @property
    def done(self) -> bool:
        return self.live == 0

    @torch.inference_mode()
    def step(self) -> None:
        ids, positions = self.next_input.view(-1, 1), self.position.view(-1, 1)
        if self.engine.compiled_step is not None:  # static shapes: the whole cache, under the mask
            logits = self.engine.compiled_step(ids, positions, self.cache)
        else:
            kv_len = self.longest + self.steps  # slots 0..position of the furthest row
            model = self.engine.model
            # on a CPU, with temperature alone: the model's step and the draw in one C call, as `sample`
            # draws (model forward hooks would be skipped: then the model runs as a module)
            plain = self.plain and not (model._forward_hooks or model._forward_pre_hooks)
            picked = (cpu_kernels.decode_step(model, ids, positions, self.cache, kv_len, self.params.temperature,
                                              self.generator) if plain else None)
            if picked is not None:
                self.position = self.position + 1
                self._record(*picked)
                return
            logits = model(ids, positions=positions, cache=self.cache, kv_len=kv_len)
        self.position = self.position + 1
        self._take(logits[:, -1])

    def _take(self, logits: torch.Tensor) -> None:
        """Sample the next token of every batch row, then `_record` it."""
        p = self.params
        self._record(*sample(logits, p.temperature, p.top_k, p.top_p, p.min_p, self.generator))

    def _record(self, tok: torch.Tensor, lp: torch.Tensor) -> None:
        """Record each batch row's next token for live samples, retire finished ones."""
        p = self.params
        self.next_input = tok
        # one host transfer per step for the whole batch
        tok_l, lp_l = tok.tolist(), lp.tolist()
        stops = self.stop_set
        self.steps += 1
        at_length = self.steps >= p.max_tokens
        for i, row in enumerate(self.rows):
            if row is None:
                continue
            t = tok_l[i]
            self.tokens[row].append(t)
            self.logprobs[row].append(lp_l[i])
            is_stop = t in stops
            reason = "stop" if is_stop else None
            if self.trackers is not None and self.trackers[row].add(t, final_token=is_stop):
                reason = "stop"
            if reason is None and at_length:
                reason = "length"
            if reason is not None:
                self.finish[row] = reason
                self.rows[i] = None
                self.live -= 1
        if 0 < self.live <= len(self.rows) // 2:
            self._compact()

    def _compact(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if row is not None]
        if self.engine.compiled_step is not None:  # batch sizes in powers of two: a few graphs, not one per size
            dead = [i for i, row in enumerate(self.rows) if row is None]
            keep = sorted(keep + dead[: (1 << (len(keep) - 1).bit_length()) - len(keep)])
        idx = torch.tensor(keep, device=self.engine.device)
        smaller = self.engine.decode_cache(len(keep), self.cache.max_seq_len)  # never the current one: it shrinks
        for dst, src in zip(_cache_tensors(smaller), _cache_tensors(self.cache)):
            torch.index_select(src, 0, idx, out=dst)
        self.cache = smaller
        self.position = self.position.index_select(0, idx)
        self.next_input = self.next_input.index_select(0, idx)
        self.rows = [self.rows[i] for i in keep]
        self.longest = max(self.prompt_len[r] for r in self.rows if r is not None)

    # -------------------------------------------------------------- results
    def results(self) -> list[Generation]:
        tok = self.engine.tokenizer
        out = []
        for row in range(self.B):
            ids, reason = self.tokens[row], self.finish[row]
            if self.trackers is not None:
                tr = self.trackers[row]
                tr.finish()
                text = tr.text
            elif tok is not None:
                shown = ids[:-1] if ids and reason == "stop" and ids[-1] in self.stop_ids else ids
                text = tok.decode(shown, skip_special_tokens=True)
            else:
                text = None
            out.append(Generation(self.first_index + row // self.params.n, ids, self.logprobs[row], text, reason))
        return out

    def deltas(self) -> Iterator[GenerationDelta]:
        for row in range(self.B):
            if self.reported[row]:
                continue
            reason = self.finish[row]
            new = slice(self.sent[row], len(self.tokens[row]))
            text = ""
            if self.trackers is not None:
                if reason is not None:
                    self.trackers[row].finish()
                text = self.trackers[row].pop(final=reason is not None)
            if new.start == new.stop and reason is None:
                continue
            yield GenerationDelta(row % self.params.n, self.tokens[row][new], self.logprobs[row][new], text, reason)
            self.sent[row] = len(self.tokens[row])
            self.reported[row] = reason is not None


def _progress(total: int):
    """A small stderr progress line with rate and ETA (tqdm-like, no dependency)."""
    import sys

    start, done = time.time(), [0]

    def update(k: int):
        done[0] += k
        elapsed = time.time() - start
        rate = done[0] / max(elapsed, 1e-9)
        eta = (total - done[0]) / max(rate, 1e-9)
        sys.stderr.write(f"\rgenerate {done[0]}/{total} [{elapsed:.0f}s, {rate:.1f} samples/s, eta {eta:.0f}s]")
        if done[0] >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return update


def generate_text(engine: Engine, prompts: list[str], params: SamplingParams | None = None,
                  add_special_tokens: bool = False) -> list[Generation]:
    """generate() for strings: encode with the engine's tokenizer, completions come back with text."""
    if engine.tokenizer is None:
        raise ValueError("generate_text needs an Engine with a tokenizer")
    ids = [engine.tokenizer.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    return engine.generate(ids, params)


# ---------------------------------------------------------------------------- continuous batching


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is full (the server answers HTTP 429)."""


class Request:
    """One submitted prompt and its n samples. Deltas go to `on_event` (called on the scheduler
    thread) or, without one, to a queue that iterating the request reads. The last event is None; an
    Exception event means the request failed."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], params: SamplingParams, on_event: Callable | None = None):
        self.id = next(self._ids)
        self.prompt = prompt
        self.params = params
        self.cancelled = False
        self.done = threading.Event()
        self.unfinished = params.n
        self._queue: queue.Queue | None = None if on_event is not None else queue.Queue()
        self._on_event = on_event or self._queue.put

    def emit(self, event) -> None:
        try:
            self._on_event(event)
        except Exception:  # a consumer that went away must not stop the scheduler
            self.cancelled = True
        if event is None:
            self.done.set()

    def __iter__(self) -> Iterator[GenerationDelta]:
        if self._queue is None:
            raise TypeError("this request reports to its on_event callback; it cannot be iterated")
        while True:
            event = self._queue.get()
            if event is None:
                return
            if isinstance(event, BaseException):
                raise event
            yield event

    def collect(self) -> list[Generation]:
        """Block until done; the n samples as Generations (like Engine.generate for one prompt)."""
        n = self.params.n
        ids, lps, texts, reasons = [[] for _ in range(n)], [[] for _ in range(n)], [""] * n, [None] * n
        for d in self:
            ids[d.index] += d.token_ids
            lps[d.index] += d.logprobs
            texts[d.index] += d.text
            reasons[d.index] = d.finish_reason or reasons[d.index]
        return [Generation(0, ids[i], lps[i], texts[i], reasons[i] or "length") for i in range(n)]


@dataclass
class _Slot:
    """One live sample: batch row i of the scheduler's cache holds slots[i]."""
    request: Request
    index: int
    tracker: TextTracker
    stop_ids: set[int]
    generator: torch.Generator | None
    position: int = 0  # the slot the next input token goes to
    next_token: int = 0
    generated: int = 0


class Scheduler:
    """Continuous batching: a thread owns the model and one cache of max_batch_size rows. Between
    decode steps it admits waiting requests into free rows (prefilling them at their own rows; rows
    are independent) and drops finished or cancelled ones, so a long request never holds back a short
    one. Live rows are kept packed at rows 0..A-1: the forward runs on a view of exactly those rows,
    and a row that leaves is refilled by moving the last row into it."""

    def __init__(self, engine: Engine, max_waiting: int | None = None):
        self.engine = engine
        self.max_rows = engine.max_batch_size
        self.max_waiting = 4 * self.max_rows if max_waiting is None else int(max_waiting)
        self.cache = engine.model.new_cache(self.max_rows, engine.max_seq_len)
        self.slots: list[_Slot] = []
        self.waiting: deque[Request] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0

    # -------------------------------------------------------------- public
    def start(self) -> "Scheduler":
        if self.thread is None or not self.thread.is_alive():
            self.engine.model.eval()  # the server's model only ever generates
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, name="r1kit-scheduler", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, prompt: list[int], params: SamplingParams, on_event: Callable | None = None) -> Request:
        prompt = self.engine.check_prompt(prompt, params.max_tokens)
        if params.n > self.max_rows:
            raise ValueError(f"n={params.n} exceeds the server's max batch size of {self.max_rows} rows")
        request = Request(prompt, params, on_event)
        with self.cond:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"too many requests: {len(self.slots)} rows busy and {len(self.waiting)} "
                                "requests waiting; retry later")
            self.waiting.append(request)
            self.cond.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Free the request's rows before the next decode step (a client went away)."""
        request.cancelled = True
        with self.cond:
            self.cond.notify_all()

    @property
    def busy_rows(self) -> int:
        return len(self.slots)

    # -------------------------------------------------------------- the loop
    def _loop(self) -> None:
        if self.engine.num_threads is not None:
            torch.set_num_threads(self.engine.num_threads)  # this thread's own OpenMP setting
        while True:
            with self.cond:
                while not self.stopping and not self.slots and not self.waiting:
                    self.cond.wait()
                if self.stopping:
                    break
            try:
                self._drop_cancelled()
                self._admit()
                if self.slots:
                    self._decode()
            except Exception as err:  # fail what is running, keep serving
                failed = {id(s.request): s.request for s in self.slots}
                self.slots.clear()
                for request in failed.values():
                    request.emit(RuntimeError(f"generation failed: {err}"))
                    request.emit(None)
        for request in {id(s.request): s.request for s in self.slots}.values():
            request.emit(None)
        self.slots.clear()

    def _drop_cancelled(self) -> None:
        with self.cond:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                request.emit(None)
        gone = [i for i, s in enumerate(self.slots) if s.request.cancelled]
        if gone:
            requests = {id(self.slots[i].request): self.slots[i].request for i in gone}
            self._remove(gone)
            for request in requests.values():
                if not request.done.is_set():
                    request.emit(None)

    @torch.inference_mode()
    def _admit(self) -> None:
        admitted: list[Request] = []
        with self.cond:
            free = self.max_rows - len(self.slots)
            while self.waiting and self.waiting[0].params.n <= free:  # FIFO: no request is starved
                request = self.waiting.popleft()
                free -= request.params.n
                admitted.append(request)
        if not admitted:
            return
        engine, dev = self.engine, self.engine.device
        first = len(self.slots)
        rows, row = [], first
        for request in admitted:
            rows.append(row)
            row += request.params.n
        logits = engine.prefill([r.prompt for r in admitted], self.cache, rows=rows)
        new_slots, src, dst = [], [], []
        for request, base in zip(admitted, rows):
            p = request.params
            stop_ids = set(engine._stop_ids(p))
            for i in range(p.n):
                gen = None
                if p.seed is not None:  # one generator per sample: reproducible whatever else runs
                    gen = torch.Generator(device=dev)
                    gen.manual_seed(int(p.seed) * 1_000_003 + i)
                new_slots.append(_Slot(request, i, TextTracker(engine.tokenizer, p.stop), stop_ids, gen,
                                       position=len(request.prompt)))
                if i:
                    src.append(base)
                    dst.append(base + i)
        if dst:  # the n samples of a prompt share its prefill
            longest = max(len(r.prompt) for r in admitted)
            _copy_rows(self.cache, torch.tensor(dst, device=dev), self.cache, torch.tensor(src, device=dev), longest)
        self.slots.extend(new_slots)
        counts = torch.tensor([r.params.n for r in admitted], device=dev)
        self._take(new_slots, logits.repeat_interleave(counts, dim=0), first)

    @torch.inference_mode()
    def _decode(self) -> None:
        slots, dev = self.slots, self.engine.device
        A = len(slots)
        view = _map_cache(self.cache, lambda t: t[:A])
        ids = torch.tensor([[s.next_token] for s in slots], device=dev)
        pos = torch.tensor([[s.position] for s in slots], device=dev)
        kv_len = max(s.position for s in slots) + 1
        logits = self.engine.model(ids, positions=pos, cache=view, kv_len=kv_len)[:, -1]
        for s in slots:
            s.position += 1
        self.steps += 1
        self._take(slots, logits, 0)

    def _take(self, slots: list[_Slot], logits: torch.Tensor, first_row: int) -> None:
        dev = logits.device
        ps = [s.request.params for s in slots]
        uniform = all(p is ps[0] for p in ps)  # one request: plain numbers, no per-row tensors
        if uniform:
            t, k, top_p, mp = ps[0].temperature, ps[0].top_k, ps[0].top_p, ps[0].min_p
        else:
            t = torch.tensor([p.temperature for p in ps], device=dev)
            k = torch.tensor([p.top_k for p in ps], device=dev)
            top_p = torch.tensor([p.top_p for p in ps], device=dev)
            mp = torch.tensor([p.min_p for p in ps], device=dev)
        gens = [s.generator for s in slots]
        generator = None if all(g is None for g in gens) else gens
        tok, lp = sample(logits, t, k, top_p, mp, generator)
        finished = []
        for i, (s, token, logprob) in enumerate(zip(slots, tok.tolist(), lp.tolist())):
            s.next_token = token
            s.generated += 1
            is_stop = token in s.stop_ids
            reason = "stop" if is_stop else None
            if s.tracker.add(token, final_token=is_stop):
                reason = "stop"
            if reason is None and s.generated >= s.request.params.max_tokens:
                reason = "length"
            if reason is not None:
                s.tracker.finish()
                finished.append(first_row + i)
            s.request.emit(GenerationDelta(s.index, [token], [logprob], s.tracker.pop(final=reason is not None),
                                           reason))
            if reason is not None:
                s.request.unfinished -= 1
                if s.request.unfinished == 0:
                    s.request.emit(None)
        if finished:
            self._remove(finished)

    def _remove(self, batch_rows: list[int]) -> None:
        """Drop rows; the last live row moves into each hole so rows 0..A-1 stay packed."""
        dev = self.engine.device
        for i in sorted(batch_rows, reverse=True):
            last = len(self.slots) - 1
            if i != last:
                length = self.slots[last].position + 1
                _copy_rows(self.cache, torch.tensor([i], device=dev), self.cache, torch.tensor([last], device=dev),
                           min(length, self.engine.max_seq_len))
                self.slots[i] = self.slots[last]
            self.slots.pop()
