"""The retention report: optimized score / reference score per task, baselines side by side.

Retention of a higher-is-better metric (accuracy) is ``optimized / reference``; of a lower-is-better one
(perplexity) ``reference / optimized``, so 1.0 means nothing was lost and below 1.0 means worse either way.
A model passes a task when its retention reaches the threshold of the task's metric (0.95 unless set).
Written as markdown (for people), JSON (for machines) and PNG plots (see `llmopt.eval.plots`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_THRESHOLD = 0.95
# Cost facts (`llmopt.costs.model_costs`, plus the KV compression ratio): column header and number format.
COSTS = {
    "kv_bytes_per_token": ("KV bytes/token (bf16)", "{:,}"),
    "kv_compression": ("KV compression", "{:.2f}×"),
    "token_sparsity": ("token sparsity", "{:.0%}"),
    "flops_skipped": ("FLOPs skipped", "{:.0%}"),
    "attention_density": ("attention density", "{:.0%}"),
    "attention_density_by_layer": ("attention density by layer", "{}"),
    "vertical_slash_heads": ("vertical-slash heads", "{:.0%}"),
}


@dataclass
class Score:
    """One model's result on one task. `stderr` as lm-eval reports it; `chance` is random guessing, if known;
    `outputs`: prompt → what the model wrote, where the task scores text (the greedy answers)."""

    value: float
    stderr: float | None = None
    metric: str = "acc"
    higher_is_better: bool = True
    chance: float | None = None
    n: int | None = None
    outputs: dict[str, str] | None = None


def retention(score: Score, reference: Score) -> float:
    """``score / reference`` (higher is better) or ``reference / score`` (lower is better); NaN if undefined."""
    numerator, denominator = (score.value, reference.value) if score.higher_is_better else \
        (reference.value, score.value)
    return numerator / denominator if denominator else math.nan


def retention_stderr(score: Score, reference: Score) -> float | None:
    """Delta-method stderr of the retention ratio, treating both scores as independent.

    Both models answer the same items, so their errors correlate and the true stderr is smaller: a retention
    within one of these of the threshold is not a clear failure.
    """
    if score.stderr is None or reference.stderr is None or not score.value or not reference.value:
        return None
    ratio = retention(score, reference)
    return abs(ratio) * math.hypot(score.stderr / score.value, reference.stderr / reference.value)


@dataclass
class Report:
    """Scores of every model (the reference among them) on the same tasks, and what each model is.

    `scores`: model → task → Score. `facts`: model → numbers that describe it: ``role``, ``seconds``, and costs
    (see `COSTS`). `thresholds`: metric → retention needed to pass;
    the key ``"default"`` covers the metrics not named. `run`: how the scores were made (limit, versions, ...).
    """

    reference: str
    scores: dict[str, dict[str, Score]]
    facts: dict[str, dict] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=lambda: {"default": DEFAULT_THRESHOLD})
    run: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reference not in self.scores:
            raise ValueError(f"the reference {self.reference!r} has no scores; models: {', '.join(self.scores)}")

    @property
    def tasks(self) -> list[str]:
        return list(self.scores[self.reference])

    def cost_columns(self) -> list[str]:
        """The cost facts some model carries: the known ones in `COSTS` order, then any other a transform reports."""
        present = {key for facts in self.facts.values() for key in facts if key not in ("role", "seconds")}
        return [key for key in COSTS if key in present] + sorted(present - set(COSTS))

    @property
    def variants(self) -> list[str]:
        return [model for model in self.scores if model != self.reference]

    def threshold(self, metric: str) -> float:
        return self.thresholds.get(metric, self.thresholds.get("default", DEFAULT_THRESHOLD))

    def retentions(self) -> dict[str, dict[str, float]]:
        """model → task → retention, for every variant and every task both it and the reference have."""
        ref = self.scores[self.reference]
        return {model: {task: retention(score, ref[task]) for task, score in self.scores[model].items()
                        if task in ref} for model in self.variants}

    def passed(self, model: str, task: str) -> bool | None:
        """Retention reaches the threshold; None when there is no retention to judge (task missing, NaN)."""
        ref, score = self.scores[self.reference].get(task), self.scores[model].get(task)
        if ref is None or score is None or math.isnan(ratio := retention(score, ref)):
            return None
        return ratio >= self.threshold(ref.metric)

    def summary(self, model: str) -> dict:
        """Mean retention and tasks passed of one variant."""
        ratios = [r for r in self.retentions()[model].values() if not math.isnan(r)]
        verdicts = [self.passed(model, task) for task in self.tasks]
        judged = [v for v in verdicts if v is not None]
        return {"mean_retention": sum(ratios) / len(ratios) if ratios else math.nan,
                "min_retention": min(ratios) if ratios else math.nan,
                "passed": sum(judged), "judged": len(judged), "all_passed": bool(judged) and all(judged)}

    def to_markdown(self) -> str:
        lines = [f"## Accuracy retention vs {self.reference}", "",
                 ("Retention = variant / reference (perplexity: reference / variant); "
                  f"pass (✓) when it reaches the metric's threshold ({self._thresholds_text()}). "
                  "± is the standard error."), ""]
        if self.run:
            flat = {key: value for key, value in self.run.items() if not isinstance(value, dict)}
            lines += ["Run: " + ", ".join(f"{key} {value}" for key, value in flat.items()), ""]
        if machine := self.run.get("machine"):
            lines += ["Machine: " + ", ".join(f"{key} {value}" for key, value in machine.items()), ""]
        head = ["task", "metric", "chance", f"{self.reference} (reference)"]
        for model in self.variants:
            head += [model, "retention"]
        lines += ["| " + " | ".join(head) + " |", "|---|---|---:|---:|" + "---:|---:|" * len(self.variants)]
        for task in self.tasks:
            ref = self.scores[self.reference][task]
            cells = [task, ref.metric, _number(ref.chance) if ref.chance is not None else "", _format(ref)]
            for model in self.variants:
                score = self.scores[model].get(task)
                cells += [_format(score) if score else "–", self._retention_cell(model, task)]
            lines.append("| " + " | ".join(cells) + " |")
        costs = self.cost_columns()
        lines += ["", "| model | role | " + "".join(f"{COSTS.get(c, (c, ''))[0]} | " for c in costs)
                  + "mean retention | min retention | tasks passed | eval time |",
                  "|---|---|" + "---:|" * (len(costs) + 4)]
        for model in self.scores:
            facts = self.facts.get(model, {})
            if model == self.reference:
                mean = minimum = "1 (reference)"
                passed = "–"
            else:
                summary = self.summary(model)
                mean, minimum = f"{summary['mean_retention']:.3f}", f"{summary['min_retention']:.3f}"
                passed = f"{summary['passed']}/{summary['judged']} " + ("PASS" if summary["all_passed"] else "FAIL")
            cells = [_fact(facts, c, COSTS.get(c, (c, "{:.4g}"))[1]) for c in costs]
            lines.append(f"| {model} | {facts.get('role', '')} | " + "".join(f"{cell} | " for cell in cells)
                         + f"{mean} | {minimum} | {passed} | {_fact(facts, 'seconds', '{:.0f} s')} |")
        return "\n".join(lines + self._differing_outputs()) + "\n"

    def _differing_outputs(self, shown: int = 5) -> list[str]:
        """Markdown: for each variant, the first `shown` prompts whose answer differs from the reference's (once
        per task: ``answers-exact`` and ``answers-f1`` share their outputs)."""
        lines, seen = [], set()
        for task, ref in self.scores[self.reference].items():
            group = task.partition("-")[0]
            if ref.outputs is None or group in seen:
                continue
            seen.add(group)
            lines += ["", f"### {group}: answers that differ from {self.reference}'s", ""]
            for model in self.variants:
                outputs = getattr(self.scores[model].get(task), "outputs", None) or {}
                differing = [(p, a) for p, a in outputs.items() if a != ref.outputs.get(p)]
                lines.append(f"- **{model}**: {len(differing)} of {len(outputs)} differ")
                lines += [f"  - {p!r}: {ref.outputs.get(p)!r} → {a!r}" for p, a in differing[:shown]]
        return lines

    def to_dict(self) -> dict:
        retained = self.retentions()
        ref = self.scores[self.reference]
        return {
            "reference": self.reference,
            "thresholds": self.thresholds,
            "tasks": self.tasks,
            "run": self.run,
            "models": {model: self.facts.get(model, {}) for model in self.scores},
            "scores": {model: {task: asdict(score) for task, score in tasks.items()}
                       for model, tasks in self.scores.items()},
            "retention": {model: {task: {"value": _finite(ratio),
                                         "stderr": retention_stderr(self.scores[model][task], ref[task]),
                                         "threshold": self.threshold(ref[task].metric),
                                         "passed": self.passed(model, task)}
                                  for task, ratio in ratios.items()}
                          for model, ratios in retained.items()},
            "summary": {model: {key: _finite(value) for key, value in self.summary(model).items()}
                        for model in self.variants},
        }

    def write(self, out_dir: str | Path) -> list[Path]:
        """report.md, report.json and the plots into `out_dir`; returns the paths written."""
        from llmopt.eval.plots import write_plots

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.md").write_text(self.to_markdown())
        (out_dir / "report.json").write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False))
        return [out_dir / "report.md", out_dir / "report.json", *write_plots(self, out_dir)]

    def _retention_cell(self, model: str, task: str) -> str:
        score, ref = self.scores[model].get(task), self.scores[self.reference][task]
        verdict = self.passed(model, task)
        if score is None or verdict is None:
            return "–"
        error = retention_stderr(score, ref)
        return f"{retention(score, ref):.3f}" + (f" ± {error:.3f}" if error else "") + (" ✓" if verdict else " ✗")

    def _thresholds_text(self) -> str:
        named = [f"{metric} ≥ {value:.2f}" for metric, value in self.thresholds.items() if metric != "default"]
        rest = f"{'otherwise ' if named else ''}≥ {self.threshold('default'):.2f}"
        return ", ".join([*named, rest])


def _number(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _format(score: Score) -> str:
    return _number(score.value) + (f" ± {_number(score.stderr)}" if score.stderr else "")


def _fact(facts: dict, key: str, pattern: str) -> str:
    return pattern.format(facts[key]) if facts.get(key) is not None else "–"


def _finite(value):
    """JSON has no NaN: an undefined number is written as null."""
    return None if isinstance(value, float) and math.isnan(value) else value
