import json
import math

import pytest
import torch
from tiny_models import tiny_model

from llmopt.eval.perplexity import perplexity
from llmopt.eval.report import Report, Score, retention
from llmopt.eval.tasks import analogy_items, bigbench_items, task_config


def test_retention_of_accuracy_and_of_perplexity():
    assert retention(Score(0.45), Score(0.5)) == pytest.approx(0.9)
    assert retention(Score(30.0, higher_is_better=False), Score(20.0, higher_is_better=False)) == pytest.approx(2 / 3)


def test_report_marks_pass_and_fail_and_writes_every_format(tmp_path):
    scores = {
        "original": {"analogies": Score(0.6, 0.02), "wikipedia-ppl": Score(20.0, higher_is_better=False)},
        "kv": {"analogies": Score(0.58, 0.02), "wikipedia-ppl": Score(40.0, higher_is_better=False)},
        "mean-pool": {"analogies": Score(0.25, 0.02), "wikipedia-ppl": Score(9000.0, higher_is_better=False)},
    }
    report = Report("original", scores, {"original": 23040, "kv": 7680, "mean-pool": 7680})
    retained = report.retentions()
    assert retained["kv"]["analogies"] == pytest.approx(0.58 / 0.6)
    assert retained["kv"]["wikipedia-ppl"] == pytest.approx(0.5)
    text = report.to_markdown()
    assert "0.967 ✓" in text and "0.500 ✗" in text and "0.417 ✗" in text
    assert "| kv | 7,680 | 3.0× | 0.733 | 1/2 |" in text
    files = report.write(tmp_path)
    assert {f.name for f in files} == {"report.md", "report.json", "retention_per_task.png",
                                        "retention_vs_kv_compression.png"}
    assert all(f.stat().st_size > 0 for f in files)
    assert json.loads((tmp_path / "report.json").read_text())["retention"]["mean-pool"]["analogies"] == \
        pytest.approx(0.25 / 0.6)


def test_perplexity_matches_a_hand_computation():
    model = tiny_model()
    windows = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(windows).logits
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, windows[:, 1:, None])
    expected = math.exp(-logprobs.mean().item())
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="windows must be"):
        perplexity(model, windows[0])


def test_analogy_items_are_well_formed_and_deterministic():
    items = analogy_items(50)
    assert items == analogy_items(50)
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert 0 <= item["gold"] < 4
        assert item["query"].endswith(" is to")
    golds = [item["gold"] for item in items]
    assert len(set(golds)) == 4  # the answer is not always in the same place


def test_bigbench_items_and_errors():
    items = bigbench_items("bigbench:general_knowledge", 300)
    assert len(items) == 70  # the whole task
    capital = next(i for i in items if "capital of France" in i["query"])
    assert capital["choices"][capital["gold"]] == "Paris"
    with pytest.raises(ValueError, match="no BIG-bench JSON task 'no_such_task'"):
        bigbench_items("bigbench:no_such_task", 10)


def test_task_config_points_at_an_absolute_cached_file():
    config = task_config("analogies", max_items=20)
    path = config["dataset_kwargs"]["data_files"]["test"]
    assert path.startswith("/") and sum(1 for _ in open(path)) == 20
