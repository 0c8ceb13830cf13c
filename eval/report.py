"""The retention report: optimized score / reference score per task, baselines side by side.

Written as markdown (for people), JSON (for machines) and PNG plots (retention per task; retention vs KV
compression). Retention of a lower-is-better metric (perplexity) is reference / optimized.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Score:
    value: float
    stderr: float | None = None
    higher_is_better: bool = True


def retention(score: Score, reference: Score) -> float:
    if score.higher_is_better:
        return score.value / reference.value if reference.value else float("nan")
    return reference.value / score.value if score.value else float("nan")


@dataclass
class Report:
    reference: str
    scores: dict[str, dict[str, Score]]          # model → task → score
    kv_bytes_per_token: dict[str, int]           # model → bf16 KV bytes per token
    threshold: float = 0.95

    def retentions(self) -> dict[str, dict[str, float]]:
        ref = self.scores[self.reference]
        return {model: {task: retention(score, ref[task]) for task, score in tasks.items() if task in ref}
                for model, tasks in self.scores.items() if model != self.reference}

    def to_markdown(self) -> str:
        retained = self.retentions()
        tasks = list(self.scores[self.reference])
        models = list(retained)
        head = "| task | " + self.reference + " (reference) | " + " | ".join(
            f"{m} | retention" for m in models) + " |"
        lines = [f"## Accuracy retention vs {self.reference} (pass: retention ≥ {self.threshold:.2f})", "", head,
                 "|---|---:|" + "---:|---:|" * len(models)]
        for task in tasks:
            cells = [_format(self.scores[self.reference][task])]
            for model in models:
                score, ratio = self.scores[model].get(task), retained[model].get(task)
                mark = "✓" if ratio is not None and ratio >= self.threshold else "✗"
                cells += [_format(score) if score else "–", f"{ratio:.3f} {mark}" if ratio is not None else "–"]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
        lines += ["", "| model | KV bytes/token (bf16) | KV compression | mean retention | tasks passed |",
                  "|---|---:|---:|---:|---:|"]
        for model in [self.reference, *models]:
            kv = self.kv_bytes_per_token[model]
            ratios = list(retained.get(model, {}).values())
            mean = f"{sum(ratios) / len(ratios):.3f}" if ratios else "1 (reference)"
            passed = f"{sum(r >= self.threshold for r in ratios)}/{len(ratios)}" if ratios else "–"
            lines.append(f"| {model} | {kv:,} | {self.kv_bytes_per_token[self.reference] / kv:.1f}× | {mean} | "
                         f"{passed} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({"reference": self.reference, "threshold": self.threshold,
                           "kv_bytes_per_token": self.kv_bytes_per_token,
                           "scores": {m: {t: asdict(s) for t, s in ts.items()} for m, ts in self.scores.items()},
                           "retention": self.retentions()}, indent=2)

    def write(self, out_dir: str | Path) -> list[Path]:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(self.to_markdown())
        (out_dir / "report.json").write_text(self.to_json())
        return [out_dir / "report.md", out_dir / "report.json", *self._plots(out_dir)]

    def _plots(self, out_dir: Path) -> list[Path]:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        retained = self.retentions()
        if not retained:
            return []
        tasks = list(self.scores[self.reference])
        width = 0.8 / len(retained)
        figure, axis = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4))
        for index, (model, ratios) in enumerate(retained.items()):
            xs = [i + index * width for i in range(len(tasks))]
            axis.bar(xs, [ratios.get(t, 0) for t in tasks], width, label=model)
        axis.axhline(self.threshold, color="k", ls="--", lw=1, label=f"threshold {self.threshold:.2f}")
        axis.set_xticks([i + width * (len(retained) - 1) / 2 for i in range(len(tasks))], tasks, rotation=30,
                        ha="right", fontsize=8)
        axis.set(ylabel=f"retention vs {self.reference}", ylim=(0, 1.2), title="Accuracy retention per task")
        axis.legend(fontsize=7)
        figure.tight_layout()
        per_task = out_dir / "retention_per_task.png"
        figure.savefig(per_task, dpi=120)
        plt.close(figure)

        figure, axis = plt.subplots(figsize=(5, 4))
        for model, ratios in retained.items():
            compression = self.kv_bytes_per_token[self.reference] / self.kv_bytes_per_token[model]
            mean = sum(ratios.values()) / len(ratios)
            axis.scatter(compression, mean)
            axis.annotate(model, (compression, mean), fontsize=7, xytext=(4, 4), textcoords="offset points")
        axis.axhline(self.threshold, color="k", ls="--", lw=1)
        axis.set(xlabel="KV cache compression (×)", ylabel="mean retention", title="Retention vs KV compression")
        figure.tight_layout()
        versus = out_dir / "retention_vs_kv_compression.png"
        figure.savefig(versus, dpi=120)
        plt.close(figure)
        return [per_task, versus]


def _format(score: Score) -> str:
    text = f"{score.value:.3f}" if score.value < 100 else f"{score.value:.1f}"
    return text + (f" ± {score.stderr:.3f}" if score.stderr else "")
