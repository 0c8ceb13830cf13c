"""The suite end to end on the real default model through lm-eval's HFLM (small --limit)."""

import json

import pytest

from llmopt.cli import main
from llmopt.eval.harness import task_specs

pytestmark = [pytest.mark.slow, pytest.mark.eval]


def test_unknown_task_is_refused_before_any_model_loads():
    with pytest.raises(ValueError, match="unknown task"):
        task_specs(["not_a_task_anywhere"])


def test_eval_command_writes_the_retention_report(tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["eval", "--model", "smollm2-135m-mha", "--reference", "smollm2-135m",
                 "--baselines", "configs/kv-mean-pool.yaml",
                 "--tasks", "wikipedia-ppl", "analogies", "bigbench:general_knowledge", "--limit", "20",
                 "--out", str(out)])
    assert code == 0
    text = (out / "report.md").read_text()
    assert "| analogies |" in text and "| wikipedia-ppl |" in text
    report = json.loads((out / "report.json").read_text())
    # the exact MHA twin retains everything; mean-pooled KV heads lose most of it
    assert report["retention"]["smollm2-135m-mha"] == pytest.approx(
        {"wikipedia-ppl": 1.0, "analogies": 1.0, "bigbench:general_knowledge": 1.0}, abs=1e-4)
    scores = report["scores"]
    assert scores["kv-mean-pool"]["wikipedia-ppl"]["value"] > 100 * scores["smollm2-135m"]["wikipedia-ppl"]["value"]
    assert scores["smollm2-135m"]["analogies"]["value"] > 0.4  # chance is 0.25
    assert (out / "retention_per_task.png").stat().st_size > 0
