"""A run's report: plots (matplotlib PNG), a before/after table and sample reasoning traces, as
`report.md` and a self-contained `report.html` (images embedded), written atomically.

Reads only what the pipeline stages wrote (`DONE` records, `summary.json`, `grpo_metrics.jsonl`,
`completions.jsonl`), so it can be rebuilt at any time: `python -m r1kit.report runs/quickstart`.
"""
from __future__ import annotations

import base64
import errno
import html
import io
import json
from pathlib import Path

from r1kit.checkpoint import atomic_write_bytes, atomic_write_text

COLORS = {"base": "#9aa5b1", "rl": "#2f6fde", "student": "#16a34a"}


# ------------------------------------------------------------------------------ reading a run


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def collect(run_dir: Path, recipe: dict) -> dict:
    """Everything the report shows, from the run folder."""
    stages = {s["name"]: s for s in recipe["stages"]}
    done = {name: _read_json(run_dir / name / "DONE") for name in stages}
    evals = {}
    for name, s in stages.items():
        if s["kind"] == "eval" and (run_dir / name / "summary.json").is_file():
            evals[s["model"]] = {**_read_json(run_dir / name / "summary.json"), "stage": name}
    grpo = next((n for n, s in stages.items() if s["kind"] == "grpo"), None)
    return {
        "stages": stages,
        "done": done,
        "evals": evals,
        "grpo": _read_jsonl(run_dir / grpo / "grpo_metrics.jsonl") if grpo else [],
        "grpo_stage": grpo,
        "traces": {model: _read_jsonl(run_dir / e["stage"] / "completions.jsonl") for model, e in evals.items()},
    }


# ------------------------------------------------------------------------------ plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_grpo(history: list[dict]) -> dict[str, bytes]:
    """The R1-Zero figures: reward and accuracy per step; mean response length per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        return {}
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, [h.get("reward", float("nan")) for h in history], label="reward (accuracy + format) / 2",
            color="#7c3aed")
    ax.plot(steps, [h.get("accuracy", float("nan")) for h in history], label="accuracy of rollouts (T=1.0)",
            color="#2f6fde")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("R1-Zero: reward and accuracy per step")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    reward_png = _png(fig)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, [h.get("completions/mean_length", float("nan")) for h in history], color="#ea580c")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("tokens")
    ax.set_title("Mean response length per step")
    ax.grid(alpha=0.3)
    return {"grpo_reward.png": reward_png, "grpo_length.png": _png(fig)}


def plot_before_after(rows: list[dict]) -> bytes:
    """pass@1 with its 95% interval, and cons@k, per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = range(len(rows))
    width = 0.38
    p1 = [r["pass1"] for r in rows]
    err = [[r["pass1"] - r["pass1_ci"][0] for r in rows], [r["pass1_ci"][1] - r["pass1"] for r in rows]]
    bars = ax.bar([x - width / 2 for x in xs], p1, width, yerr=err, capsize=4, label="pass@1 (95% CI)",
                  color=[COLORS.get(r["role"], "#64748b") for r in rows])
    ax.bar([x + width / 2 for x in xs], [r["cons_at_k"] for r in rows], width, label="cons@k", color="#cbd5e1",
           edgecolor="#475569")
    for bar, value in zip(bars, p1):
        ax.text(bar.get_x() + bar.get_width() / 2, 2, f"{value:.0f}", ha="center", color="white", fontweight="bold")
    ax.set_xticks(list(xs), [r["label"] for r in rows])
    ax.set_ylim(0, 105)
    ax.set_ylabel("% of held-out problems")
    ax.set_title("Before and after: held-out pass@1 and cons@k")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_loss(curves: dict[str, list]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[1] for c in curve], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_yscale("log")
    ax.set_title("Supervised training loss (pretraining, distillation)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


# ------------------------------------------------------------------------------ the report


# How the miniature maps onto DeepSeek-R1 (shown in the report; the README has the same table)
MAPPING = [
    ("base model", "tiny DeepSeek-V3 layout: MLA (q/kv low-rank latents, decoupled RoPE), DeepSeekMoE "
     "(8 routed + 1 shared expert, sigmoid group-limited routing, aux-loss-free bias), 1 MTP module; ~2M parameters",
     "DeepSeek-V3-Base, 671B (37B active)"),
    ("pretraining", "a few hundred steps on worked 3-digit additions; half by a solver that never carries, so "
     "the base samples right answers only some of the time", "14.8T tokens of web, code and math"),
    ("R1-Zero", "GRPO from the base, rule rewards accuracy + format, rollouts at T=1, groups of 8, "
     "lr 2e-4, tens of steps", "GRPO from V3-Base, same rewards, T=1, groups of 16, lr 3e-6, 10,400 steps"),
    ("evaluation", "k=4 samples per held-out problem at T=0.6, top-p 0.95: pass@1 (95% CI), cons@4",
     "k=16-64 samples at T=0.6, top-p 0.95: pass@1, cons@64"),
    ("distillation", "rejection-sample the RL model (verified, well-formed), SFT a smaller dense Qwen2-layout "
     "student from scratch", "800k verified samples, SFT of Qwen2.5 / Llama students"),
]

ROLE_LABELS = {"base": "base (V3-style, pretrained)", "rl": "R1-Zero (GRPO)", "student": "distilled student"}


def model_rows(data: dict) -> list[dict]:
    rows = []
    for model, e in data["evals"].items():
        kind = data["stages"].get(model, {}).get("kind")
        role = {"pretrain": "base", "grpo": "rl", "distill": "student", "sft": "student"}.get(kind, model)
        params = data["done"].get(model, {}).get("parameters")
        rows.append({**e, "model": model, "role": role, "label": f"{model}\n{params / 1e6:.2f}M" if params else model,
                     "parameters": params})
    return rows


def traces(data: dict, per_model: int = 2) -> list[dict]:
    """A few held-out completions per model: a correct one first, then a wrong one if any."""
    out = []
    for model, records in data["traces"].items():
        right = [r for r in records if r.get("correct")]
        wrong = [r for r in records if not r.get("correct")]
        picks = (right[:1] + wrong[:1] + right[1:])[:per_model]
        out += [{"model": model, **r} for r in picks]
    return out


def render(run_dir: Path, recipe: dict, summary: dict, title: str = "r1kit quickstart") -> dict[str, Path]:
    """Write report.md, report.html and the PNGs into run_dir; return their paths.

    A full disk (or any write error) is reported with what is safe: the stages already written.
    """
    data = collect(run_dir, recipe)
    rows = model_rows(data)
    images: dict[str, bytes] = dict(plot_grpo(data["grpo"]))
    if rows:
        images["before_after.png"] = plot_before_after(rows)
    curves = {n: d.get("loss_curve") for n, d in data["done"].items() if d.get("loss_curve")}
    loss_png = plot_loss(curves)
    if loss_png:
        images["loss.png"] = loss_png
    md = markdown(data, rows, summary, images, title)
    page = html_page(data, rows, summary, images, title)
    written = {}
    try:
        for name, png in images.items():
            written[name] = atomic_write_bytes(run_dir / name, png)
        written["report.md"] = atomic_write_text(run_dir / "report.md", md)
        written["report.html"] = atomic_write_text(run_dir / "report.html", page)
    except OSError as err:
        why = "the disk is full" if err.errno == errno.ENOSPC else str(err)
        raise OSError(err.errno, f"could not write the report in {run_dir}: {why}. The finished stages are intact "
                                 f"in {run_dir}; free some space and run the same command again (finished stages are "
                                 "skipped, only the report is rebuilt)") from None
    return written


def _cells(r: dict) -> dict[str, str]:
    """One results row as the texts both tables show (markdown and HTML add their own markup)."""
    k = str(r["k"])
    return {
        "model": str(r["model"]), "role": ROLE_LABELS.get(r["role"], r["role"]),
        "params": f"{r['parameters'] / 1e6:.2f}M" if r.get("parameters") else "-",
        "pass1": f"{r['pass1']:.1f}", "ci": f"({r['pass1_ci'][0]:.1f}-{r['pass1_ci'][1]:.1f})",
        "cons": f"{r['cons_at_k']:.1f} (k={k})", "passk": f"{r['pass_at_k'].get(k, float('nan')):.1f}",
        "tokens": f"{r.get('mean_tokens', float('nan')):.0f}",
    }


def _table_md(rows: list[dict]) -> str:
    lines = ["| model | parameters | pass@1 (95% CI) | cons@k | pass@k | mean tokens |", "|---|---|---|---|---|---|"]
    for c in map(_cells, rows):
        lines.append(f"| {c['model']} ({c['role']}) | {c['params']} | **{c['pass1']}** {c['ci']} | "
                     f"{c['cons']} | {c['passk']} | {c['tokens']} |")
    return "\n".join(lines)


def _timing_md(data: dict) -> str:
    lines = ["| stage | kind | seconds |", "|---|---|---|"]
    for name, d in data["done"].items():
        if d:
            lines.append(f"| {name} | {d.get('kind', '')} | {d.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def _setup_line(rows: list[dict]) -> str:
    if not rows:
        return ""
    r = rows[0]
    return (f"Held-out evaluation: {r['num_problems']} problems never seen in training, k={r['k']} samples each at "
            f"temperature {r.get('temperature', 0.6)}, top-p {r.get('top_p', 0.95)} (the R1 report's protocol). "
            "pass@1 is the mean correctness over all samples; its 95% interval is a normal interval over the "
            "per-problem means; cons@k is the majority vote over the extracted answers.")


def markdown(data: dict, rows: list[dict], summary: dict, images: dict, title: str) -> str:
    parts = [f"# {title}", "", headline(summary), "", _setup_line(rows), "", _table_md(rows), ""]
    for name, caption in (("grpo_reward.png", "R1-Zero reward and accuracy per GRPO step"),
                          ("grpo_length.png", "Mean response length per GRPO step"),
                          ("before_after.png", "Before and after"), ("loss.png", "Supervised losses")):
        if name in images:
            parts += [f"![{caption}]({name})", ""]
    parts += ["## Sample reasoning traces (held-out problems)", ""]
    for t in traces(data):
        verdict = "correct" if t.get("correct") else "wrong"
        parts += [f"**{t['model']}** - {t['prompt']} (reference {t.get('reference')}) - {verdict}", "",
                  "```", "<think>", t["completion"], "```", ""]
    parts += ["## The miniature and the real recipe", "", "| | here | DeepSeek-R1 |", "|---|---|---|"]
    parts += [f"| {a} | {b} | {c} |" for a, b, c in MAPPING] + [""]
    parts += ["## Time per stage", "", _timing_md(data), ""]
    return "\n".join(parts)


def headline(summary: dict) -> str:
    if "rl_pass1" not in summary:
        return ""
    return (f"The tiny base solved **{summary['base_pass1']:.1f}%** of held-out problems (pass@1); R1-Zero GRPO "
            f"lifted it to **{summary['rl_pass1']:.1f}%**; the distilled dense student reached "
            f"**{summary.get('student_pass1', float('nan')):.1f}%**. Total time {summary.get('minutes', 0):.1f} min "
            "on this machine.")


CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;max-width:980px;margin:2rem auto;
padding:0 1rem;color:#0f172a;line-height:1.45}
h1{margin-bottom:.2rem} .lead{font-size:1.1rem;background:#f1f5f9;border-left:4px solid #2f6fde;padding:.7rem 1rem}
table{border-collapse:collapse;margin:1rem 0;width:100%} th,td{border:1px solid #e2e8f0;padding:.35rem .6rem;
text-align:right} th:first-child,td:first-child{text-align:left} th{background:#f8fafc}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem} .grid img{width:100%;border:1px solid #e2e8f0}
figure{margin:0} figcaption{font-size:.85rem;color:#475569}
pre{background:#0f172a;color:#e2e8f0;padding:.7rem;border-radius:6px;white-space:pre-wrap;font-size:.85rem}
.ok{color:#16a34a;font-weight:bold} .bad{color:#dc2626;font-weight:bold} .muted{color:#64748b;font-size:.9rem}
"""


def html_page(data: dict, rows: list[dict], summary: dict, images: dict, title: str) -> str:
    esc = html.escape

    def img(name: str, caption: str) -> str:
        if name not in images:
            return ""
        b64 = base64.b64encode(images[name]).decode()
        return f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{b64}"><figcaption>{esc(caption)}</figcaption></figure>'

    table = ["<table><tr><th>model</th><th>parameters</th><th>pass@1 (95% CI)</th><th>cons@k</th><th>pass@k</th>"
             "<th>mean tokens</th></tr>"]
    for c in map(_cells, rows):
        table.append(f"<tr><td>{esc(c['model'])} <span class=muted>({esc(c['role'])})</span></td>"
                     f"<td>{c['params']}</td><td><b>{c['pass1']}</b> {c['ci']}</td>"
                     f"<td>{c['cons']}</td><td>{c['passk']}</td><td>{c['tokens']}</td></tr>")
    table.append("</table>")
    trace_html = []
    for t in traces(data):
        cls, verdict = ("ok", "correct") if t.get("correct") else ("bad", "wrong")
        trace_html.append(f"<p><b>{esc(t['model'])}</b>: {esc(t['prompt'])} <span class=muted>(reference "
                          f"{esc(str(t.get('reference')))})</span> <span class={cls}>{verdict}</span></p>"
                          f"<pre>&lt;think&gt;\n{esc(t['completion'])}</pre>")
    timing = ["<table><tr><th>stage</th><th>kind</th><th>seconds</th></tr>"]
    for name, d in data["done"].items():
        if d:
            timing.append(f"<tr><td>{esc(name)}</td><td>{esc(d.get('kind', ''))}</td><td>{d.get('seconds', 0):.0f}</td></tr>")
    timing.append("</table>")
    body = [
        f"<h1>{esc(title)}</h1>",
        f"<p class=lead>{headline_html(summary)}</p>",
        f"<p class=muted>{esc(_setup_line(rows))}</p>",
        "".join(table),
        '<div class="grid">',
        img("grpo_reward.png", "R1-Zero: reward and accuracy per GRPO step (rollouts at temperature 1.0)"),
        img("grpo_length.png", "Mean response length per GRPO step (the R1-Zero figure)"),
        img("before_after.png", "Held-out pass@1 with 95% interval, and cons@k"),
        img("loss.png", "Supervised losses: pretraining and distillation"),
        "</div>",
        "<h2>Sample reasoning traces (held-out problems)</h2>",
        "".join(trace_html),
        "<h2>The miniature and the real recipe</h2>",
        "<table><tr><th></th><th style='text-align:left'>here</th><th style='text-align:left'>DeepSeek-R1</th></tr>"
        + "".join(f"<tr><td>{esc(a)}</td><td style='text-align:left'>{esc(b)}</td><td style='text-align:left'>{esc(c)}</td></tr>"
                  for a, b, c in MAPPING) + "</table>",
        "<h2>Time per stage</h2>",
        "".join(timing),
        "<h2>Next</h2>",
        f"<pre>{esc(next_commands(summary))}</pre>",
    ]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style>"
            f"</head><body>{''.join(body)}</body></html>")


def headline_html(summary: dict) -> str:
    text = html.escape(headline(summary))
    import re

    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)


def next_commands(summary: dict) -> str:
    run_dir = summary.get("run_dir", "runs/quickstart")
    return (f"r1kit chat {run_dir}/rl\n"
            f"r1kit serve {run_dir}/rl\n"
            f"r1kit eval {run_dir}/rl --benchmark arithmetic --k 4")


def main() -> int:
    import sys

    from r1kit.pipeline import load_recipe

    run_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart")
    recipe = load_recipe(sys.argv[2] if len(sys.argv) > 2 else run_dir.name)
    summary = _read_json(run_dir / "summary.json")
    for name, path in render(run_dir, recipe, summary).items():
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
