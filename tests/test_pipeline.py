"""Recipes: the chain is checked before anything runs; stages resume; failures keep finished stages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1kit import pipeline

REPO = Path(__file__).resolve().parent.parent


def _recipe(*stages, name="t"):
    return {"name": name, "source": "test.toml", "stages": [dict(s) for s in stages]}


BASE = {"name": "base", "kind": "pretrain", "model": "tiny"}


@pytest.mark.parametrize("recipe_name", ["quickstart", "r1-pipeline-tiny"])
def test_shipped_recipes_chain(recipe_name):
    recipe = pipeline.load_recipe(REPO / "recipes" / f"{recipe_name}.toml")
    kinds = [s["kind"] for s in recipe["stages"]]
    assert kinds and all(k in pipeline.KINDS for k in kinds)


def test_real_scale_recipe_names_the_missing_checkpoint_before_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no models/ folder here
    with pytest.raises(ValueError, match="models/DeepSeek-R1-Distill-Qwen-1.5B.*model folder"):
        pipeline.load_recipe(REPO / "recipes" / "r1-distill-qwen-1.5b-gsm8k.toml")


def test_full_r1_pipeline_recipe_has_every_stage():
    recipe = pipeline.load_recipe(REPO / "recipes" / "r1-pipeline-tiny.toml")
    kinds = {s["kind"] for s in recipe["stages"]}
    assert {"pretrain", "grpo", "rejection_sample", "sft", "eval"} <= kinds
    student = next(s for s in recipe["stages"] if s["name"] == "distill_student")
    assert student["model"] == "tiny-dense" and student["data"] == "rs_data"  # R1: distillation is SFT only
    rl = [s for s in recipe["stages"] if s["kind"] == "grpo"]
    assert any("language" in s["reward_weights"] for s in rl)  # stage 3: language consistency


@pytest.mark.parametrize("stages, message", [
    ([BASE, {"name": "rl", "kind": "grpo", "model": "nope"}], "no earlier stage"),
    ([{"name": "rl", "kind": "grpo", "model": "base"}, BASE], "runs later"),
    ([BASE, {"name": "rl", "kind": "grpo", "model": "rl"}], "names the stage itself"),
    ([BASE, {"name": "e", "kind": "eval", "model": "base"}, {"name": "s", "kind": "sft", "model": "base", "data": "e"}],
     "is a metrics"),
    ([BASE, {"name": "s", "kind": "sft", "model": "base", "data": "base"}], "is a model"),
    ([BASE, {"name": "x", "kind": "finetune", "model": "base"}], "unknown kind 'finetune'"),
    ([BASE, {"name": "rl", "kind": "grpo", "model": "base", "learning_rte": 1e-6}], "unknown key"),
    ([BASE, {"name": "rl", "kind": "grpo", "model": "base", "grpo": {"num_generation": 8}}], "num_generation"),
    ([BASE, BASE], "used twice"),
    ([BASE, {"name": "d", "kind": "distill", "teacher": "base", "student": "tiny"}], "students are dense"),
    ([BASE, {"name": "s", "kind": "sft", "model": "base", "data": "base", "family": "qwen2"}], "is a model"),
    ([BASE, {"name": "rl", "kind": "grpo", "model": "base", "family": "qwen2"}], "expects a qwen2 checkpoint"),
])
def test_bad_chains_are_caught_before_any_stage_runs(stages, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        pipeline.run(_recipe(*stages), tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing ran


def test_unknown_recipe_lists_what_exists():
    with pytest.raises(FileNotFoundError, match="quickstart"):
        pipeline.find_recipe("no-such-recipe")


def test_stages_resume_and_a_failure_keeps_finished_stages(tmp_path, monkeypatch):
    calls = []

    def fake_pretrain(stage, ctx, out):
        calls.append(stage["name"])
        (out / "config.json").write_text("{}")
        return {"parameters": 1}

    def failing_eval(stage, ctx, out):
        (out / "partial.txt").write_text("half")
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(pipeline.RUNNERS, "pretrain", fake_pretrain)
    monkeypatch.setitem(pipeline.RUNNERS, "eval", failing_eval)
    recipe = _recipe(BASE, {"name": "ev", "kind": "eval", "model": "base"})
    with pytest.raises(RuntimeError, match="disk on fire"):
        pipeline.run(recipe, tmp_path, progress=False)
    assert pipeline.is_done(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "DONE").read_text())["parameters"] == 1
    assert not (tmp_path / "ev").exists()  # the failed stage left nothing half-written
    # the rerun starts at the first unfinished stage
    monkeypatch.setitem(pipeline.RUNNERS, "eval", lambda stage, ctx, out: {"pass1": 50.0})
    results = pipeline.run(recipe, tmp_path, progress=False)
    assert calls == ["base"] and results["ev"]["pass1"] == 50.0


def test_wrong_family_checkpoint_is_refused_at_run_time(tmp_path):
    import r1kit
    from r1kit.model import ModelConfig, Transformer
    from r1kit.tokenizer import train_tokenizer

    tok = train_tokenizer([], kind="char")
    folder = tmp_path / "dense"
    r1kit.save(Transformer(ModelConfig.preset("tiny-dense", vocab_size=tok.vocab_size, num_hidden_layers=1)), tok, folder)
    recipe = _recipe({"name": "ev", "kind": "eval", "model": str(folder), "family": "deepseek_v3"})
    with pytest.raises(ValueError, match="expects a deepseek_v3 checkpoint"):
        pipeline.run(recipe, tmp_path / "run", progress=False)
