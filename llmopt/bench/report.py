"""The bench's output: ``bench.json`` (everything, for machines), ``bench.md`` (the table, for people) and one
PNG per plot (speed vs context length, throughput vs concurrency)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llmopt.bench.results import SectionResult, Value
from llmopt.bench.timing import Spread

RATIO = "{:.2f}×"
PLOTS = {
    "speed_vs_context": ("context length (tokens)", "tokens/s", "Speed vs context length"),
    "throughput_vs_concurrency": ("concurrent sequences", "output tokens/s", "Throughput vs concurrency"),
}


def format_value(value: Value, pattern: str = "{:,.3g}") -> str:
    if value is None:
        return ""
    if isinstance(value, Spread):
        return value.format(pattern) if value.samples > 1 else pattern.format(value.median)
    return f"{value:,}" if isinstance(value, int) else pattern.format(value)




def size(num_bytes: float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{num_bytes / 2**30:.3g} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.3g} MiB"


def table(sections: list[SectionResult]) -> str:
    """All claims in one markdown table (ratio > 1: the optimized side is better)."""
    lines = ["| section | claim | original | optimized | ratio (range) | bound | model predicts | check |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    for section in sections:
        for row in section.rows:
            unit = f" ({row.unit})" if row.unit else ""
            predicted = f"{row.predicted:.2f}×" if row.predicted is not None else ""
            lines.append(f"| {section.name} | {row.claim}{unit} | {format_value(row.original)} | "
                         f"{format_value(row.optimized)} | {format_value(row.ratio, RATIO)} | {row.bound} | "
                         f"{predicted} | "
                         f"{row.check} |")
    return "\n".join(lines)


def markdown(sections: list[SectionResult], header: dict) -> str:
    machine, versions = header["machine"], header["versions"]
    lines = [f"# llmopt bench{' (quick)' if header['quick'] else ''}", "",
             f"`{header['command']}` — {header['started']}, {header['seconds']:.0f} s", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores ({machine.get('torch_threads', '?')} torch threads), "
             f"{machine['memory_gib']} GiB"
             + (f", {machine['gpu']}" if machine["gpu"] else ", no GPU")
             + f"; load average {header['load_average'][0]} at start, {header['load_average'][1]} at end.",
             "Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items() if value), ""]
    if header.get("shared_machine"):
        lines += [f"**Shared machine**: {header['shared_machine']}", ""]
    lines += [("Ratio: how many times better the optimized side is (> 1 is a win: more tokens/s or capacity, fewer "
              "ms or bytes), both sides measured in this run; ranges pair the extreme repeats."), "",
              table(sections), ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.skipped:
            lines += [f"Skipped: {section.skipped}", ""]
            continue
        lines += [f"- {note}" for note in section.notes] + [f"({section.seconds:.0f} s)", ""]
    return "\n".join(lines)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_plots(sections: list[SectionResult], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    written = []
    for plot, (xlabel, ylabel, title) in PLOTS.items():
        series = [s for section in sections for s in section.series if s.plot == plot]
        if not series:
            continue
        figure, axis = plt.subplots(figsize=(6, 4.2))
        for line in series:
            axis.plot(line.x, line.y, marker="o", label=line.label)
        axis.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale="log", yscale="log")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = out_dir / f"{plot}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def write_report(sections: list[SectionResult], header: dict, out_dir: Path) -> list[Path]:
    """Writes bench.json, bench.md and the plots into `out_dir`; returns the paths written."""
    (out_dir / "bench.json").write_text(json.dumps({**header, "sections": _plain(sections)}, indent=1))
    (out_dir / "bench.md").write_text(markdown(sections, header))
    return [out_dir / "bench.json", out_dir / "bench.md", *write_plots(sections, out_dir)]

