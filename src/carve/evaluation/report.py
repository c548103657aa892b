"""Presenting an evaluation: the paper's Table 1 layout as Markdown and rich, and a bar chart.

Rows are tasks plus the macro average; columns are k × model, one table for
token F1 and one for ROUGE-L, with the best model at each k in bold when
several are compared (as in the paper).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from carve.evaluation.schema import MACRO, EvalReport, Prediction

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import RenderableType

METRICS = {"f1": "Token F1", "rouge_l": "ROUGE-L"}


def columns(report: EvalReport) -> list[tuple[int, str]]:
    """(k, model label) per column, grouped by k as in the paper."""
    return [(k, model) for k in report.shots for model in report.models]


def table_rows(report: EvalReport, metric: str) -> list[tuple[str, list[float], set[int]]]:
    """(task, values per column, indexes of the best value at each k) for tasks then the macro average."""
    cols = columns(report)
    rows = []
    for task in [t.task for t in report.tasks] + [MACRO]:
        values = [getattr(report.score(task, model, k), metric) for k, model in cols]
        best: set[int] = set()
        if len(report.models) > 1:
            for k in report.shots:
                idx = [i for i, (kk, _) in enumerate(cols) if kk == k]
                top = max(values[i] for i in idx)
                best.update(i for i in idx if values[i] == top)
        rows.append((task, values, best))
    return rows


def markdown_table(report: EvalReport, metric: str) -> str:
    cols = columns(report)
    head = "| task | " + " | ".join(f"k={k} {model}" for k, model in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    lines = [head, rule]
    for task, values, best in table_rows(report, metric):
        cells = [f"**{v:.2f}**" if i in best else f"{v:.2f}" for i, v in enumerate(values)]
        name = f"**{task}**" if task == MACRO else task
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gain_rows(report: EvalReport) -> list[list[str]]:
    """model, against, k, F1 gain [interval], ROUGE-L gain [interval], tasks above / below, worst task: one row per pair x k."""
    by_key = {(g.model, g.baseline, g.k, g.metric): g for g in report.gains}
    rows = []
    for model, baseline, k in dict.fromkeys((g.model, g.baseline, g.k) for g in report.gains):
        f1, rouge = by_key.get((model, baseline, k, "f1")), by_key.get((model, baseline, k, "rouge_l"))
        cells = [f"{g.gain:+.2f} [{g.low:+.2f}, {g.high:+.2f}]" if g else "-" for g in (f1, rouge)]
        reference = f1 or rouge
        assert reference is not None
        rows.append(
            [model, baseline, str(k), *cells, f"{reference.tasks_better} / {reference.tasks_worse}", f"{reference.worst_task} ({reference.worst_task_gain:+.2f})"]
        )
    return rows


GAIN_HEADERS = ["model", "against", "k", "token F1 gain [95% interval]", "ROUGE-L gain [95% interval]", "tasks above / below (F1)", "worst task (F1 gain)"]


def constant_rows(report: EvalReport) -> list[str]:
    """A markdown table: each label task's majority label, its token F1 answered throughout, and every model's F1 (marked when not above it)."""
    header = ["task", "constant answer (share)", "its token F1", *[f"k={k} {m}" for k, m in columns(report)]]
    rows = [
        "A model that answers one label throughout scores that label's share; a gain on a label task means something only above this line. "
        "Scores not above it are marked ≤.",
        "",
        "| " + " | ".join(header) + " |",
        "|---|---|---:|" + "---:|" * len(columns(report)),
    ]
    for constant in report.constant_answers:
        cells = []
        for k, model in columns(report):
            f1 = report.score(constant.task, model, k).f1
            cells.append(f"{f1:.2f}" if f1 > constant.f1 else f"≤ {f1:.2f}")
        rows.append(f"| {constant.task} | {constant.answer} ({constant.share:.0f}%) | {constant.f1:.2f} | " + " | ".join(cells) + " |")
    return rows


def markdown_report(report: EvalReport) -> str:
    models = "\n".join(f"- `{label}`: " + (f"adapter `{adapter}`" if adapter else "the base model alone") for label, adapter in report.models.items())
    first = next(iter(report.models))  # prompts are the same for every model
    tasks = "\n".join(
        f"| {t.task} | {t.source} | {t.examples} of {t.available} | {t.max_new_tokens} | "
        + ", ".join(f"k={k}: {report.score(t.task, first, k).shots_used:.2f}" for k in report.shots)
        + f" | {sum(report.score(t.task, first, k).inputs_trimmed for k in report.shots)} |"
        for t in report.tasks
    )
    parts = [
        "# Evaluation",
        "",
        f"Base model: {report.base_model}. Demonstrations: {report.demos or 'none (k=0 only)'}. "
        f"Greedy decoding, context {report.max_context} tokens, {report.generations} answers in {report.wall_time_s:.0f} s.",
        "",
        "Models:",
        models,
        "",
        "Scores are means over examples, in percent: token F1 (SQuAD normalisation) and ROUGE-L F (stemmed), "
        "each the best over a task's acceptable answers; the macro average weighs tasks equally.",
    ]
    for metric, title in METRICS.items():
        parts += ["", f"## {title}", "", markdown_table(report, metric)]
    if report.gains:
        parts += [
            "",
            "## Paired gains",
            "",
            "Macro-average difference to the base (and to each `--against` adapter) in points; the interval is a 95% paired bootstrap "
            "over the evaluated examples (each task resampled, the same examples for both models).",
            "",
            "| " + " | ".join(GAIN_HEADERS) + " |",
            "|---|---|---:|---:|---:|---:|---|",
            *("| " + " | ".join(row) + " |" for row in gain_rows(report)),
        ]
    if report.constant_answers:
        parts += ["", "## Label tasks against the constant answer", "", *constant_rows(report)]
    parts += [
        "",
        "## Tasks",
        "",
        "| task | file | examples | max new tokens | demos fitted (mean) | inputs trimmed |",
        "|---|---|---:|---:|---|---:|",
        tasks,
        "",
        "![scores per task](chart.png)",
        "",
    ]
    return "\n".join(parts)


def rich_tables(report: EvalReport) -> list["RenderableType"]:
    from rich.table import Table

    tables = []
    for metric, title in METRICS.items():
        table = Table(title=f"{title} (%)", title_justify="left")
        table.add_column("task")
        for k, model in columns(report):
            table.add_column(f"k={k}\n{model}", justify="right")
        for task, values, best in table_rows(report, metric):
            cells = [f"[bold]{v:.2f}[/bold]" if i in best else f"{v:.2f}" for i, v in enumerate(values)]
            table.add_row(f"[bold]{task}[/bold]" if task == MACRO else task, *cells, end_section=task == report.tasks[-1].task)
        tables.append(table)
    if report.gains:
        table = Table(*GAIN_HEADERS, title="paired gains (points, 95% paired bootstrap interval)", title_justify="left")
        for row in gain_rows(report):
            table.add_row(*row)
        tables.append(table)
    return tables


def write_chart(report: EvalReport, path: Path) -> None:
    """Grouped bars per task (and the macro average): one bar per model × k, F1 above, ROUGE-L below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t.task for t in report.tasks] + [MACRO]
    cols = [(model, k) for k in report.shots for model in report.models]  # models side by side at each k
    palette = plt.get_cmap("tab10")
    width = 0.8 / len(cols)
    fig, axes = plt.subplots(2, 1, figsize=(min(18.0, max(9.0, 0.35 * len(tasks) * len(cols))), 8.5), sharex=True)
    for ax, (metric, title) in zip(axes, METRICS.items()):
        for j, (model, k) in enumerate(cols):
            m = list(report.models).index(model)
            shade = 0.45 + 0.55 * (report.shots.index(k) + 1) / len(report.shots)  # darker = more shots
            values = [getattr(report.score(task, model, k), metric) for task in tasks]
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(tasks))]
            ax.bar(xs, values, width, color=palette(m % 10), alpha=shade, label=f"{model}, k={k}", edgecolor="white", linewidth=0.5)
        ax.set_ylabel(f"{title} (%)")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.axvline(len(tasks) - 1.5, color="grey", linewidth=0.8, linestyle=":")
    # Above the bars, so it never hides a high score; one legend column per k, its models stacked.
    axes[0].legend(ncol=len(report.shots), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    fig.suptitle(f"{report.base_model}: scores per task", fontsize=11)
    axes[1].set_xticks(range(len(tasks)))
    axes[1].set_xticklabels(tasks, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_outputs(report: EvalReport, predictions: Sequence[Prediction], out_dir: Path) -> None:
    """results.json, predictions.jsonl, report.md and chart.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "predictions.jsonl", "".join(json.dumps(p.model_dump(), ensure_ascii=False) + "\n" for p in predictions))
    _write_text(out_dir / "report.md", markdown_report(report))
    write_chart(report, out_dir / "chart.png")
    _write_text(out_dir / "results.json", report.model_dump_json(indent=2) + "\n")


def summary_lines(report: EvalReport) -> list[str]:
    """One line per model × k with the macro scores, for logs."""
    return [f"{s.model} k={s.k}: F1 {s.f1:.2f}, ROUGE-L {s.rouge_l:.2f} ({s.n} answers)" for s in report.macro]
