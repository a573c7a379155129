"""`r1kit quickstart --smoke`: the whole chain end to end at the smallest size, and its report."""
from __future__ import annotations

import argparse
import errno
import json

import pytest

from r1kit import quickstart, report


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "quickstart"
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    args = parser.parse_args(["--smoke", "--out", str(out), "--no-progress"])
    assert quickstart.main(args) == 0
    return out


def test_smoke_quickstart_writes_checkpoints_summary_and_report(smoke_run, capsys):
    out = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("base_pass1", "rl_pass1", "student_pass1", "minutes"):
        assert isinstance(summary[key], (int, float)), key
    for role in ("base", "rl", "student"):
        lo, hi = summary[f"{role}_pass1_ci"]
        assert 0 <= lo <= summary[f"{role}_pass1"] <= hi <= 100
    assert set(summary["stage_seconds"]) == {"base", "eval_base", "rl", "eval_rl", "student", "eval_student"}
    # model stages are Hugging Face folders `r1kit chat` can open; the student is dense, the base V3-style
    import r1kit

    base, tok = r1kit.load(out / "base")
    student, _ = r1kit.load(out / "student")
    assert base.config.model_type == "deepseek_v3" and base.config.is_moe and base.config.kv_lora_rank > 0
    assert student.config.model_type == "qwen2" and student.num_parameters() < base.num_parameters()
    assert tok is not None and tok.chat_template
    # every evaluated completion is logged with its verdict
    rows = [json.loads(x) for x in (out / "eval_rl" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 and all("correct" in r and "completion" in r for r in rows)
    # the report: plots embedded in the HTML, referenced from the markdown
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    assert "pass@1" in page and "cons@k" in page and "&lt;think&gt;" in page
    md = (out / "report.md").read_text()
    assert "![R1-Zero reward and accuracy per GRPO step](grpo_reward.png)" in md
    assert (out / "grpo_length.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_finished_stages_and_prints_next_commands(smoke_run, capsys):
    before = json.loads((smoke_run / "base" / "DONE").read_text())
    parser = argparse.ArgumentParser()
    quickstart.add_arguments(parser)
    assert quickstart.main(parser.parse_args(["--smoke", "--out", str(smoke_run), "--no-progress"])) == 0
    assert json.loads((smoke_run / "base" / "DONE").read_text()) == before  # not retrained
    printed = capsys.readouterr().out
    assert "report.html" in printed and f"r1kit chat {smoke_run}/rl" in printed and "r1kit serve" in printed


def test_disk_full_while_writing_the_report_is_clear_and_keeps_stages(smoke_run, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "atomic_write_text", full)
    monkeypatch.setattr(report, "atomic_write_bytes", full)
    from r1kit.pipeline import load_recipe

    recipe = load_recipe("quickstart")
    with pytest.raises(OSError, match="disk is full.*finished stages are intact"):
        report.render(smoke_run, recipe, {"run_dir": str(smoke_run)})
    assert (smoke_run / "rl" / "DONE").is_file() and (smoke_run / "rl" / "model.safetensors").is_file()
    assert (smoke_run / "report.html").is_file()  # the earlier report is untouched too
