"""Built-in offline tasks: items well-formed, deterministic, the gold index right; lm-eval configs by absolute path."""

import json

import pytest
from llmopt.eval.analogies import analogy_items, analogy_sections
from llmopt.eval.bigbench import bigbench_items, read_bigbench_tasks
from llmopt.eval.tasks import build_tasks, chance_level, read_items, task_config, task_name


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh llmopt cache holding only the packages already fetched (no re-download)."""
    from llmopt.paths import cache_dir

    packages = cache_dir() / "packages"
    monkeypatch.setenv("LLMOPT_CACHE", str(tmp_path))
    if packages.is_dir():
        (tmp_path / "packages").symlink_to(packages)
    return tmp_path


def test_analogy_items_are_well_formed_deterministic_and_answered_by_the_fourth_word():
    items = analogy_items(200)
    assert items == analogy_items(200) and items != analogy_items(200, seed=1)
    answers = {f"{a} is to {b} as {c} is to": d for questions in analogy_sections().values()
               for a, b, c, d in questions}
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert item["choices"][item["gold"]] == answers[item["query"]]
    assert len({item["query"] for item in items}) == 200  # drawn without replacement
    assert {item["gold"] for item in items} == {0, 1, 2, 3}  # the answer is not always in the same place


def test_analogy_distractors_come_from_the_same_section():
    sections = analogy_sections()
    assert sum(len(q) for q in sections.values()) == 19544
    section_of = {f"{a} is to {b} as {c} is to": name for name, questions in sections.items()
                  for a, b, c, _ in questions}
    for item in analogy_items(50):
        answers = {q[3] for q in sections[section_of[item["query"]]]}
        assert set(item["choices"]) <= answers


def test_bigbench_items_use_the_task_prompt_and_the_best_scored_choice():
    task = {"name": "toy", "task_prefix": "Answer well.\n", "example_output_prefix": "\nAnswer: ",
            "examples": [{"input": f"question {i}", "target_scores": {"no": 0, "yes": 1, "maybe": 0.5}}
                         for i in range(5)]
            + [{"input": "tie", "target_scores": {"a": 1, "b": 1}},      # no single best answer: skipped
               {"input": "free text", "target": "x"}]}                     # not multiple choice: skipped
    items = bigbench_items(task, 10)
    assert len(items) == 5 and items == bigbench_items(task, 10)
    assert all(item["choices"][item["gold"]] == "yes" for item in items)
    assert items[0]["query"].startswith("Answer well.\nQ: question ") and items[0]["query"].endswith("\nAnswer:")
    assert len(bigbench_items(task, 3)) == 3
    with pytest.raises(ValueError, match="no multiple-choice examples"):
        bigbench_items({"name": "free", "examples": [{"input": "q", "target": "a"}]}, 3)


def test_built_tasks_are_cached_files_read_by_absolute_path(cache):
    paths = build_tasks(["analogies"])
    path = paths["analogies"]
    assert path.is_absolute() and path.is_relative_to(cache / "eval")
    items = read_items(path)
    assert items == analogy_items(len(items)) and len(items) >= 300
    assert chance_level(items) == pytest.approx(0.25)
    modified = path.stat().st_mtime_ns
    assert build_tasks(["analogies"]) == paths and path.stat().st_mtime_ns == modified  # built once
    config = task_config("analogies", path)
    assert config["task"] == task_name("analogies") == "llmopt_analogies"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(path)
    assert json.loads(json.dumps(config)) == config  # plain data, as lm-eval dict configs are


@pytest.mark.slow  # reads the 358 MB bigbench sdist (downloads it once per machine)
def test_bigbench_tasks_from_the_sdist():
    tasks = read_bigbench_tasks(["general_knowledge", "goal_step_wikihow/goal_inference"])
    knowledge = bigbench_items(tasks["general_knowledge"], 1000)
    assert len(knowledge) == 69  # the 70 examples less one with two best answers
    capital = next(item for item in knowledge if "capital of France" in item["query"])
    assert capital["choices"][capital["gold"]] == "Paris"
    goals = bigbench_items(tasks["goal_step_wikihow/goal_inference"], 300)
    assert len(goals) == 300 and all(len(item["choices"]) == 4 for item in goals)
    with pytest.raises(ValueError, match="no BIG-bench JSON task 'no_such_task'"):
        read_bigbench_tasks(["no_such_task"])
