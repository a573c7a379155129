"""r1kit's GRPO against TRL's GRPOTrainer: the same model, task, group size, completion length and
number of steps, in one run, for a tiny Qwen2 (hidden 256, 4 layers) and a ~25M one (hidden 512, 8).

    python bench/grpo_vs_trl.py                 # both sizes
    python bench/grpo_vs_trl.py --sizes tiny --steps 6
    python bench/grpo_vs_trl.py --pretrain-steps tiny=200,25m=100   # a base that does not depend on the machine's load

For each size:
1. a base: a Qwen2 with r1kit's char tokenizer, briefly pretrained (by r1kit, for a fixed time by default:
   on a busy machine the base gets fewer steps, is weaker, and more of its groups have no reward signal,
   which r1kit's update skips and TRL's does not; `--pretrain-steps` fixes the steps instead) on one-digit additions
   whose worked solutions come half from a solver that forgets the carry, saved as a Hugging Face
   folder - transformers loads it for TRL, r1kit for r1kit: both start from the same weights;
2. GRPO with identical settings: `num_generations`, prompts per step, `max_completion_length`,
   temperature 1, learning rate, beta 0, loss "grpo", group-std scaling, one iteration, the same
   reward function and prompt order; TRL with bf16=False, as the issue sets it (its CPU default);
3. seconds per step (median over the steps, so the first step's warm-up does not count; wall time and,
   since the machine is shared, CPU time of this single-threaded process too) and held-out
   pass@1 of both trained models, measured by the same evaluator (r1kit's engine, k samples at T=0.6),
   with the standard error of their difference over the 12 held-out problems (both sides' errors
   combined, and paired by problem).
4. where the time goes: each side's rollout (TRL's `_generate_and_score_completions`, timed by a
   wrapper; r1kit's generation) and update. Both updates run the same forward and backward products
   (r1kit leaves out the rows whose advantage is 0, see GRPOConfig.skip_zero_advantage), so
   TRL's step / r1kit's update bounds the speedup any rollout engine could bring.
5. a floor: the weight products r1kit's step cannot avoid, and nothing else (no attention, norms,
   sampling or Python). Generation runs one forward per prompt token (each prompt prefilled once)
   and per sampled token; the update a forward and a backward over the rows that carry a gradient,
   each group's prompt counted once. Timed in this run on this machine's GEMM kernels: the model's
   own (fused) weight matrices one after another, per token, at generation's batch (all rows live,
   the kernels' best case for decoding; the faster of torch's products and r1kit's packed ones) and
   at 2048 rows for the update (forward, dx and dW, torch's). TRL's
   step / that floor caps the speedup of an implementation that runs only those products with these
   kernels; the same arithmetic at the best GFLOP/s measured here (2048-row products of the model's
   shapes, or 1024^3) gives a second, looser cap.
Precision: r1kit's default (GRPOConfig.bf16 = "auto") multiplies its linear layers in bf16 on a CPU with AMX
(rollouts and update; weights, gradients, optimizer, attention and output head stay float32: r1kit/model/precision.py).
There the bench also runs r1kit with bf16=False and TRL with bf16=True (accelerate's CPU autocast), so that
each precision has its peer: the headline step_speedup is r1kit's default against TRL with bf16=False;
step_speedup_vs_trl_bf16 against TRL's faster bf16 run; step_speedup_fp32_vs_trl_fp32 float32 on both
sides. The floor then counts the blocks' products in bf16 (the head's stay float32, as r1kit runs them).
Both sides run in one process with r1kit's allocator setting (keep freed memory, r1kit/allocator.py):
it is process-wide, and TRL's step gains from it too.
r1kit runs twice: as configured by default, and with `compile=True` (the update's forward under
torch.compile, dynamic shapes; the compile time lands in the first steps, so the total time of all
steps is printed too). Generation stays eager in both: on this CPU, at 32 rows, the compiled decode
step (`compile_generation=True`, which attends over the whole cache) made the step slower.
The last line is JSON: step_speedup_tiny, step_speedup_25m, accuracy_delta (r1kit minus TRL, points,
averaged over the sizes) and the per-size figures.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import r1kit  # noqa: E402
from r1kit.allocator import keep_freed_memory  # noqa: E402
from r1kit.model import ModelConfig, Transformer, cpu_kernels, precision  # noqa: E402
from r1kit.tasks.arithmetic import ArithmeticTask  # noqa: E402
from r1kit.tokenizer import train_tokenizer  # noqa: E402
from r1kit.train import grpo  # noqa: E402

TEMPLATE = "{prompt}<think>"
SIZES = {
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "25m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}
TASK = ArithmeticTask(difficulty=1)


def problems():
    rows = [{"prompt": f"{a}+{b}", "answer": str(a + b), "task": "arithmetic", "meta": {"a": a, "b": b, "op": "+"}}
            for a in range(1, 10) for b in range(1, 10)]
    carry = [s for s in rows if s["meta"]["a"] + s["meta"]["b"] >= 10]
    random.Random(0).shuffle(carry)
    held_out = carry[:12]
    return [s for s in rows if s not in held_out], held_out, rows


def reward(text: str, sample: dict) -> float:
    return float(TASK.verify(text, sample))


def weight_matrices(model) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The blocks' weight matrices as an engine that fuses them runs them (q|k|v and gate|up one
    product each, every layer), and the output head (the tied embedding), all (out, in)."""
    blocks = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        blocks += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                   torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    head = model.lm_head.weight if model.lm_head is not None else model.model.embed_tokens.weight
    return [w.detach().contiguous() for w in blocks], head.detach().contiguous()


def _best_time(fn, seconds: float = 0.3) -> float:
    fn()
    best = float("inf")
    for _ in range(3):  # the best of three timed stretches
        t, reps = time.perf_counter(), 0
        while time.perf_counter() - t < seconds:
            fn()
            reps += 1
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def product_seconds(weights: list[torch.Tensor], rows: int, backward: bool, bf16: bool = False) -> float:
    """Seconds per token of these weight products alone, one after another as a model runs them,
    with `rows` tokens per product: forward x W^T; with backward also dx = dy W and dW = dy^T x.
    Forward only (generation), the faster of torch's products and r1kit's packed ones (cpu_kernels).
    `bf16`: the products in bf16 (as r1kit runs them on an AMX CPU: r1kit.model.precision), the
    packed ones in the kernels' bf16 mode."""
    dt = torch.bfloat16 if bf16 else torch.float32
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=dt) for w in weights}
    dys = {w.shape[0]: torch.randn(rows, w.shape[0], dtype=dt) for w in weights}
    weights_dt = [w.to(dt) for w in weights]
    wts = [w.t().contiguous() for w in weights_dt]  # (in, out): the layout r1kit's engine decodes with

    def run():
        with torch.no_grad():
            for w, wt in zip(weights_dt, wts):
                n, k = w.shape
                if backward:
                    torch.mm(xs[k], w.t())
                    torch.mm(dys[n], w)
                    torch.mm(dys[n].t(), xs[k])
                else:
                    torch.mm(xs[k], wt)
    best = _best_time(run)
    if not backward and cpu_kernels.library() is not None:
        packed = [cpu_kernels.PackedWeight() for _ in weights]
        xs32 = {k: v.float() for k, v in xs.items()}

        def run_packed():
            with torch.inference_mode(), precision.bf16_matmuls(bf16):
                for w, p in zip(weights, packed):
                    p(xs32[w.shape[1]], w, None)
        best = min(best, _best_time(run_packed))
    return best / rows


def gemm_peak(weights: list[torch.Tensor], rows: int = 2048, bf16: bool = False) -> float:
    """The best FLOP/s torch.mm reaches here on any one of these weight shapes with `rows` rows, or on 1024^3."""
    best = 0.0
    dt = torch.bfloat16 if bf16 else torch.float32
    for m, k, n in [(rows, w.shape[1], w.shape[0]) for w in weights] + [(1024, 1024, 1024)]:
        x, w = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        best = max(best, 2 * m * k * n / _best_time(lambda: x @ w))
    return best


def step_work(h: dict, rows: int, prompt_len: int, group: int) -> dict[str, float]:
    """The tokens whose weight products one r1kit step (history record `h`) cannot avoid.
    Generation: a forward per prompt token (each prompt once) and per sampled token but the last
    of each row, the head on each sampled token. Update: a forward and backward over the rows it
    trained, each group's prompt counted once, the head on their completion tokens."""
    trained_rows = h["update/rows"]
    completion = h["update/tokens"] - trained_rows * prompt_len
    return {"gen_body": h["generate/prompt_tokens"] + h["generate/tokens"] - rows, "gen_head": h["generate/tokens"],
            "upd_body": completion + -(-trained_rows // group) * prompt_len, "upd_head": completion}


def pretrain(model, tok, rows, seconds: float, lr: float, max_steps: int | None = None) -> int:
    """`seconds` of pretraining, or exactly `max_steps` steps when given (a base that does not depend on
    how busy the machine is)."""
    rng = random.Random(0)
    eos = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    start, step = time.perf_counter(), 0
    while (step < max_steps) if max_steps is not None else (time.perf_counter() - start < seconds):
        batch = []
        for s in (rng.choice(rows) for _ in range(32)):
            steps, answer = TASK.worked_solution(s, sloppy=rng.random() < 0.5)
            p = tok.encode(TEMPLATE.replace("{prompt}", s["prompt"]), add_special_tokens=True)
            batch.append((p, tok.encode(steps + "</think>" + answer) + [eos]))
        width = max(len(p) + len(c) for p, c in batch)
        ids, mask = torch.full((len(batch), width), eos), torch.zeros(len(batch), width)
        for i, (p, c) in enumerate(batch):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p):len(p) + len(c)] = 1
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        loss = model.loss(ids, mask)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
    model.eval()
    return step


def run_trl(folder: Path, train, args, workdir: Path, lengths: list, rollout_times: list,
            bf16: bool = False) -> tuple[list[float], Path]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    hf_tok = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    order = _prompt_order(train, args)
    ds = Dataset.from_list([{"prompt": TEMPLATE.replace("{prompt}", s["prompt"]), "answer": s["answer"],
                             "a": s["meta"]["a"], "b": s["meta"]["b"]} for s in order])

    def trl_reward(completions, answer, a, b, **_):
        return [reward(c, {"answer": x, "meta": {"a": aa, "b": bb, "op": "+"}}) for c, x, aa, bb in
                zip(completions, answer, a, b)]

    B = args.prompts * args.num_generations
    config = TRLConfig(
        output_dir=str(workdir / ("trl-bf16" if bf16 else "trl")), per_device_train_batch_size=B, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, max_steps=args.steps,
        beta=0.0, loss_type="grpo", scale_rewards="group", num_iterations=1, temperature=1.0, top_p=1.0,
        epsilon=0.2, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
        bf16=bf16, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
        shuffle_dataset=False, disable_dropout=True, dataloader_num_workers=0,
    )
    times: list[tuple[float, float]] = []  # (wall, cpu) seconds per step

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, *a, **k):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

    trainer = GRPOTrainer(model=hf_model, reward_funcs=trl_reward, args=config, train_dataset=ds,
                          processing_class=hf_tok, callbacks=[Clock()])
    rollout = trainer._generate_and_score_completions  # generation + rewards + advantages, once per step

    def timed_rollout(*a, **k):
        t = time.perf_counter()
        try:
            return rollout(*a, **k)
        finally:
            rollout_times.append(time.perf_counter() - t)

    trainer._generate_and_score_completions = timed_rollout
    trainer.train()
    lengths.extend(h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h)
    out = workdir / ("trl-bf16-final" if bf16 else "trl-final")
    hf_model.save_pretrained(out)
    hf_tok.save_pretrained(out)
    return times, out


def _prompt_order(train, args) -> list[dict]:
    """The prompts of every step, in order: both trainers see the same questions."""
    rng = random.Random(1)
    return [rng.choice(train) for _ in range(args.steps * args.prompts)]


def run_r1kit(folder: Path, train, args, compiled: bool = False, bf16: bool | str = "auto") -> tuple[list[float], object]:
    model, tok = r1kit.load(folder)
    order = _prompt_order(train, args)
    config = grpo.GRPOConfig(
        template=TEMPLATE, num_generations=args.num_generations, batch_size=args.prompts * args.num_generations,
        max_completion_length=args.max_completion_length, learning_rate=args.lr, max_steps=args.steps,
        beta=0.0, loss_type="grpo", scale_rewards="group", num_iterations=1, temperature=1.0, epsilon=0.2,
        max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.99, progress=False, seed=0,
        shuffle_dataset=False,  # the same prompts per step as TRL's unshuffled sampler
        compile=compiled, bf16=bf16,
    )
    cpu = [time.process_time()]
    result = grpo.train_grpo(config, model, tok, train_samples=order, reward_fn=reward,
                             callback=lambda m: cpu.append(time.process_time()))
    # the first step's CPU time also holds the setup; the median ignores it
    times = [(h["time/step"], b - a, h["completions/mean_length"], h["time/generate"], h["time/update"], h)
             for h, a, b in zip(result.history, cpu, cpu[1:])]
    return times, model


def held_out_pass1(model, tok, held_out, args) -> tuple[float, float, list[float]]:
    cfg = grpo.GRPOConfig(template=TEMPLATE, max_completion_length=args.max_completion_length)
    out = grpo.evaluate_pass1(model, tok, held_out, cfg, verify=lambda t, s: reward(t, s) >= 1.0, k=args.k,
                              per_problem=True)
    return out["pass@1"], out["pass@1_stderr"], out["per_problem"]


def paired_stderr(a: list[float], b: list[float]) -> float:
    """Standard error of mean(a - b) over problems: both models answer the same problems, so their
    difference is judged by its per-problem spread, not by each side's spread across problems."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    return (sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,25m")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step")
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=48)
    ap.add_argument("--learning-rate", default="tiny=2e-4,25m=3e-5",
                    help="GRPO learning rate per size (2e-4 collapsed the 25M model on both sides)")
    ap.add_argument("--pretrain-seconds", default="tiny=90,25m=300")
    ap.add_argument("--pretrain-steps", default=None,
                    help="e.g. tiny=200,25m=100: a fixed number of pretraining steps instead of seconds, so that "
                         "runs on a busy machine start from the same base")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared 2-core machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # r1kit's trainers keep freed memory in the process (r1kit/allocator.py); it is a process-wide
    # setting, so set it here for both sides alike: TRL's step gains from it as well
    keep_freed_memory()
    warnings.filterwarnings("ignore")
    budgets = dict(kv.split("=") for kv in args.pretrain_seconds.split(","))
    fixed_steps = dict(kv.split("=") for kv in args.pretrain_steps.split(",")) if args.pretrain_steps else {}
    rates = dict(kv.split("=") for kv in args.learning_rate.split(","))
    train, held_out, everything = problems()
    tok = train_tokenizer([], kind="char")
    # r1kit's default (GRPOConfig.bf16 = "auto"): bf16 products on a CPU with AMX. Then r1kit also runs
    # in float32, and TRL with bf16=True too (accelerate's CPU autocast), so that each precision has its peer
    mixed = precision.wanted("auto", "cpu", min(v["hidden_size"] for v in SIZES.values()))
    print(f"r1kit's default here: {'bf16 products (AMX)' if mixed else 'float32'}", flush=True)
    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            work = Path(tmp) / size
            args.lr = float(rates[size])
            torch.manual_seed(0)
            cfg = ModelConfig(model_type="qwen2", vocab_size=tok.vocab_size, max_position_embeddings=256,
                              tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **SIZES[size])
            model = Transformer(cfg)
            n_params = model.num_parameters()
            steps = pretrain(model, tok, everything, float(budgets[size]), lr=1e-3 if size == "25m" else 2e-3,
                             max_steps=int(fixed_steps[size]) if size in fixed_steps else None)
            # the floor's yardsticks, measured now on this machine: the best GEMM speed, and the weight
            # products alone per token at the batch generation runs (all rows) and at 2048 rows (update)
            # (in bf16 where r1kit's default run multiplies in bf16: its blocks' products, not the head's)
            blocks, head = weight_matrices(model)
            peak = gemm_peak(blocks + [head], bf16=mixed)
            B = args.prompts * args.num_generations
            per_token = {"gen_body": product_seconds(blocks, B, False, bf16=mixed), "gen_head": product_seconds([head], B, False),
                         "upd_body": product_seconds(blocks, 2048, True, bf16=mixed),
                         "upd_head": product_seconds([head], 2048, True)}
            flops_per_token = {"gen_body": 2 * sum(w.numel() for w in blocks), "gen_head": 2 * head.numel(),
                               "upd_body": 6 * sum(w.numel() for w in blocks), "upd_head": 6 * head.numel()}
            plens = {len(tok.encode(TEMPLATE.replace("{prompt}", s["prompt"]), add_special_tokens=True)) for s in train}
            assert len(plens) == 1, plens  # every prompt is "a+b": the floor counts prompts by one length
            prompt_len = plens.pop()
            base = work / "base"
            r1kit.save(model, tok, base)
            base_acc, _, _ = held_out_pass1(model, tok, held_out, args)
            print(f"[{size}] Qwen2 {n_params / 1e6:.1f}M params, pretrained {steps} steps; base held-out pass@1 "
                  f"{100 * base_acc:.1f}%", flush=True)
            # interleaved in one run, r1kit first then TRL; each from the same saved base
            r1_times, r1_model = run_r1kit(base, train, args)
            r1_acc, r1_se, r1_pp = held_out_pass1(r1_model, tok, held_out, args)
            comp_times, comp_model = run_r1kit(base, train, args, compiled=True)
            comp_acc, _, _ = held_out_pass1(comp_model, tok, held_out, args)
            if mixed:
                f32_times, f32_model = run_r1kit(base, train, args, bf16=False)
                f32_acc, _, _ = held_out_pass1(f32_model, tok, held_out, args)
            trl_lengths: list[float] = []
            trl_rollout: list[float] = []
            trl_times, trl_folder = run_trl(base, train, args, work, trl_lengths, trl_rollout)
            trl_model, _ = r1kit.load(trl_folder)
            trl_acc, trl_se, trl_pp = held_out_pass1(trl_model, tok, held_out, args)
            if mixed:
                trl16_times, trl16_folder = run_trl(base, train, args, work, [], [], bf16=True)
                trl16_acc, trl16_se, trl16_pp = held_out_pass1(r1kit.load(trl16_folder)[0], tok, held_out, args)
            r1_step, trl_step, comp_step = (statistics.median(t[0] for t in ts) for ts in (r1_times, trl_times, comp_times))
            comp_total = sum(t[0] for t in comp_times)  # compiling is paid in the first steps: the sum shows it
            r1_cpu, trl_cpu = (statistics.median(t[1] for t in ts) for ts in (r1_times, trl_times))
            # where the time goes: rollout (generation, rewards) and update, each side
            r1_gen, r1_upd = (statistics.median(t[k] for t in r1_times[1:] or r1_times) for k in (3, 4))
            trl_gen = statistics.median(trl_rollout[1:] or trl_rollout) if trl_rollout else float("nan")
            # the floors of r1kit's step: its unavoidable weight products on this machine's GEMM kernels, and
            # the same arithmetic at the best GEMM speed measured here
            work = [step_work(t[5], B, prompt_len, args.num_generations) for t in (r1_times[1:] or r1_times)]
            floor = statistics.median(sum(w[k] * per_token[k] for k in w) for w in work)
            floor_peak = statistics.median(sum(w[k] * flops_per_token[k] for k in w) / peak for w in work)
            # the same floor per phase: which of r1kit's two phases is further from its products
            floor_gen, floor_upd = (statistics.median(sum(w[k] * per_token[k] for k in w if k.startswith(phase))
                                                      for w in work) for phase in ("gen_", "upd_"))
            figures[size] = {
                "params_m": round(n_params / 1e6, 2), "r1kit_s_per_step": round(r1_step, 3),
                "trl_s_per_step": round(trl_step, 3), "step_speedup": round(trl_step / r1_step, 2),
                "r1kit_cpu_s_per_step": round(r1_cpu, 3), "trl_cpu_s_per_step": round(trl_cpu, 3),
                "cpu_speedup": round(trl_cpu / r1_cpu, 2),
                "base_pass1": round(100 * base_acc, 1), "r1kit_pass1": round(100 * r1_acc, 1),
                "trl_pass1": round(100 * trl_acc, 1), "accuracy_delta": round(100 * (r1_acc - trl_acc), 1),
                # standard error of that difference over the held-out problems (both sides' errors combined)
                "accuracy_delta_stderr": round(100 * (r1_se ** 2 + trl_se ** 2) ** 0.5, 1),
                # the same, paired by problem (the sharper test: both answer the same 12 problems)
                "accuracy_delta_paired_stderr": round(100 * paired_stderr(r1_pp, trl_pp), 1),
                "r1kit_compiled_s_per_step": round(comp_step, 3), "step_speedup_compiled": round(trl_step / comp_step, 2),
                "r1kit_compiled_total_s": round(comp_total, 1), "r1kit_total_s": round(sum(t[0] for t in r1_times), 1),
                "trl_total_s": round(sum(t[0] for t in trl_times), 1), "r1kit_compiled_pass1": round(100 * comp_acc, 1), "learning_rate": args.lr,
                # the work per step depends on how long the completions are: both sides, side by side
                "r1kit_mean_completion_len": round(statistics.mean(float(t[2]) for t in r1_times), 1),
                "trl_mean_completion_len": round(statistics.mean(float(x) for x in trl_lengths), 1) if trl_lengths else None,
                "r1kit_generate_s": round(r1_gen, 3), "r1kit_update_s": round(r1_upd, 3),
                "trl_rollout_s": round(trl_gen, 3), "trl_update_s": round(trl_step - trl_gen, 3),
                # r1kit's update does the same products as TRL's less the skipped rows: with generation
                # free, the step could be at most this much faster than TRL's
                "step_speedup_bound_free_generation": round(trl_step / r1_upd, 2),
                "gemm_peak_gflops": round(peak / 1e9, 1), "floor_s_per_step": round(floor, 3),
                "floor_at_peak_s_per_step": round(floor_peak, 3),
                # an implementation that ran only the step's weight products, on this machine's GEMM kernels,
                # would still be at most this much faster than TRL; at the best GEMM speed, the second
                "step_speedup_cap": round(trl_step / floor, 2), "step_speedup_cap_at_peak": round(trl_step / floor_peak, 2),
                "r1kit_share_of_floor": round(floor / r1_step, 2),
                "floor_generate_s": round(floor_gen, 3), "floor_update_s": round(floor_upd, 3),
                "r1kit_bf16_products": mixed,
            }
            f = figures[size]
            if mixed:  # each precision against its peer: float32 both sides, bf16 both sides
                f32_step = statistics.median(t[0] for t in f32_times)
                trl16_step = statistics.median(t[0] for t in trl16_times)
                f.update({
                    "r1kit_fp32_s_per_step": round(f32_step, 3), "r1kit_fp32_pass1": round(100 * f32_acc, 1),
                    "step_speedup_fp32_vs_trl_fp32": round(trl_step / f32_step, 2),
                    "trl_bf16_s_per_step": round(trl16_step, 3), "trl_bf16_pass1": round(100 * trl16_acc, 1),
                    "step_speedup_vs_trl_bf16": round(trl16_step / r1_step, 2),
                    "accuracy_delta_vs_trl_bf16": round(100 * (r1_acc - trl16_acc), 1),
                    "accuracy_delta_vs_trl_bf16_paired_stderr": round(100 * paired_stderr(r1_pp, trl16_pp), 1),
                    "bf16_gain_r1kit": round(f32_step / r1_step, 2), "bf16_gain_trl": round(trl_step / trl16_step, 2),
                })
                print(f"[{size}] bf16 products: r1kit {r1_step:.3f} s/step (float32 {f32_step:.3f}: {f['bf16_gain_r1kit']:.2f}x "
                      f"from bf16), TRL bf16=True {trl16_step:.3f} (float32 {trl_step:.3f}: {f['bf16_gain_trl']:.2f}x) -> "
                      f"r1kit {f['step_speedup_vs_trl_bf16']:.2f}x TRL in bf16; float32 on both sides "
                      f"{f['step_speedup_fp32_vs_trl_fp32']:.2f}x; held-out pass@1 r1kit float32 {f['r1kit_fp32_pass1']}%, "
                      f"TRL bf16 {f['trl_bf16_pass1']}% (r1kit minus TRL bf16: {f['accuracy_delta_vs_trl_bf16']:+.1f} "
                      f"+- {f['accuracy_delta_vs_trl_bf16_paired_stderr']} paired)", flush=True)
            print(f"[{size}] s/step: r1kit {r1_step:.3f}  TRL {trl_step:.3f}  -> r1kit {f['step_speedup']:.2f}x faster (CPU time: {f['cpu_speedup']:.2f}x); "
                  f"held-out pass@1 after {args.steps} steps: r1kit {f['r1kit_pass1']}%  TRL {f['trl_pass1']}% "
                  f"(difference {f['accuracy_delta']:+.1f} +- {f['accuracy_delta_stderr']} points, one standard error; "
                  f"+- {f['accuracy_delta_paired_stderr']} paired by problem) "
                  f"(base {f['base_pass1']}%); mean completion length r1kit {f['r1kit_mean_completion_len']} "
                  f"TRL {f['trl_mean_completion_len']} tokens", flush=True)
            print(f"[{size}] where the time goes (median s/step): r1kit generate {r1_gen:.3f} + update {r1_upd:.3f}; "
                  f"TRL generate+score {trl_gen:.3f} + the rest (update) {trl_step - trl_gen:.3f}; with generation free, "
                  f"r1kit's step could be at most {f['step_speedup_bound_free_generation']:.2f}x TRL's", flush=True)
            print(f"[{size}] floor: the step's unavoidable weight products alone take {floor:.3f} s on this machine's GEMM "
                  f"kernels ({floor_peak:.3f} s if every product ran at the best {peak / 1e9:.1f} GFLOP/s measured here) -> "
                  f"an implementation that ran nothing else would be {f['step_speedup_cap']:.2f}x TRL's step "
                  f"({f['step_speedup_cap_at_peak']:.2f}x); r1kit's step takes {1 / f['r1kit_share_of_floor']:.2f}x that floor "
                  f"(generation {r1_gen / floor_gen:.2f}x its {floor_gen:.3f} s, update {r1_upd / floor_upd:.2f}x its "
                  f"{floor_upd:.3f} s)", flush=True)
            print(f"[{size}] compiled update: {comp_step:.3f} s/step -> {f['step_speedup_compiled']:.2f}x TRL; "
                  f"all {args.steps} steps incl. compiling {comp_total:.1f} s vs eager {f['r1kit_total_s']} s vs TRL "
                  f"{f['trl_total_s']} s; pass@1 {f['r1kit_compiled_pass1']}%", flush=True)
    out = {f"step_speedup_{k}": v["step_speedup"] for k, v in figures.items()}
    out.update({f"step_speedup_vs_trl_bf16_{k}": v["step_speedup_vs_trl_bf16"] for k, v in figures.items()
                if "step_speedup_vs_trl_bf16" in v})
    out.update({f"step_speedup_compiled_{k}": v["step_speedup_compiled"] for k, v in figures.items()})
    out["accuracy_delta"] = round(statistics.mean(v["accuracy_delta"] for v in figures.values()), 1)
    out["accuracy_delta_stderr"] = round(sum(v["accuracy_delta_stderr"] ** 2 for v in figures.values()) ** 0.5
                                         / len(figures), 1)
    out.update({"steps": args.steps, "num_generations": args.num_generations, "prompts_per_step": args.prompts,
                "max_completion_length": args.max_completion_length, "eval_k": args.k, "sizes": figures})
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
