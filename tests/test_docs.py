"""The README and docs/ tell the truth: their tables are their result files, their commands parse as written, the
files they name exist, and the README's Python quickstart runs."""

import importlib.util
import os
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def docs_tables():
    spec = importlib.util.spec_from_file_location("docs_tables", ROOT / "scripts" / "docs_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def commands(language: str = "bash") -> list[tuple[Path, list[str]]]:
    """Every command line of the pages' shell blocks, continuation lines joined, comments dropped."""
    found = []
    for page in PAGES:
        for block in code_blocks(page, language):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if line and not line.startswith("#"):
                    found.append((page, shlex.split(line)))
    return found


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_table_matches_its_result_file():
    assert docs_tables().main(["--check"]) == 0


def test_a_table_that_disagrees_with_its_result_file_is_found(tmp_path):
    tables = docs_tables()
    (tmp_path / "t.json").write_text('{"measured": {"date": "d", "machine": "m", "commit": "c", "command": "x"}, '
                                     '"columns": ["model", "ppl"], "rows": [["original", 24.47]]}')
    page = "before\n<!-- results: t -->\n| stale |\n<!-- /results -->\nafter\n"
    fresh = tables.regenerate(page, tmp_path)
    assert "| original | 24.47 |" in fresh and "| stale |" not in fresh and fresh.endswith("after\n")
    assert tables.regenerate(fresh, tmp_path) == fresh
    (tmp_path / "t.json").write_text((tmp_path / "t.json").read_text().replace("24.47", "24.48"))
    assert tables.regenerate(fresh, tmp_path) != fresh


def test_every_command_in_the_docs_parses_and_names_files_that_exist():
    from llmopt.cli import build_parser

    lines = commands()
    assert sum(argv[0] == "llmopt" for _, argv in lines) >= 10
    for page, argv in lines:
        where = f"{page.name}: {shlex.join(argv)}"
        if argv[0] == "llmopt":
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"does not parse: {where}")
        elif argv[0] in ("bash", "python"):
            assert (ROOT / argv[1]).is_file(), where
        for arg in argv:
            if re.fullmatch(r"(configs|scripts)/[\w./-]+", arg):
                assert (ROOT / arg).is_file(), where


def test_every_config_the_docs_name_exists():
    named = {name for page in PAGES for name in re.findall(r"configs/[\w.-]+\.yaml", page.read_text())}
    assert named and [name for name in sorted(named) if not (ROOT / name).is_file()] == []


@pytest.mark.slow
def test_the_readme_quickstart_runs(tmp_path, monkeypatch):
    (block,) = code_blocks(ROOT / "README.md", "python")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md quickstart", "exec"), namespace)
    assert namespace["model"].config.num_key_value_heads == 1
    assert os.path.isfile(tmp_path / "out" / "smollm2-kv1" / "config.json")
