"""torchrun scale-out on CPU (gloo), for DDP and for FSDP2 (`fully_shard`). SFT: 2 processes reproduce
1 process over the same global batch, to 1e-5 in every step's loss and in the final weights. GRPO:
`r1kit train grpo` runs, checkpoints and resumes on 2 ranks, and its update over 2 ranks equals one
process's to 1e-5."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1kit.train.config import load_recipe
from r1kit.train.sft import SFTConfig, train_sft

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
RECIPE = """
mode = "sft"
model = "tiny"
template = "none"
max_length = 32
learning_rate = 1e-3
warmup_steps = 2
max_steps = %d
save_steps = 3
eval_fraction = 0.1
torch_threads = 1
progress = false
seed = 5
train_files = ["{data}"]

[model_overrides]  # a small DeepSeek-V3: MLA + MoE (router bias all-reduced across ranks) + MTP
num_hidden_layers = 2
hidden_size = 64
intermediate_size = 128
moe_intermediate_size = 32
q_lora_rank = 32
kv_lora_rank = 32
qk_nope_head_dim = 16
qk_rope_head_dim = 8
v_head_dim = 16
""" % STEPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(recipe: Path, out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "r1kit.cli", "train", "sft", "--config", str(recipe), f"output_dir={out}",
           "per_device_train_batch_size=2", "gradient_accumulation_steps=1", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(out: Path) -> tuple[list[float], list[float]]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["eval_loss"] for r in rows if "eval_loss" in r]


def test_torchrun_two_processes_match_one(tmp_path):
    rng = random.Random(1)
    data = tmp_path / "train.jsonl"
    # completions of different lengths, so the per-rank token counts differ and the global
    # token-count normaliser matters
    data.write_text("".join(json.dumps({"prompt": f"{a}*{b}=", "completion": f"{a * b}" + "!" * (a % 5)}) + "\n"
                            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(120))))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.replace("{data}", str(data)))

    runs = {mode: torchrun(recipe, tmp_path / mode, f"distributed={mode}") for mode in ("ddp", "fsdp")}
    # the same global batch of 4 on one process: 2 micro-batches of 2, accumulated
    single = train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(tmp_path / "single"),
                                                       "per_device_train_batch_size": 2,
                                                       "gradient_accumulation_steps": 2}))
    ref_weights = load_file(str(single.final_path / "model.safetensors"))
    ref_losses, ref_eval = metrics(tmp_path / "single")
    assert len(ref_losses) == STEPS and ref_losses[-1] < ref_losses[0]

    for mode, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{mode}: {err[-3000:]}"
        losses, evals = metrics(tmp_path / mode)
        assert len(losses) == STEPS
        diff = max(abs(a - b) for a, b in zip(losses, ref_losses))
        assert diff < 1e-5, f"{mode}: losses differ by {diff}: {losses} vs {ref_losses}"
        assert max(abs(a - b) for a, b in zip(evals, ref_eval)) < 1e-5
        weights = load_file(str(tmp_path / mode / "final" / "model.safetensors"))
        assert weights.keys() == ref_weights.keys()
        worst = max((weights[k].float() - ref_weights[k].float()).abs().max().item() for k in weights)
        print(f"{mode} x2 vs 1 process: max loss diff {diff:.2e}, max weight diff {worst:.2e}")
        assert worst < 1e-5, f"{mode}: final weights differ by {worst}"
        # the MoE balancing bias moved, identically (it sees the all-reduced expert load)
        bias = [k for k in weights if k.endswith("e_score_correction_bias")]
        assert bias and any(weights[k].abs().sum() > 0 for k in bias)
        assert all(torch.equal(weights[k], ref_weights[k]) for k in bias)
        # rank 0 alone wrote checkpoints and logs; a checkpoint holds every rank's RNG state
        state = torch.load(tmp_path / mode / f"checkpoint-{STEPS}" / "trainer_state" / "training.pt",
                           weights_only=False)
        assert len(state["rng"]) == 2
        assert json.loads(out.strip().splitlines()[-1])["steps"] == STEPS


GRPO_RECIPE = """
model = "{model}"
task = "arithmetic"
num_train_samples = 64
template = "{{prompt}}<think>"
reward_weights = {{ length = 1.0 }}          # varied rewards from a random model: every group has signal
reward_options = {{ length = {{ max_length = 16, buffer = 15 }} }}
num_generations = 4
batch_size = 16
max_completion_length = 16
loss_type = "{loss_type}"
beta = {beta}
learning_rate = 1e-3
max_steps = 2
progress = false
sample_every = 0
seed = 3
"""


def grpo_base(folder: Path) -> Path:
    """A random tiny DeepSeek-V3 (MLA + MoE) with a character tokenizer, saved as a checkpoint."""
    import r1kit
    from r1kit.model import ModelConfig, Transformer
    from r1kit.tokenizer import train_tokenizer

    tok = train_tokenizer([], kind="char")
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0))
    r1kit.save(model, tok, folder)
    return folder


def run_grpo(tmp_path: Path, nproc: int, *overrides: str, loss_type: str = "grpo", beta: float = 0.04,
             name: str | None = None) -> tuple[Path, str]:
    """`r1kit train grpo` under torchrun with `nproc` processes: (output folder, stderr)."""
    base = tmp_path / "base"
    if not base.exists():
        grpo_base(base)
    recipe = tmp_path / f"grpo-{loss_type}.toml"
    recipe.write_text(GRPO_RECIPE.format(model=base, loss_type=loss_type, beta=beta))
    out = tmp_path / (name or "-".join([loss_type, *overrides]).replace("=", "_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "r1kit.cli", "train", "grpo", "--config", str(recipe), f"output_dir={out}",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


def check_grpo_run(out: Path, base: Path, steps: int = 2) -> list[dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))  # rank 0 alone logs, once per step
    assert all(r["frac_reward_zero_std"] < 1 for r in logged)  # there was something to learn
    before, after = load_file(str(base / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    return logged


def test_grpo_under_torchrun_two_ranks(tmp_path):
    """GRPO's scale-out on CPU (gloo): two ranks each generate half of the groups, metrics are
    averaged over ranks (all-reduced), the update runs under DDP or FSDP2 (dapo: its token count
    all-reduced, dynamic sampling with a different number of rounds per rank), and rank 0 logs and
    writes the weights gathered from every rank. Under FSDP2 the reference model is sharded too,
    checkpoints gather the optimizer state by parameter name, and a run resumes from them."""
    import r1kit

    base = tmp_path / "base"
    # two micro-batches per rank: the first accumulates without an all-reduce (no_sync)
    check_grpo_run(run_grpo(tmp_path, 2, "distributed=ddp", "micro_batch_size=4", "save_every=2")[0], base)
    check_grpo_run(run_grpo(tmp_path, 2, "distributed=fsdp", loss_type="dapo", beta=0.0)[0], base)
    out, _ = run_grpo(tmp_path, 2, "distributed=fsdp", "save_every=1", "micro_batch_size=4", name="fsdp-kl")
    assert any(r["kl"] > 0 for r in check_grpo_run(out, base))
    state = torch.load(out / "checkpoint-2" / "trainer_state" / "optimizer.pt", weights_only=False)
    policy, _ = r1kit.load(base)
    assert set(state["optimizer"]["state"]) == {n for n, _ in policy.named_parameters()}  # every rank's shards
    assert state["ref_model"].keys() == policy.state_dict().keys()
    assert all(state["ref_model"][k].shape == v.shape for k, v in policy.state_dict().items())
    out, err = run_grpo(tmp_path, 2, "distributed=fsdp", "save_every=1", "micro_batch_size=4", "max_steps=3",
                        name="fsdp-kl")
    assert "resumed from" in err and "step 2" in err
    check_grpo_run(out, base, steps=3)


# ---------------------------------------------------------------------------- GRPO's update over two ranks


def _grpo_update_config(loss_type: str):
    from r1kit.train.grpo import GRPOConfig

    return GRPOConfig(template="{prompt}<think>", num_generations=4, batch_size=16, max_completion_length=10,
                      loss_type=loss_type, beta=0.04, seed=0, progress=False).resolved()


def _grpo_model():
    from r1kit.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.preset("tiny", vocab_size=_char_tokenizer().vocab_size, num_nextn_predict_layers=0,
                                          hidden_size=64, num_hidden_layers=2))


def _char_tokenizer():
    from r1kit.tokenizer import train_tokenizer

    return train_tokenizer([], kind="char")


def _grpo_step(model, train_model, rollout, loss_type: str, world_size: int) -> None:
    from r1kit.train import grpo

    opt = torch.optim.SGD(model.parameters(), lr=0.5)  # the step is the gradient (Adam would amplify rounding)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    grpo._update(_grpo_update_config(loss_type), model, train_model, opt, sched, rollout,
                 minibatch=len(rollout), micro=max(1, len(rollout) // 2), world_size=world_size, step=0)


def _grpo_update_rank(rank: int, world: int, init_file: str, mode: str, loss_type: str, folder: str) -> None:
    import torch.distributed as dist

    from r1kit.train import distributed as dist_
    from r1kit.train.grpo import wrap_for_update

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    rollout = torch.load(Path(folder) / "rollout.pt", weights_only=False)
    half = len(rollout) // world
    part = rollout.select(list(range(rank * half, (rank + 1) * half)))  # this rank's whole groups
    model = _grpo_model()
    train_model = wrap_for_update(model, dist_.DistInfo(rank=rank, world_size=world), mode)
    _grpo_step(model, train_model, part, loss_type, world)
    final = dist_.saveable_model(model)
    if rank == 0:
        torch.save(final.state_dict(), Path(folder) / "two_ranks.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("mode,loss_type", [("ddp", "grpo"), ("ddp", "dapo"), ("fsdp", "dr_grpo"), ("fsdp", "dapo")])
def test_grpo_update_on_two_ranks_equals_one_process(mode, loss_type, tmp_path):
    """The same rollout, split by groups over two ranks (each two micro-batches, accumulated without
    an all-reduce but the last), under DDP or FSDP2: the same step as one process over all of it, to
    1e-5 (grpo: per-sequence means; dr_grpo: a constant normaliser; dapo: the token count all-reduced)."""
    import torch.multiprocessing as mp

    from r1kit.engine import Engine
    from r1kit.train import grpo
    from r1kit.train.grpo_loss import group_advantages

    config = _grpo_update_config(loss_type)
    model = _grpo_model()
    tok = _char_tokenizer()
    engine = Engine(_grpo_model(), tok, max_batch_size=16, max_seq_len=32)
    prompts = [[5, 9, 13], [7, 1, 2, 3], [11, 4], [3, 3, 3, 3, 3]]
    samples = [{"prompt": "", "answer": "", "task": "toy", "meta": {}}] * len(prompts)
    with torch.inference_mode():
        rollout = grpo.generate_rollout(engine, tok, samples, prompts, config, seed=4)
    g = torch.Generator().manual_seed(1)
    rollout.rewards = torch.rand(len(rollout), generator=g)
    rollout.advantages = group_advantages(rollout.rewards, config.num_generations, config.scale_rewards)
    # completions of different lengths, so that the two ranks hold different numbers of tokens (dapo)
    keep = torch.arange(rollout.completion_mask.shape[1]) < torch.randint(2, 11, (len(rollout), 1), generator=g)
    rollout.completion_mask = rollout.completion_mask * keep
    rollout.old_logprobs = rollout.old_logprobs * rollout.completion_mask
    rollout.ref_logprobs = (rollout.old_logprobs + 0.1 * torch.randn(rollout.old_logprobs.shape, generator=g)) \
        * rollout.completion_mask
    torch.save(rollout, tmp_path / "rollout.pt")

    _grpo_step(model, model, rollout, loss_type, 1)
    mp.spawn(_grpo_update_rank, args=(2, str(tmp_path / "init"), mode, loss_type, str(tmp_path)), nprocs=2)
    two = torch.load(tmp_path / "two_ranks.pt")
    start = _grpo_model().state_dict()
    moved = max((v - start[k]).abs().max().item() for k, v in model.named_parameters())
    assert moved > 1e-3
    # the weights; not the balancing bias, which follows the expert load of the tokens each pass ran
    # (one process runs each group's prompt once and trims its length buckets: fewer tokens)
    for k, v in model.named_parameters():
        assert (two[k] - v).abs().max().item() < 1e-5, k



def _whole_state_rank(rank: int, world: int, init_file: str, folder: str) -> None:
    import torch.distributed as dist

    from r1kit.rollout_vllm import _whole_state
    from r1kit.train.grpo import _shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = _shard(_grpo_model())
    state = _whole_state(model)
    torch.save({k: v for k, v in state.items()}, Path(folder) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_the_vllm_backend_reads_whole_weights_from_fsdp_shards(tmp_path):
    """vLLM (optional, GPU) keeps its own whole copy of the policy on every rank: under FSDP2 the
    weights it loads and syncs are gathered from the shards, on every rank, not one rank's shard."""
    import torch.multiprocessing as mp

    mp.spawn(_whole_state_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    reference = _grpo_model().state_dict()
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        assert state.keys() == reference.keys()
        assert all(type(v) is torch.Tensor and torch.equal(v, reference[k]) for k, v in state.items())
