"""The GPU code paths: bf16 weights and the grouped-GEMM kernel, bf16 autocast over float32 master
weights, fused AdamW, torch.compile with Triton kernels, the engine under CUDA graphs, and the
trainers on a GPU. Skipped where no GPU is visible (CI has none); on a GPU machine:

    HF_HUB_OFFLINE=1 python -m pytest tests/test_cuda.py
"""
from __future__ import annotations

import copy

import pytest
import torch

import r1kit
import r1kit.model.moe as moe_mod
from r1kit.engine import Engine, SamplingParams
from r1kit.model import ModelConfig, Transformer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[5, 9, 13, 2], [7, 1], [3, 3, 3, 3, 3, 3], [11]]


def make_model(preset: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(preset, **overrides))


def dense_moe_reference(moe, x):
    """Every expert on every token in float32, weighted by a dense gate matrix: the definition."""
    flat = x.reshape(-1, x.shape[-1]).float()
    ids, gates, _ = moe.gate(flat)
    dense = torch.zeros(flat.shape[0], moe.experts.gate_up_proj.shape[0], device=x.device).scatter(1, ids, gates)
    out = torch.zeros_like(flat)
    for e in range(dense.shape[1]):
        g, u = torch.nn.functional.linear(flat, moe.experts.gate_up_proj[e].float()).chunk(2, -1)
        out += dense[:, e:e + 1] * torch.nn.functional.linear(torch.nn.functional.silu(g) * u,
                                                              moe.experts.down_proj[e].float())
    shared = copy.deepcopy(moe.shared_experts).float()  # a float32 copy: the module itself stays as it is
    return (out + shared(flat)).view(x.shape)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2"])
def test_logits_parity_with_transformers_on_gpu(family, tmp_path):
    transformers = pytest.importorskip("transformers")
    preset = "tiny" if family == "deepseek_v3" else "tiny-dense"
    model = make_model(preset, num_nextn_predict_layers=0).eval()
    r1kit.save(model, None, tmp_path)
    ours, _ = r1kit.load(tmp_path, device="cuda")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_bf16_moe_runs_the_grouped_kernel_forward_and_backward(monkeypatch):
    moe = make_model("tiny", routed_scaling_factor=2.5).model.layers[1].mlp.cuda().to(torch.bfloat16).train()
    monkeypatch.setattr(moe_mod.Experts, "_loop", lambda *a: pytest.fail("bf16 on CUDA fell back to the loop"))
    x = torch.randn(4, 33, moe.config.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = moe(x)
    ref = dense_moe_reference(moe, x)
    assert (out.float() - ref).abs().max().item() < 0.03 * ref.abs().max().item()
    out.float().square().sum().backward()
    for p in (moe.experts.gate_up_proj, moe.experts.down_proj, x):
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()


def test_autocast_moe_takes_the_grouped_kernel_and_routes_in_float32(monkeypatch):
    moe = make_model("tiny", routed_scaling_factor=2.5).model.layers[1].mlp.cuda().train()
    monkeypatch.setattr(moe_mod.Experts, "_loop", lambda *a: pytest.fail("autocast fell back to the loop"))
    x = torch.randn(4, 33, moe.config.hidden_size, device="cuda", requires_grad=True)
    ref = dense_moe_reference(moe, x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = moe(x)
    assert (out.float() - ref).abs().max().item() < 0.03 * ref.abs().max().item()
    dy = torch.randn_like(ref)
    wrt = (moe.experts.gate_up_proj, moe.experts.down_proj)
    for a, b in zip(torch.autograd.grad(out.float(), wrt, dy), torch.autograd.grad(ref, wrt, dy)):
        assert a.dtype == torch.float32
        assert (a - b).abs().max().item() < 0.03 * b.abs().max().item()


def test_fused_adamw_is_chosen_on_gpu():
    from r1kit.train.optim import adamw

    model = make_model("tiny-dense").cuda()
    opt = adamw(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    assert opt.defaults.get("fused") is True


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_compiled_bf16_training_step_equals_eager(preset):
    """torch.compile with Triton kernels (and, for the MoE, r1kit::grouped_linear on CUDA) gives
    eager's loss and gradients, up to bf16 rounding."""
    torch._dynamo.reset()
    model = make_model(preset, num_nextn_predict_layers=0).cuda().to(torch.bfloat16).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 64), device="cuda")
    eager = model.loss(ids)["loss"]
    g_eager = torch.autograd.grad(eager, list(model.parameters()), allow_unused=True)
    compiled = torch.compile(lambda t: model.loss(t)["loss"])(ids)
    g_comp = torch.autograd.grad(compiled, list(model.parameters()), allow_unused=True)
    assert abs(compiled.item() - eager.item()) < 0.02 * abs(eager.item())
    num = sum(((a.float() - b.float()).norm() ** 2).item() for a, b in zip(g_comp, g_eager) if a is not None)
    den = sum((b.float().norm() ** 2).item() for b in g_eager if b is not None)
    assert num ** 0.5 < 0.05 * den ** 0.5, (num ** 0.5, den ** 0.5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_gpu_engine_greedy_is_argmax_of_full_forward(preset):
    model = make_model(preset).cuda().eval()
    engine = Engine(model, max_batch_size=8)
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for out, prompt in zip(outs, PROMPTS):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + out.token_ids], device="cuda"))[0].float()
        step = logits[len(prompt) - 1: len(prompt) - 1 + len(out.token_ids)]
        assert step.argmax(-1).tolist() == out.token_ids


@pytest.mark.parametrize("preset", ["tiny", "tiny-dense"])
def test_cuda_graph_engine_equals_eager_and_really_uses_graphs(preset):
    """compile=True on a GPU: inductor with CUDA graphs (mode reduce-overhead). Same tokens as the
    eager engine, and no step skipped CUDA graphs (that would silently cost their speed)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = make_model(preset).cuda().eval()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = Engine(model, max_batch_size=8, max_seq_len=64).generate(PROMPTS, params)
    graphed = Engine(model, max_batch_size=8, max_seq_len=64, compile=True)
    for _ in range(2):  # the second pass replays the recorded graphs
        outs = graphed.generate(PROMPTS, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in eager]
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    assert skips == 0, f"CUDA graphs skipped {skips} time(s)"


def test_sft_on_gpu_with_bf16_autocast_lowers_loss(tmp_path):
    from r1kit.tasks import make_task
    from r1kit.train.sft import SFTConfig, train_sft

    task = make_task("arithmetic", difficulty=2)
    rows = []
    for s in task.generate(300, seed=0):
        steps, answer = task.worked_solution(s)
        rows.append({"prompt": s["prompt"], "completion": f"<think>{steps}</think> <answer>{answer}</answer>"})
    config = SFTConfig(model="tiny", template="none", max_length=96, per_device_train_batch_size=16,
                       learning_rate=3e-3, warmup_steps=3, max_steps=30, eval_steps=15, output_dir=str(tmp_path),
                       progress=False, save_final=False, device="cuda")
    result = train_sft(config, train_samples=rows[:260], eval_samples=rows[260:])
    (_, first), _, (_, last) = result.eval_losses
    assert last < 0.6 * first, (first, last)


def test_grpo_on_gpu_runs_and_logs(tmp_path):
    from r1kit.tokenizer import train_tokenizer
    from r1kit.train.grpo import GRPOConfig, train_grpo

    tok = train_tokenizer([], kind="char")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size)).cuda()
    samples = [{"prompt": f"q{i}", "answer": str(i), "task": "toy", "meta": {}} for i in range(16)]
    config = GRPOConfig(template="{prompt}<think>", num_generations=4, batch_size=16, max_completion_length=12,
                        learning_rate=1e-3, max_steps=3, progress=False, seed=0, beta=0.04,
                        output_dir=str(tmp_path))
    result = train_grpo(config, model, tok, train_samples=samples,
                        reward_fn=lambda text, s: float(len(text) % 3 == 0))
    assert len(result.history) == 3 and result.skipped_steps == 0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert next(model.parameters()).device.type == "cuda"


def test_torchrun_on_gpu_with_nccl_matches_one_process(tmp_path):
    """torchrun on the GPU: NCCL's process group on the rank's cuda device, whose collectives take
    only GPU tensors (the loss sums and eval losses live on the CPU). One process, since NCCL refuses
    two ranks on one GPU, so DDP/FSDP2 themselves are not wrapped here (tests/test_distributed.py
    runs them with two ranks on gloo). SFT: the same steps as a plain run on the same GPU, equal
    losses and final weights; GRPO: two steps through the command line."""
    import json
    import subprocess
    import sys

    from safetensors.torch import load_file

    from r1kit.train.config import load_recipe
    from r1kit.train.sft import SFTConfig, train_sft
    from test_distributed import RECIPE, REPO, STEPS, check_grpo_run, free_port, metrics, run_grpo

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "completion": f"{a * b}" + "!" * (a % 5)}) + "\n"
                            for a in range(12) for b in range(10)))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.replace("{data}", str(data)))
    out = tmp_path / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "-m", "r1kit.cli", "train", "sft", "--config", str(recipe), f"output_dir={out}",
           "per_device_train_batch_size=4", "device=cuda"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(tmp_path / "single"), "device": "cuda",
                                                       "per_device_train_batch_size": 4}))
    losses, ref = metrics(out)[0], metrics(tmp_path / "single")[0]
    assert len(losses) == STEPS and max(abs(a - b) for a, b in zip(losses, ref)) < 1e-4, (losses, ref)
    ours, theirs = load_file(str(out / "final" / "model.safetensors")), load_file(str(single.final_path / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours) < 1e-4

    check_grpo_run(run_grpo(tmp_path, 1, "device=cuda", "save_every=1")[0], tmp_path / "base")
