"""PNG plots of a retention report: retention per task, and retention against what each variant saves.

A "vs" plot is drawn for each cost axis that some variant carries (KV compression, token sparsity, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

_AXES = {"kv_compression": "KV cache compression (×)", "token_sparsity": "token sparsity (fraction skipped)",
         "flops_skipped": "FLOPs skipped (fraction)", "attention_density": "attention density (fraction computed)",
         "training_minutes": "training minutes"}


def write_plots(report, out_dir: Path) -> list[Path]:
    """Writes ``retention_per_task.png`` and ``retention_vs_<fact>.png``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    retained = report.retentions()
    if not retained:
        return []
    written = [_per_task(plt, report, retained, out_dir / "retention_per_task.png")]
    for fact, label in _AXES.items():
        carriers = [m for m in report.variants if report.facts.get(m, {}).get(fact) is not None]
        if carriers:
            written.append(_versus(plt, report, retained, carriers, fact, label, out_dir / f"retention_vs_{fact}.png"))
    return written


def _per_task(plt, report, retained: dict, path: Path) -> Path:
    tasks = report.tasks
    width = 0.8 / len(retained)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) * max(1, len(retained) / 2)), 4.5))
    for index, (model, ratios) in enumerate(retained.items()):
        xs = [i + index * width for i in range(len(tasks))]
        axis.bar(xs, [_clip(ratios.get(t, math.nan)) for t in tasks], width, label=model)
    for metric in {report.scores[report.reference][t].metric for t in tasks}:
        axis.axhline(report.threshold(metric), color="k", ls="--", lw=0.8)
    axis.axhline(1.0, color="grey", lw=0.6)
    axis.set_xticks([i + width * (len(retained) - 1) / 2 for i in range(len(tasks))], tasks, rotation=35,
                    ha="right", fontsize=7)
    axis.set(ylabel=f"retention vs {report.reference}", ylim=(0, 1.25),
             title="Retention per task (dashed: pass threshold; bars clipped at 1.25)")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _versus(plt, report, retained: dict, carriers: list[str], fact: str, label: str, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    untouched = {"kv_compression": 1.0, "attention_density": 1.0}.get(fact, 0.0)
    reference_x = report.facts.get(report.reference, {}).get(fact, untouched)
    axis.scatter([reference_x], [1.0], marker="*", s=120, color="k", label=f"{report.reference} (reference)")
    for model in carriers:
        x = report.facts[model][fact]
        ratios = [r for r in retained[model].values() if not math.isnan(r)]
        if not ratios:
            continue
        mean = sum(ratios) / len(ratios)
        axis.errorbar([x], [mean], yerr=[[mean - min(ratios)], [max(ratios) - mean]], fmt="o", capsize=3,
                      label=model)
    axis.axhline(report.threshold("default"), color="k", ls="--", lw=0.8)
    axis.set(xlabel=label, ylabel="mean retention (bars: min–max over tasks)", title=f"Retention vs {label}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _clip(value: float) -> float:
    return 0.0 if math.isnan(value) else min(value, 1.25)


def training_curve_png(curve: list[float], title: str, ylabel: str = "loss") -> bytes:
    """A loss curve per step with its running mean of 10, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    steps = range(1, len(curve) + 1)
    axis.plot(steps, curve, lw=0.8, alpha=0.5, label="per step")
    smooth = [sum(curve[max(0, i - 9):i + 1]) / len(curve[max(0, i - 9):i + 1]) for i in range(len(curve))]
    axis.plot(steps, smooth, lw=1.5, label="mean of 10")
    axis.set(xlabel="step", ylabel=ylabel, yscale="log", title=title)
    axis.legend()
    axis.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()
