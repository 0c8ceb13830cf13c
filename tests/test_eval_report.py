"""The retention report: its math, its verdicts, and every file it writes."""

import json
import math

import pytest
from llmopt.eval.report import Report, Score, retention, retention_stderr
from llmopt.eval.suite import parse_thresholds


def ppl(value, stderr=None):
    return Score(value, stderr, "ppl", higher_is_better=False)


@pytest.fixture
def report():
    scores = {
        "original": {"analogies": Score(0.6, 0.02, chance=0.25), "wikipedia-ppl": ppl(20.0, 0.5)},
        "kv": {"analogies": Score(0.58, 0.02), "wikipedia-ppl": ppl(21.0, 0.5)},
        "mean-pool": {"analogies": Score(0.25, 0.02), "wikipedia-ppl": ppl(9000.0, 300.0)},
    }
    facts = {"original": {"role": "reference", "kv_bytes_per_token": 23040, "kv_compression": 1.0},
             "kv": {"role": "model", "kv_bytes_per_token": 7680, "kv_compression": 3.0, "seconds": 12.3},
             "mean-pool": {"role": "baseline", "kv_bytes_per_token": 7680, "kv_compression": 3.0}}
    return Report("original", scores, facts)


def test_retention_is_a_ratio_that_is_below_one_when_worse_for_either_direction():
    assert retention(Score(0.45), Score(0.5)) == pytest.approx(0.9)
    assert retention(Score(0.55), Score(0.5)) == pytest.approx(1.1)
    assert retention(ppl(30.0), ppl(20.0)) == pytest.approx(2 / 3)
    assert retention(ppl(10.0), ppl(20.0)) == pytest.approx(2.0)
    assert math.isnan(retention(Score(0.3), Score(0.0)))


def test_retention_stderr_by_the_delta_method():
    error = retention_stderr(Score(0.4, 0.04), Score(0.5, 0.03))
    assert error == pytest.approx(0.8 * math.sqrt(0.1 ** 2 + 0.06 ** 2))
    assert retention_stderr(Score(0.4), Score(0.5, 0.03)) is None


def test_pass_and_fail_against_the_default_and_per_metric_thresholds(report):
    assert report.passed("kv", "analogies") is True            # 0.967 >= 0.95
    assert report.passed("kv", "wikipedia-ppl") is True        # 20/21 = 0.952
    assert report.passed("mean-pool", "analogies") is False
    strict = Report("original", report.scores, report.facts, {"default": 0.95, "ppl": 0.96})
    assert strict.passed("kv", "wikipedia-ppl") is False and strict.passed("kv", "analogies") is True
    summary = strict.summary("kv")
    assert summary["passed"] == 1 and summary["judged"] == 2 and summary["all_passed"] is False
    assert summary["mean_retention"] == pytest.approx((0.58 / 0.6 + 20 / 21) / 2)


def test_a_task_without_a_reference_score_is_not_judged():
    scores = {"ref": {"a": Score(0.0)}, "x": {"a": Score(0.3)}}
    report = Report("ref", scores)
    assert report.passed("x", "a") is None
    assert json.loads(json.dumps(report.to_dict()))["retention"]["x"]["a"]["value"] is None


def test_markdown_shows_scores_retentions_verdicts_and_savings(report):
    text = report.to_markdown()
    assert "| analogies | acc | 0.250 | 0.600 ± 0.020 | 0.580 ± 0.020 | 0.967 ± 0.046 ✓ |" in text
    assert "| wikipedia-ppl | ppl |  | 20.000 ± 0.500 | 21.000 ± 0.500 | 0.952 ± 0.033 ✓ |" in text
    assert "0.417 ± 0.036 ✗" in text and "0.002 ± 0.000 ✗" in text
    assert "| kv | model | 7,680 | 3.00× | 0.960 | 0.952 | 2/2 PASS | 12 s |" in text  # no sparsity column: no model has one
    assert "| mean-pool | baseline | 7,680 | 3.00× | 0.209 | 0.002 | 0/2 FAIL | – |" in text


def test_write_produces_markdown_json_and_plots(report, tmp_path):
    files = report.write(tmp_path)
    assert {f.name for f in files} == {"report.md", "report.json", "retention_per_task.png",
                                        "retention_vs_kv_compression.png"}
    assert all(f.stat().st_size > 0 for f in files)
    assert all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files if f.suffix == ".png")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["retention"]["mean-pool"]["analogies"]["value"] == pytest.approx(0.25 / 0.6)
    assert data["retention"]["kv"]["wikipedia-ppl"] == pytest.approx(
        {"value": 20 / 21, "stderr": data["retention"]["kv"]["wikipedia-ppl"]["stderr"], "threshold": 0.95,
         "passed": True})
    assert data["summary"]["kv"]["all_passed"] is True and data["models"]["kv"]["kv_compression"] == 3.0
    assert data["scores"]["original"]["wikipedia-ppl"]["higher_is_better"] is False


def test_token_sparsity_plot_only_when_a_variant_carries_it(report, tmp_path):
    report.facts["kv"]["token_sparsity"] = 0.25
    names = {f.name for f in report.write(tmp_path)}
    assert "retention_vs_token_sparsity.png" in names
    assert "| kv | model | 7,680 | 3.00× | 25% |" in report.to_markdown()


def test_thresholds_from_the_command_line():
    assert parse_thresholds([]) == {"default": 0.95}
    assert parse_thresholds(["0.9", "ppl=0.8"]) == {"default": 0.9, "ppl": 0.8}
    with pytest.raises(ValueError, match="METRIC=VALUE"):
        parse_thresholds(["ppl=high"])


def test_the_reference_must_have_scores():
    with pytest.raises(ValueError, match="no scores"):
        Report("missing", {"a": {"t": Score(0.5)}})
