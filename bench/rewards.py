"""Reward throughput: math rewards/s on 1,000 completions and sandboxed HumanEval programs/s.

Peers measured in the same run, interleaved in chunks (this machine is shared and noisy):
- math: r1kit.rewards.math_reward vs calling math-verify's parse + verify directly on the same text;
- sandbox: the strongest isolation (namespaces) vs the "basic" mode (a plain rlimited process),
  both through the same worker pool, so the ratio is the price of the isolation.
The last line printed is one JSON object.

    python bench/rewards.py [--programs 164] [--completions 1000]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time

from r1kit import sandbox
from r1kit.rewards import math_reward
from r1kit.tasks import load_benchmark
from r1kit.tasks.code_tests import build_job, read_report


def math_completions(n: int, seed: int = 0):
    rng = random.Random(seed)
    gsm = load_benchmark("gsm8k")
    m500 = load_benchmark("math500")
    out = []
    for i in range(n):
        if i % 2 == 0:
            s = rng.choice(gsm)
            ans = s["answer"] if rng.random() < 0.5 else str(int(float(s["answer"])) + 1)
            out.append((f"<think>{s['meta']['solution'][:200]}</think> The answer is \\boxed{{{ans}}}.", s["answer"]))
        else:
            s = rng.choice(m500)
            ans = s["answer"] if rng.random() < 0.5 else rng.choice(m500)["answer"]
            out.append((f"<think>working</think> So the final answer is \\boxed{{{ans}}}.", s["answer"]))
    return out


def raw_math_verify(completion: str, gold: str) -> float:
    from math_verify import parse, verify

    try:
        return float(verify(parse(f"${gold}$"), parse(completion.split("</think>")[-1])))
    except Exception:
        return 0.0


def bench_math(n: int, chunks: int = 5):
    items = math_completions(n)
    ours_t = peer_t = 0.0
    ours_score = peer_score = 0.0
    size = (n + chunks - 1) // chunks
    for c in range(chunks):  # interleaved: ours, peer, ours, peer ...
        part = items[c * size:(c + 1) * size]
        t = time.perf_counter()
        ours_score += sum(math_reward(comp, gold) for comp, gold in part)
        ours_t += time.perf_counter() - t
        t = time.perf_counter()
        peer_score += sum(raw_math_verify(comp, gold) for comp, gold in part)
        peer_t += time.perf_counter() - t
    return n / ours_t, n / peer_t, ours_score / n, peer_score / n


def bench_sandbox(n_programs: int, chunks: int = 4):
    rows = load_benchmark("humaneval")[:n_programs]
    jobs = [(s["prompt"] + s["meta"]["canonical_solution"], s["answer"], s["meta"]["entry_point"]) for s in rows]
    times = {"namespaces": 0.0, "basic": 0.0}
    passed = {"namespaces": 0, "basic": 0}
    cpu = {"namespaces": 0.0, "basic": 0.0}
    size = (len(jobs) + chunks - 1) // chunks
    modes = ["namespaces", "basic"] if sandbox.available_isolation() == "namespaces" else ["basic"]
    for c in range(chunks):
        part = jobs[c * size:(c + 1) * size]
        for mode in modes:
            prepared = [build_job(code, tests, entry, False) for code, tests, entry in part]
            cpu0 = _children_cpu()
            t = time.perf_counter()
            futures = [sandbox.submit(h, timeout_s=10, memory_mb=1024, isolation=mode, **kw) for kw, _, h in prepared]
            reports = [read_report(f.result(), nonce) for f, (_, nonce, _) in zip(futures, prepared)]
            times[mode] += time.perf_counter() - t
            cpu[mode] += _children_cpu() - cpu0
            passed[mode] += sum(r.all_passed for r in reports)
    return {m: len(jobs) / times[m] for m in modes}, passed, len(jobs), {m: cpu[m] / len(jobs) for m in modes}


def _children_cpu() -> float:
    """CPU seconds of all reaped descendants: load-independent cost of a program."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--completions", type=int, default=1000)
    ap.add_argument("--programs", type=int, default=164)
    args = ap.parse_args()
    load = os.getloadavg()[0]
    ours, peer, acc_ours, acc_peer = bench_math(args.completions)
    print(f"math: {ours:8.1f} rewards/s  (raw math-verify parse+verify: {peer:8.1f}/s, ratio {ours / peer:.2f}x); "
          f"mean reward {acc_ours:.3f} vs {acc_peer:.3f}")
    rates, passed, n, cpu = bench_sandbox(args.programs)
    best = "namespaces" if "namespaces" in rates else "basic"
    print(f"sandbox ({sandbox.default_workers()} workers, {os.cpu_count()} cores): {best} {rates[best]:.1f} programs/s, "
          f"{passed[best]}/{n} canonical HumanEval solutions pass")
    if "basic" in rates and best != "basic":
        print(f"  basic (no namespaces) {rates['basic']:.1f} programs/s: isolation costs "
              f"{rates['basic'] / rates[best]:.2f}x")
    idle_rate = (os.cpu_count() or 1) / cpu[best]
    print(f"  CPU per program {1000 * cpu[best]:.1f} ms -> {idle_rate:.0f} programs/s if the {os.cpu_count()} cores were ours alone")
    print(f"load average at start: {load:.1f} (other work on this machine slows every figure)")
    print(json.dumps({
        "math_rewards_per_s": round(ours, 1), "math_verify_raw_per_s": round(peer, 1),
        "math_ratio_vs_raw": round(ours / peer, 2),
        "sandbox_programs_per_s": round(rates[best], 1), "sandbox_isolation": best,
        "sandbox_basic_programs_per_s": round(rates.get("basic", 0.0), 1),
        "sandbox_cpu_ms_per_program": round(1000 * cpu[best], 1),
        "sandbox_programs_per_s_idle_cores_estimate": round(idle_rate, 1),
        "humaneval_canonical_passed": passed[best], "humaneval_programs": n,
        "workers": sandbox.default_workers(), "cores": os.cpu_count(), "load_avg_at_start": round(load, 2),
    }))


if __name__ == "__main__":
    main()
