"""`mlxflow`: run flows, check the machine, talk to a checkpoint.

  mlxflow run pipeline [--config configs/X.yaml] [--set sft.lr=1e-4 ...]
  mlxflow doctor
  mlxflow generate --checkpoint DIR --prompt TEXT
"""

from __future__ import annotations

import argparse
import os
import sys

FLOWS = {"pipeline": ("flows.pipeline", "pipeline")}


def _err(msg: str, code: int) -> int:
    print(f"mlxflow: error: {msg}", file=sys.stderr)
    return code


def format_summary(config, result: dict) -> str:
    train, evals = result["train"], result["eval"]
    lines = [f"pipeline '{config.name}' finished", "",
             f"{'stage':<9} {'held-out loss: before -> after':<31} {'ppl':>7} {'uniform ln(V)':>14}"]
    for stage, label in (("pretrain", "untrained"), ("sft", "pretrained")):
        e, t = evals[stage], train[stage]
        change = f"{label} {t['initial_val_loss']:.3f} -> {e['loss']:.3f}"
        lines.append(f"{stage:<9} {change:<31} {e['ppl']:>7.2f} {e['uniform_loss']:>14.3f}")
    samples = result["samples"]
    lines += ["", f"samples (exact match {samples['exact_match']:.0%}):"]
    for s in samples["samples"]:
        mark = "ok " if s["correct"] else "-- "
        lines.append(f"  {mark}{s['prompt']!r} -> {s['reply']!r}" + ("" if s["correct"] else f" (expected {s['expected']!r})"))
    lines += ["", f"checkpoint: {result['checkpoint']}",
              f"try it:     mlxflow generate --checkpoint {result['checkpoint']} --prompt 'Sort: 5 3 9 1'"]
    return "\n".join(lines)


def cmd_run(args) -> int:
    from mlxcore.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as e:
        return _err(str(e), 2)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    import importlib

    module, name = FLOWS[args.flow]
    flow = getattr(importlib.import_module(module), name)
    state = flow(config, return_state=True)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        return _err(f"flow {args.flow} {state.name.lower()}: {error}", 1)
    print(format_summary(config, state.result()))
    return 0


def cmd_doctor(args) -> int:
    from mlxcore import doctor

    print(doctor.format_report(doctor.report()))
    return 0


def cmd_generate(args) -> int:
    from mlxcore.generate import load_chat, reply

    try:
        model, tokenizer = load_chat(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        return _err(str(e), 2)
    print(reply(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_p))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxflow", description="MLX LLM training as Prefect flows")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a flow (ephemeral Prefect unless PREFECT_API_URL is set)")
    run.add_argument("flow", choices=sorted(FLOWS))
    run.add_argument("--config", help="YAML file overriding the flow's embedded defaults")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting, e.g. sft.lr=1e-4")
    run.set_defaults(func=cmd_run)
    doc = sub.add_parser("doctor", help="device, backend, BLAS and a measured sgemm rate")
    doc.set_defaults(func=cmd_doctor)
    gen = sub.add_parser("generate", help="chat with a checkpoint")
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
