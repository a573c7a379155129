"""Exact resume: a run SIGKILLed at a random step and resumed ends bit for bit where an uninterrupted
run ends (CPU), at three kill points and with a kill in the middle of a checkpoint write; and the
bad inputs around checkpoints fail clearly without losing anything already written."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1kit.train.config import load_recipe
from r1kit.train.sft import SFTConfig, train_sft

REPO = Path(__file__).resolve().parent.parent
MAX_STEPS, SAVE_STEPS = 12, 4
KILL_AFTER = (6, 8, 11)  # between saves, right after a save, one step before the end
RECIPE = f"""
mode = "sft"
model = "tiny"
template = "none"
max_length = 32
per_device_train_batch_size = 4
gradient_accumulation_steps = 2
learning_rate = 1e-3
warmup_steps = 3
max_steps = {MAX_STEPS}
save_steps = {SAVE_STEPS}
save_total_limit = 2
eval_fraction = 0.1
torch_threads = 1
progress = false
seed = 3
train_files = ["{{data}}"]

[model_overrides]  # a smaller tiny DeepSeek-V3 (MLA + MoE + MTP) so that the test is quick
num_hidden_layers = 2
hidden_size = 64
intermediate_size = 128
moe_intermediate_size = 32
q_lora_rank = 32
kv_lora_rank = 32
qk_nope_head_dim = 16
qk_rope_head_dim = 8
v_head_dim = 16
"""


def write_data(path: Path, n: int = 160) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": f"{a + b}"}) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = write_data(root / "train.jsonl")
    recipe = root / "recipe.toml"
    recipe.write_text(RECIPE.replace("{data}", str(data)))
    return root, recipe


def cli(recipe: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "r1kit.cli", "train", "sft", "--config", str(recipe), f"output_dir={out}", *extra]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_bit_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


def test_sigkill_and_resume_is_bit_exact(setup):
    root, recipe = setup
    # the killed runs go in the background while the reference trains here
    kills = {k: cli(recipe, root / f"kill{k}", env={"R1KIT_TEST_KILL_AFTER_STEP": str(k)}) for k in KILL_AFTER}
    kills["save"] = cli(recipe, root / "killsave", env={"R1KIT_TEST_KILL_IN_SAVE": "8"})
    ref = train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(root / "ref")}))
    reference = weights(ref.final_path)
    ref_losses = [r["loss"] for r in ref.metrics if "loss" in r]
    assert len(ref_losses) == MAX_STEPS
    for name, proc in kills.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, f"kill {name} did not die by SIGKILL: {err[-2000:]}"

    for k in KILL_AFTER:
        out = root / f"kill{k}"
        saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
        assert saved and saved[-1] == k - k % SAVE_STEPS
        assert len(saved) <= 2  # save_total_limit
        result = train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(out), "resume_from_checkpoint": "latest"}))
        assert_bit_equal(weights(result.final_path), reference)
        # the metrics file holds each step once, with the uninterrupted run's losses exactly
        logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in logged if "loss" in r]
        assert losses == ref_losses

    # killed while writing checkpoint-8: only a hidden .partial folder remains, never loaded
    out = root / "killsave"
    partials = list(out.glob(".checkpoint-8*.partial"))
    assert partials and not (out / "checkpoint-8").exists()
    with pytest.raises(ValueError, match="partial checkpoint"):
        train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(out), "resume_from_checkpoint": str(partials[0])}))
    result = train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(out), "resume_from_checkpoint": "latest"}))
    assert_bit_equal(weights(result.final_path), reference)


def test_resume_bad_inputs_fail_clearly_and_lose_nothing(setup):
    root, recipe = setup
    out = root / "guard"
    train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(out), "max_steps": 4, "save_steps": 2}))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    # a fresh run into a folder with checkpoints would overwrite them
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(out), "max_steps": 4}))
    # resuming with another model
    other = {"output_dir": str(out), "resume_from_checkpoint": "latest",
             "model_overrides": {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128,
                                 "moe_intermediate_size": 32, "q_lora_rank": 32, "kv_lora_rank": 32,
                                 "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}}
    with pytest.raises(ValueError, match="different model.*num_hidden_layers"):
        train_sft(load_recipe(SFTConfig, recipe, other))
    # resuming from a model folder that is not a checkpoint
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(out), "resume_from_checkpoint": str(out / "final")}))
    # resuming with another global batch cannot be exact
    with pytest.raises(ValueError, match="global_batch_size"):
        train_sft(load_recipe(SFTConfig, recipe, {"output_dir": str(out), "resume_from_checkpoint": "latest",
                                                  "per_device_train_batch_size": 2}))
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing written was touched


def test_cli_resume_flag_and_partial_message(setup):
    root, recipe = setup
    out = root / "cli"
    proc = cli(recipe, out, "max_steps=4", "save_steps=2")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    fake = out / ".checkpoint-6.abc.partial"
    fake.mkdir()
    proc = cli(recipe, out, "max_steps=4", f"--resume={fake}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "partial checkpoint" in err and "checkpoint-4" in err
    assert (out / "checkpoint-4" / "trainer_state" / "state.json").is_file()
