"""Decoding speed: r1kit's engine against transformers' `generate` on identical weights.

    HF_HUB_OFFLINE=1 python bench/decode.py [--reps 3] [--threads 1] [--new-tokens 128]
    HF_HUB_OFFLINE=1 python bench/decode.py --device cuda --dtype bfloat16   # on a GPU (CUDA graphs)

Models: a tiny Qwen2 (hidden 256, 4 layers), a ~25M-parameter Qwen2 (hidden 512, 8 layers) and a
tiny DeepSeek-V3 (MLA + MoE), each saved once by r1kit and loaded by both sides in float32. Greedy,
128 new tokens (eos ignored), batch 1 and batch 16. r1kit runs twice: its eager engine and the
same engine with `compile=True, freeze=True` as `r1kit chat --compile` runs it (torch.compile, C++
wrapper and weights frozen in on a CPU; compile time is printed and not timed, like both sides'
warm-up). When llama-cpp-python is installed, llama.cpp runs the same weights (exported to GGUF by
r1kit) at batch 1 with the same thread count. The sides alternate repetition by repetition (this machine is
shared: an absolute time means little, a ratio measured side by side does) and the best repetition
of each counts. Also printed: the fraction of measured memory bandwidth r1kit reaches on the 25M
model at batch 1 (weight bytes read per token x tokens/s / copy bandwidth); for the dense models a
roofline -- the time of the step's weight products alone on the same BLAS kernels, which bounds
what any engine can gain over transformers here; and MLA's KV cache bytes per token against the
same model with full multi-head K/V. The last line is JSON; its headline speedups use r1kit's faster
mode per case, and the `_eager` keys the eager engine's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import r1kit  # noqa: E402
from r1kit.engine import Engine, SamplingParams  # noqa: E402
from r1kit.model import ModelConfig, Transformer  # noqa: E402

MODELS = {
    "qwen2-tiny": dict(model_type="qwen2", vocab_size=8192, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, tie_word_embeddings=True),
    "qwen2-25m": dict(model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1408,
                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True),
    "deepseek-v3-tiny": dict(ModelConfig.preset("tiny").to_hf(), num_nextn_predict_layers=0,
                             max_position_embeddings=1024),
}
PROMPT_LEN = 16


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 256 * 2**20, reps: int = 5, device="cpu") -> float:
    """Bytes per second moved by a large tensor copy (a read and a write of every byte)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps + 1):  # the first one warms up
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every matrix once; the embedding is a row lookup
    unless it doubles as the output head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        emb = model.model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_token(config: ModelConfig, element_size: int = 2) -> tuple[int, int]:
    """(MLA latent cache, full multi-head K/V) bytes per token for all layers."""
    mla = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * element_size
    mha = config.num_hidden_layers * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * element_size
    return mla, mha


def step_matrices(model: Transformer) -> list[torch.Tensor]:
    """The weight matrices one dense decode step multiplies by, as the engine lays them out
    (fused projections, transposed storage; see r1kit/model/fuse.py)."""
    mats, seen = [], set()
    for module in model.modules():
        fused = getattr(module, "fused", None)
        if fused is not None and fused.usable():
            mats.append(fused.weight)
            seen.update(id(lin) for lin in fused.linears)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module) not in seen:
            mats.append(module.weight)
    if model.lm_head is None:
        mats.append(model.model.embed_tokens.weight)
    return mats


@torch.inference_mode()
def gemm_floor(model: Transformer, batch: int, reps: int = 30) -> float:
    """Seconds per decode step spent in the weight products alone (no attention, no norms, no
    Python): what no engine built on these BLAS kernels can beat at this batch size."""
    mats = step_matrices(model)
    xs = [torch.randn(batch, w.shape[1], device=w.device, dtype=w.dtype) for w in mats]
    best = float("inf")
    for _ in range(3):
        sync(mats[0].device)
        t = time.perf_counter()
        for _ in range(reps):
            for x, w in zip(xs, mats):
                torch.nn.functional.linear(x, w)
        sync(mats[0].device)
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def time_r1kit(engine: Engine, prompts, new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    dt = time.perf_counter() - t
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return dt


def time_hf(hf_model, prompts, new_tokens: int) -> float:
    ids = torch.tensor(prompts, device=hf_model.device)
    sync(ids.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    sync(ids.device)
    dt = time.perf_counter() - t
    assert out.shape[1] == ids.shape[1] + new_tokens
    return dt


def time_llama_cpp(folder: Path, prompts, new_tokens: int):
    """llama.cpp through llama-cpp-python on the same weights (GGUF via r1kit.export), if installed."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    try:
        from r1kit.export import export_gguf
    except ImportError:
        return None
    gguf = folder / "model.gguf"
    if not gguf.exists():
        try:
            export_gguf(folder, gguf, dtype="f32")  # the same float32 weights as both other sides
        except ValueError as e:  # GGUF export covers the dense (R1-Distill) families only
            print(f"  llama.cpp not run: {str(e).split(': ', 1)[-1]}")
            return None
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=PROMPT_LEN + new_tokens + 8, n_threads=torch.get_num_threads(),
                verbose=False)
    t = time.perf_counter()
    for prompt in prompts:
        n = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            n += 1
            if n >= new_tokens:
                break
    return time.perf_counter() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads for both sides (1: fair and stable on a shared machine)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides on it; llama.cpp only on cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    on_cpu = torch.device(args.device).type == "cpu"
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    bandwidth = copy_bandwidth(device=args.device)
    where = f"threads {args.threads}" if on_cpu else torch.cuda.get_device_name()
    print(f"{where}, copy bandwidth {bandwidth / 1e9:.1f} GB/s, {args.new_tokens} new tokens, "
          f"prompt {PROMPT_LEN} tokens, {args.dtype}, best of {args.reps} interleaved repetitions")
    figures: dict = {"device": args.device, "dtype": args.dtype, "threads": args.threads,
                     "copy_bandwidth_gbs": round(bandwidth / 1e9, 2)}
    speedups: dict[tuple[str, int], float] = {}  # r1kit's faster mode (eager or compiled)
    eager_speedups: dict[tuple[str, int], float] = {}
    workdir = Path(tempfile.mkdtemp(prefix="r1kit-bench-"))
    g = torch.Generator().manual_seed(0)
    from r1kit.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([], kind="char")  # prompts are random ids; the rows past it are padding tokens
    for name in args.models.split(","):
        config = ModelConfig.from_hf(MODELS[name])
        torch.manual_seed(0)
        model = Transformer(config).eval()
        folder = workdir / name
        r1kit.save(model, tokenizer, folder)  # a tokenizer too: the GGUF export for llama.cpp needs one
        ours, _ = r1kit.load(folder, dtype=dtype, device=args.device)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        n_params = sum(p.numel() for p in ours.parameters())
        # same weights, same greedy answer (checked on one prompt before timing)
        probe = torch.randint(0, config.vocab_size, (1, PROMPT_LEN), generator=g).tolist()
        engine = Engine(ours, max_batch_size=16, max_seq_len=PROMPT_LEN + args.new_tokens)
        mine = engine.generate(probe, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0].token_ids
        with torch.inference_mode():
            theirs = hf.generate(torch.tensor(probe, device=args.device), max_new_tokens=16, min_new_tokens=16,
                                 do_sample=False, pad_token_id=0)[0, PROMPT_LEN:].tolist()
        agree = sum(a == b for a, b in zip(mine, theirs))
        print(f"\n{name}: {n_params / 1e6:.1f}M parameters, greedy agreement with transformers {agree}/16")
        compiled = Engine(ours, max_batch_size=16, max_seq_len=PROMPT_LEN + args.new_tokens, compile=True,
                          freeze=True)  # as `r1kit chat --compile`: weights compiled in
        for batch in (1, 16):
            prompts = torch.randint(0, config.vocab_size, (batch, PROMPT_LEN), generator=g).tolist()
            tc = time.perf_counter()
            time_r1kit(compiled, prompts, 8)  # warm up all three; this one compiles for this batch size
            compile_s = time.perf_counter() - tc
            time_r1kit(engine, prompts, 8)
            time_hf(hf, prompts, 8)
            t = {"eager": float("inf"), "compiled": float("inf"), "hf": float("inf")}
            for _ in range(args.reps):
                t["eager"] = min(t["eager"], time_r1kit(engine, prompts, args.new_tokens))
                t["compiled"] = min(t["compiled"], time_r1kit(compiled, prompts, args.new_tokens))
                t["hf"] = min(t["hf"], time_hf(hf, prompts, args.new_tokens))
            tps = {k: batch * args.new_tokens / v for k, v in t.items()}
            best = min(("eager", "compiled"), key=lambda k: t[k])
            speedups[(name, batch)] = t["hf"] / t[best]
            eager_speedups[(name, batch)] = t["hf"] / t["eager"]
            line = (f"  batch {batch:2d}: r1kit {tps['eager']:8.1f} tok/s eager, {tps['compiled']:8.1f} compiled "
                    f"({compile_s:.0f} s to compile)   transformers {tps['hf']:8.1f} tok/s   "
                    f"speedup {t['hf'] / t['eager']:5.2f}x eager, {t['hf'] / t['compiled']:5.2f}x compiled")
            figures[f"{name}_bs{batch}_r1kit_tps"] = round(tps["eager"], 1)
            figures[f"{name}_bs{batch}_r1kit_compiled_tps"] = round(tps["compiled"], 1)
            figures[f"{name}_bs{batch}_hf_tps"] = round(tps["hf"], 1)
            t_ours, tps_ours = t[best], tps[best]
            if name == "qwen2-25m" and batch == 1:
                frac = weight_bytes_per_token(ours) * tps_ours / bandwidth
                figures["bandwidth_fraction_25m_bs1"] = round(frac, 3)
                line += f"\n            bandwidth {100 * frac:.0f}% of copy ({weight_bytes_per_token(ours) / 1e6:.0f} MB/token)"
            if not config.is_moe and on_cpu:  # a roofline for the dense models (on a GPU, launches bound it)
                floor = gemm_floor(ours, batch) * args.new_tokens
                ceiling = t["hf"] / floor
                figures[f"{name}_bs{batch}_gemm_floor_ceiling"] = round(ceiling, 2)
                figures[f"{name}_bs{batch}_share_of_floor"] = round(floor / t_ours, 2)
                line += (f"\n            weight products alone: {batch * args.new_tokens / floor:8.1f} tok/s -> "
                         f"no engine on these kernels beats transformers by more than {ceiling:.2f}x; "
                         f"r1kit ({best}) runs at {100 * floor / t_ours:.0f}% of that floor")
            if batch == 1 and on_cpu and dtype == torch.float32:
                t_cpp = time_llama_cpp(folder, prompts, args.new_tokens)
                if t_cpp is not None:
                    line += f"   llama.cpp {args.new_tokens / t_cpp:.1f} tok/s"
                    figures[f"{name}_bs1_llamacpp_tps"] = round(args.new_tokens / t_cpp, 1)
            print(line, flush=True)
        if config.is_mla:
            mla, mha = kv_bytes_per_token(config)
            figures["mla_kv_bytes_per_token_bf16"] = mla
            figures["mha_kv_bytes_per_token_bf16"] = mha
            figures["mla_kv_bytes_ratio"] = round(mla / mha, 4)
            print(f"  KV cache per token (bf16, all layers): MLA {mla} B vs full multi-head K/V {mha} B "
                  f"({mha / mla:.1f}x smaller)")
            v3 = ModelConfig.preset("deepseek-v3")
            mla3, mha3 = kv_bytes_per_token(v3)
            print(f"  at DeepSeek-V3's size: MLA {mla3 / 1024:.0f} KiB vs MHA {mha3 / 1024:.0f} KiB per token "
                  f"({mha3 / mla3:.0f}x)")
            figures["mla_kv_bytes_ratio_v3_671b"] = round(mla3 / mha3, 4)
        del hf
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("\nllama-cpp-python is not installed: llama.cpp not measured")
    if not on_cpu:  # a compiled engine that skipped CUDA graphs would be timed without them
        from torch._dynamo.utils import counters

        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
        figures["cudagraph_skips"] = skips
        print(f"\nCUDA graphs skipped by inductor: {skips} time(s)")
    tiny = [speedups[(n, 1)] for n in ("qwen2-tiny", "deepseek-v3-tiny") if (n, 1) in speedups]
    figures["tiny_min_speedup_bs1"] = round(min(tiny), 2) if tiny else None
    figures["qwen2_25m_speedup_bs1"] = round(speedups[("qwen2-25m", 1)], 2) if ("qwen2-25m", 1) in speedups else None
    bs16 = [v for (n, b), v in speedups.items() if b == 16]
    figures["min_speedup_bs16"] = round(min(bs16), 2) if bs16 else None
    tiny_e = [eager_speedups[(n, 1)] for n in ("qwen2-tiny", "deepseek-v3-tiny") if (n, 1) in eager_speedups]
    figures["tiny_min_speedup_bs1_eager"] = round(min(tiny_e), 2) if tiny_e else None
    if ("qwen2-25m", 1) in eager_speedups:
        figures["qwen2_25m_speedup_bs1_eager"] = round(eager_speedups[("qwen2-25m", 1)], 2)
    bs16_e = [v for (n, b), v in eager_speedups.items() if b == 16]
    figures["min_speedup_bs16_eager"] = round(min(bs16_e), 2) if bs16_e else None
    print("\nr1kit's faster mode per case (eager or compiled; both printed above):")
    shown = lambda v: "not measured" if v is None else f"{v}x"  # noqa: E731 (a --models subset)
    print(f"batch 1: tiny models >= {shown(figures['tiny_min_speedup_bs1'])} (target 5x), 25M "
          f"{shown(figures['qwen2_25m_speedup_bs1'])} (target 2.5x); "
          f"batch 16: >= {shown(figures['min_speedup_bs16'])} (target 3x)")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
