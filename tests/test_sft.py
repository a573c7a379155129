"""The supervised trainer: SFT lowers held-out loss on a synthetic task; loss masks, packing, the LR
schedule, activation checkpointing; recipes and datasets with bad input fail naming what is wrong."""
from __future__ import annotations

import json
import random

import pytest
from pathlib import Path
import torch

from r1kit import data as D
from r1kit.cli import main as cli_main
from r1kit.tasks import make_task
from r1kit.tokenizer import train_tokenizer
from r1kit.train.config import load_recipe
from r1kit.train.sft import SFTConfig, lr_lambda, train_sft

SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
         "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}


def arithmetic_sft_rows(n: int, seed: int) -> list[dict]:
    task = make_task("arithmetic", difficulty=2)
    rows = []
    for s in task.generate(n, seed=seed):
        steps, answer = task.worked_solution(s)
        rows.append({"prompt": s["prompt"], "completion": f"<think>{steps}</think> <answer>{answer}</answer>"})
    return rows


def test_sft_lowers_held_out_loss_on_a_synthetic_task(tmp_path):
    train, held_out = arithmetic_sft_rows(400, seed=0), arithmetic_sft_rows(40, seed=1)
    config = SFTConfig(model="tiny-dense", template="none", max_length=96, per_device_train_batch_size=8,
                       learning_rate=3e-3, warmup_steps=3, max_steps=24, eval_steps=12, output_dir=str(tmp_path),
                       torch_threads=2, progress=False, save_final=False)
    result = train_sft(config, train_samples=train, eval_samples=held_out)
    (s0, first), (_, mid), (s_end, last) = result.eval_losses
    print(f"held-out loss: step {s0} {first:.3f} -> step {s_end} {last:.3f}")
    assert s0 == 0 and s_end == 24
    assert last < mid < first and last < 0.5 * first
    logged = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in logged if "loss" in r]
    assert len(train_rows) == 24 and all(r["tokens_per_second"] > 0 for r in train_rows)
    assert result.checkpoint.name == "checkpoint-24"


def test_completion_only_loss_mask_and_generation_prompt():
    tok = train_tokenizer(["1+2=3"], kind="char")
    ex = D.encode_row({"prompt": "1+2=", "completion": "<think>\nadd</think>3"}, tok, template="chat")
    prompt_text = tok.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True)
    n_prompt = len(tok.encode(prompt_text))
    assert ex.loss_mask == [0] * n_prompt + [1] * (len(ex.input_ids) - n_prompt)
    # the generation prompt opened <think>; the completion is not made to open it twice
    assert tok.decode(ex.input_ids[n_prompt:]) == "add</think>3" + tok.eos_token
    assert ex.input_ids[-1] == tok.eos_token_id
    msgs = D.encode_row({"messages": [{"role": "user", "content": "1+2="},
                                      {"role": "assistant", "content": "<think>\nadd</think>3"}]}, tok, template="chat")
    assert msgs == ex
    text = D.encode_row({"text": "1+2=3"}, tok)
    assert all(text.loss_mask) and text.input_ids[0] == tok.bos_token_id


def test_packing_and_deterministic_batches():
    exs = [D.Example(list(range(n)), [0] + [1] * (n - 1)) for n in (5, 7, 3, 9, 2)]
    packed = D.pack_greedy(exs, max_length=12)
    assert [len(p.input_ids) for p in packed] == [12, 12, 2]
    assert sum(sum(p.loss_mask) for p in packed) == sum(sum(e.loss_mask) for e in exs)
    stream = D.pack_stream(exs, max_length=8)
    assert [len(s.input_ids) for s in stream] == [8, 8, 8, 2]
    a = [D.batch_indices(10, 4, step, seed=1) for step in range(4)]
    assert a == [D.batch_indices(10, 4, step, seed=1) for step in range(4)]
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1]))  # an epoch never repeats a row
    assert a[2] != a[0]  # epoch 2 is reshuffled
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        D.batch_indices(3, 4, 0, seed=1)


def test_warmup_then_cosine_to_min_lr():
    f = lr_lambda(SFTConfig(warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)


def test_gradient_checkpointing_gives_the_same_step(tmp_path):
    rows = arithmetic_sft_rows(32, seed=2)
    losses = {}
    for ckpt in (False, True):
        cfg = SFTConfig(model="tiny", model_overrides=SMALL, template="none", max_length=64,
                        per_device_train_batch_size=8, max_steps=2, gradient_checkpointing=ckpt, progress=False,
                        output_dir=str(tmp_path / str(ckpt)), save_final=False, torch_threads=2)
        losses[ckpt] = [r["loss"] for r in train_sft(cfg, train_samples=rows).metrics if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], abs=1e-6)


def test_compiled_training_gives_the_same_steps(tmp_path):
    """compile= runs the forward through torch.compile (aot_eager here: the same graph capture as
    inductor, without a C++ build); the losses follow the eager run's."""
    rows = arithmetic_sft_rows(32, seed=2)
    losses = {}
    for compile in (False, "aot_eager"):
        cfg = SFTConfig(model="tiny", model_overrides=SMALL, template="none", max_length=64,
                        per_device_train_batch_size=8, max_steps=3, compile=compile, progress=False,
                        output_dir=str(tmp_path / str(compile)), save_final=False, torch_threads=2)
        losses[compile] = [r["loss"] for r in train_sft(cfg, train_samples=rows).metrics if "loss" in r]
    assert losses["aot_eager"] == pytest.approx(losses[False], abs=1e-4)


def test_pretrain_from_the_cli_on_text(tmp_path):
    data = tmp_path / "corpus.jsonl"
    rng = random.Random(0)
    data.write_text("".join(json.dumps({"text": f"{a} plus {b} is {a + b}."}) + "\n"
                            for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(200))))
    recipe = tmp_path / "pre.toml"
    recipe.write_text(f'model = "tiny"\ntrain_files = ["{data}"]\nmax_length = 48\n'
                      f'per_device_train_batch_size = 8\nmax_steps = 3\nprogress = false\neval_fraction = 0.05\n'
                      '[model_overrides]\n' + "".join(f"{k} = {v}\n" for k, v in SMALL.items()))
    out = tmp_path / "out"
    assert cli_main(["train", "pretrain", "--config", str(recipe), f"output_dir={out}", "learning_rate=1e-3"]) == 0
    state = json.loads((out / "checkpoint-3" / "trainer_state" / "state.json").read_text())
    assert state["recipe"]["learning_rate"] == 1e-3 and state["recipe"]["mode"] == "pretrain"
    assert (out / "final" / "config.json").is_file() and (out / "final" / "tokenizer.json").is_file()
    # the sft command refuses a recipe written for pretraining
    recipe.write_text(recipe.read_text().replace('model = "tiny"', 'model = "tiny"\nmode = "pretrain"'))
    assert cli_main(["train", "sft", "--config", str(recipe), f"output_dir={tmp_path / 'x'}"]) == 2


def test_recipe_errors_name_the_key_and_the_file(tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text('model = "tiny"\nlearning_rat = 1e-4\n')
    with pytest.raises(ValueError, match=r"bad\.toml: unknown key 'learning_rat'.*learning_rate"):
        load_recipe(SFTConfig, recipe)
    recipe.write_text('model = "tiny"\nmax_steps = "ten"\n')
    with pytest.raises(ValueError, match=r"bad\.toml: key 'max_steps' must be int, got 'ten'"):
        load_recipe(SFTConfig, recipe)
    recipe.write_text('model = "tiny"\n')
    with pytest.raises(ValueError, match="command-line override: key 'packing'"):
        load_recipe(SFTConfig, recipe, ["packing=3"])
    cfg = load_recipe(SFTConfig, recipe, ["learning_rate=1e-4", "train_files=a.jsonl", "output_dir=runs/x"])
    assert cfg.learning_rate == 1e-4 and cfg.train_files == ["a.jsonl"] and cfg.output_dir == "runs/x"


def test_malformed_rows_name_file_and_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "1+1=", "completion": "2"})
    data.write_text("\n".join([good] * 20 + ['{"prompt": "2+2="', good, json.dumps({"prompt": "3", "answer": 3})]) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:21: not valid JSON.*--skip-bad-rows"):
        D.read_jsonl(data)
    stats = D.DataStats()
    rows = D.read_jsonl(data, skip_bad_rows=True, stats=stats)
    assert len(rows) == 21 and stats.bad_rows == 2 and "d.jsonl:23" in stats.bad_examples[1]
    assert "no 'completion'" in stats.bad_examples[1]
    out = tmp_path / "o"
    args = ["train", "sft", f"train_files={data}", f"output_dir={out}", "max_steps=1", "progress=false",
            "per_device_train_batch_size=4", "model=tiny-dense", "save_final=false"]
    assert cli_main(args) == 2
    assert "d.jsonl:21" in capsys.readouterr().err and not out.exists()
    assert cli_main(args + ["--skip-bad-rows"]) == 0
    assert json.loads((out / "data_stats.json").read_text())["bad_rows"] == 2


def test_distill_rejection_sampling_keeps_verified_unique_completions():
    from r1kit.train.distill import select

    samples = make_task("arithmetic", difficulty=2).generate(2, seed=0)
    right = [f"<think>add</think> <answer>{s['answer']}</answer>" for s in samples]
    texts = [[right[0], right[0] + "  ", "<think>x</think> <answer>0</answer>", f"{samples[0]['answer']}"],
             ["<think>y</think> <answer>-1</answer>", right[1], "no tags at all", right[1].replace("add", "sum")]]
    rows, stats = select(samples, texts, lengths=[[10, 11, 9, 3], [9, 12, 5, 40]])
    # kept: one of the two identical right answers, the unformatted right answer is not well-formed
    assert [r["completion"] for r in rows] == [right[0], right[1], right[1].replace("add", "sum")]
    task = stats["per_task"]["arithmetic"]
    assert task["generated"] == 8 and task["kept"] == 3 and task["kept_rate"] == 3 / 8
    assert stats["duplicates_dropped"] == 1 and stats["length_histogram"] == {"<=16": 2, "<=64": 1}


def test_distill_end_to_end_writes_dataset_and_stats(tmp_path):
    from r1kit.model import ModelConfig, Transformer
    from r1kit.train.distill import DistillConfig, distill

    tok = train_tokenizer(["0123456789+= <think></think><answer></answer>"], kind="char")
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size))
    cfg = DistillConfig(task="arithmetic", task_kwargs={"difficulty": 1}, num_prompts=4, num_generations=2,
                        max_tokens=8, output_dir=str(tmp_path))
    result = distill(cfg, teacher=teacher, tokenizer=tok)
    stats = json.loads((tmp_path / "dataset_stats.json").read_text())
    assert stats["per_task"]["arithmetic"]["generated"] == 8
    assert result.dataset.is_file() and len(result.dataset.read_text().splitlines()) == stats["kept"]


def test_distill_prompts_from_benchmarks_and_tasks():
    """R1's distillation prompts were real problems: a benchmark split works like a task generator,
    and held-out prompts never overlap the training ones."""
    from r1kit.train.config import load_recipe
    from r1kit.train.distill import DistillConfig, prompt_sets

    train, held = prompt_sets(DistillConfig(task="gsm8k_train", eval_task="gsm8k", num_prompts=6, num_eval_prompts=4))
    assert len(train) == 6 and len(held) == 4 and train[0]["task"] == "math"
    train, held = prompt_sets(DistillConfig(task="gsm8k", num_prompts=6, num_eval_prompts=4))
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in held}
    train, held = prompt_sets(DistillConfig(task="arithmetic", num_prompts=6, num_eval_prompts=4))
    assert len(train) == 6 and train[0]["task"] == "arithmetic"
    with pytest.raises(ValueError, match="too few"):
        prompt_sets(DistillConfig(task="aime24", num_prompts=30, num_eval_prompts=5))
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "distill-qwen2.5-0.5b-gsm8k.toml"
    config = load_recipe(DistillConfig, str(recipe), [])
    assert (config.task, config.eval_task, config.sft["learning_rate"]) == ("gsm8k_train", "gsm8k", 1e-4)
