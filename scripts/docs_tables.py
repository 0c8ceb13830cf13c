"""The results tables of README.md and docs/*.md, regenerated from the JSON files that hold their numbers.

A table is the block between ``<!-- results: NAME -->`` and ``<!-- /results -->`` in a markdown file; its numbers
and where they come from (date, machine, commit, command) live in ``docs/results/NAME.json``. A block
``<!-- generated: NAME -->`` … ``<!-- /generated -->`` is produced by code instead (`GENERATED`: the families
table, from the adapter registry):

    {"measured": {"date": ..., "machine": ..., "commit": ..., "command": ...},
     "columns": ["model", ...], "rows": [["original", 24.47, ...], ...]}

    python scripts/docs_tables.py             rewrite every block from its JSON
    python scripts/docs_tables.py --check     exit 1, naming the blocks, where a block differs from its JSON
    python scripts/docs_tables.py --from-report OUT/report.json --name NAME [--tasks ...]
                                              write docs/results/NAME.json from an `llmopt eval` report.json or an
                                              `llmopt calibrate` checkpoint's llmopt_report.json (no retyping)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
GENERATED_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def families() -> str:
    from llmopt.families import families_summary

    return families_summary()


GENERATED = {"families": families}


def cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(result: dict) -> str:
    """The markdown table of one result file, and the line that says where its numbers come from."""
    columns, rows = result["columns"], result["rows"]
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {row[0]!r} has {len(row)} cells for {len(columns)} columns")
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "".join("---:|" if n else "---|" for n in numeric[1:])]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    measured = result["measured"]
    lines += ["", f"<sub>Measured {measured['date']} on {measured['machine']}, commit {measured['commit']}: "
                  f"`{measured['command']}`" + (f". {measured['note']}" if measured.get("note") else "") + "</sub>"]
    return "\n".join(lines) + "\n"


def regenerate(text: str, results: Path = RESULTS) -> str:
    def replace(match: re.Match) -> str:
        source = results / f"{match['name']}.json"
        if not source.is_file():
            raise FileNotFoundError(f"the block 'results: {match['name']}' has no {source}")
        return match.group(1) + render(json.loads(source.read_text())) + match.group(4)

    def generate(match: re.Match) -> str:
        if match["name"] not in GENERATED:
            raise KeyError(f"no generator for the block 'generated: {match['name']}'; known: {', '.join(GENERATED)}")
        return match.group(1) + GENERATED[match["name"]]() + match.group(4)

    return GENERATED_BLOCK.sub(generate, BLOCK.sub(replace, text))


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


COSTS = ("KV bytes/token", "FLOPs skipped")  # the cost columns a report can fill; those no model has are left out


def from_report(path: Path, tasks: list[str] | None, note: str = "") -> dict:
    """A result file from a retention report: one row per model, each task's score with its retention."""
    data = json.loads(path.read_text())
    report = data.get("retention", data)  # a checkpoint's llmopt_report.json holds the report under "retention"
    run, retained = report["run"], report["retention"]
    tasks = tasks or report["tasks"]
    columns = ["model", *tasks, "mean retention", *COSTS]
    rows = []
    for model, facts in report["models"].items():
        scores = report["scores"][model]
        cells = [model]
        for task in tasks:
            value = scores[task]["value"] if task in scores else None
            kept = retained.get(model, {}).get(task, {}).get("value")
            cells.append(None if value is None else cell(value) + ("" if kept is None else f" ({kept:.2f})"))
        summary = report.get("summary", {}).get(model)
        cells += [round(summary["mean_retention"], 3) if summary else 1,
                  facts.get("kv_bytes_per_token"),
                  None if facts.get("flops_skipped") is None else f"{facts['flops_skipped']:.0%}"]
        rows.append(cells)
    kept = [i for i, name in enumerate(columns) if name not in COSTS or any(row[i] is not None for row in rows)]
    machine = run.get("machine") or {}
    return {"measured": {"date": run["date"], "commit": run.get("commit") or "unknown",
                         "machine": f"{machine.get('cpu', 'unknown CPU')}, {machine.get('cores', '?')} cores",
                         "command": run.get("command") or "unknown", "note": " ".join(["(retention in brackets)", note])},
            "columns": [columns[i] for i in kept], "rows": [[row[i] for i in kept] for row in rows]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that every block matches its JSON")
    parser.add_argument("--from-report", type=Path, help="a report.json or llmopt_report.json to import")
    parser.add_argument("--name", help="with --from-report: the result's name (docs/results/NAME.json)")
    parser.add_argument("--tasks", nargs="+", help="with --from-report: the tasks to show (default: all)")
    parser.add_argument("--note", default="", help="with --from-report: what a reader should know about the run")
    args = parser.parse_args(argv)
    if args.from_report:
        if not args.name:
            parser.error("--from-report needs --name")
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.name}.json").write_text(json.dumps(from_report(args.from_report, args.tasks, args.note), indent=1, ensure_ascii=False)
                                                   + "\n")
        return 0
    stale = []
    for path in markdown_files():
        text = path.read_text()
        fresh = regenerate(text)
        if fresh != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(fresh)
    if args.check and stale:
        print(f"tables differ from docs/results/*.json in: {', '.join(map(str, stale))}; run "
              "python scripts/docs_tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
