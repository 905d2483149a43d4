"""`mlxflow`: run flows (Prefect), plus the library's own commands (`mlxcore/cli.py`, also `mlxcore ...`).

  mlxflow run pipeline|finetune|distill|preference|reward-model|rl|export|bench|eval|vlm [--config configs/X.yaml] [--set sft.lr=1e-4 ...]
  mlxflow serve [CONFIG_DIR]      # deployments: pipeline/demo, distill/default, bench/demo, eval/demo, one per config
  mlxflow deploy --pool NAME [CONFIG_DIR]   # the same deployments on a work pool (prefect worker start --pool NAME)
  mlxflow doctor                  # from here on: the library's commands, the same as `mlxcore doctor` ...
  mlxflow generate --checkpoint DIR --prompt TEXT
  mlxflow speed [--preset 200mb] [--batch-size 1,2,4,8] [--fine-tune-type lora --quantize-bits 4] ...
  mlxflow stats [--preset 200mb | --model-dir DIR] [--seq-len 1024] [--tok-per-s 5000]
  mlxflow fuse --adapter DIR --out DIR
  mlxflow download SPEC [--kind sft] --out DIR
  mlxflow pretokenize SPEC... --kind sft --tokenizer DIR --out DIR [--format alpaca] [--max-tokens 513]
  mlxflow clean [RUN_DIR ...] [--dry-run]   # temp files left by killed writers (every stage also removes its own)
  mlxflow export --model DIR --out DIR [--format q8_0 ...]   # GGUF + Modelfile, MLX 4/8-bit, llama.cpp parity gate
  mlxflow compare RUN_DIR RUN_DIR... [--out DIR]             # loss curves, bench deltas + intervals, config diff
  mlxflow serve-model --model DIR [--smoke]                   # mlx_lm.server on loopback (OpenAI API)
  mlxflow data list [--kind sft] | data show NAME             # the data catalog: datasets, licenses, mixes
"""

from __future__ import annotations

import argparse
import os
import sys

from mlxcore.cli import error, library_commands

FLOWS = {  # name: (module, flow function, config class)
    "pipeline": ("flows.pipeline", "pipeline", "PipelineConfig"),
    "finetune": ("flows.finetune", "finetune", "FinetuneConfig"),
    "distill": ("flows.distill", "distill", "DistillConfig"),
    "rl": ("flows.rl", "rl", "RLConfig"),
    "bench": ("flows.bench", "bench", "BenchRunConfig"),
    "eval": ("flows.bench", "eval_flow", "EvalConfig"),
    "preference": ("flows.preference", "preference", "PreferenceRunConfig"),
    "reward-model": ("flows.preference", "reward_model", "RewardModelRunConfig"),
    "export": ("flows.export", "export", "ExportRunConfig"),
    "vlm": ("flows.vlm", "vlm", "VLMRunConfig"),
}


def _err(msg: str, code: int) -> int:
    return error("mlxflow", msg, code)


def format_distill(config, result: dict) -> str:
    rows, model, samples = result["rows"], result["train"], result["samples"]
    acc = ", ".join(f"{c} {a:.0%}" for c, a in sorted(rows["acceptance"].items()))
    lines = [f"distill '{config.name}' finished", "",
             f"rows:     {rows['rows']} verified rows in {rows['path']}/rows.jsonl ({rows['new_rows']} new, "
             f"{rows['rows_per_s']:.2f} rows/s)", f"accepted: {acc or '-'}",
             f"student:  {model['step']} steps, held-out loss {model['initial_val_loss']:.3f} -> {model['val_loss']:.3f}"
             + (f" (resumed from {model['resumed_from']})" if model.get("resumed_from") else ""),
             "", f"held-out prompts the student's reply passes the teacher's checks on: {samples['student_pass_rate']:.0%}"]
    for s in samples["samples"]:
        lines.append(f"  {'ok ' if s['student_passes'] else '-- '}[{s['category']}] {s['student'][:100]!r}")
    lines += ["", f"checkpoint: {result['checkpoint']}",
              f"try it:     mlxflow generate --checkpoint {result['checkpoint']} --prompt 'What is 12 * (3 + 4)?'"]
    return "\n".join(lines)


def format_rl(config, result: dict) -> str:
    if result.get("done"):
        return f"rl '{config.name}': all {config.iterations} iterations are done (checkpoint {result['checkpoint']})"

    def num(v, width: int, digits: int = 3) -> str:
        return f"{'-' if v is None else f'{v:.{digits}f}':>{width}}"

    lines = [f"rl '{config.name}' ({config.update.loss}): iteration {result['iteration']} of {config.iterations} finished", "",
             f"{'iter':>4} {'reward':>7} {'rollout acc':>11} {'held-out reward':>15} {'held-out acc':>12} {'kl':>7} "
             f"{'clip':>6} {'tokens':>6}"]
    for h in result["history"]:
        lines.append(f"{h['iteration']:>4} {num(h.get('mean_reward'), 7)} {num(h.get('accuracy'), 11)} "
                     f"{num(h.get('eval_mean_reward'), 15)} {num(h.get('eval_accuracy'), 12)} {num(h.get('kl'), 7, 4)} "
                     f"{num(h.get('clip_fraction'), 6)} {num(h.get('response_tokens'), 6, 1)}")
    metrics = result.get("metrics") or {}
    if "promoted" in metrics:  # champion / challenger (promotion.json has the whole history)
        lines += ["", f"promotion:  iteration {result['iteration']} {'promoted' if metrics['promoted'] else 'kept, not promoted'}"
                      f" ({metrics['promotion']}); champion: iteration {metrics['champion']} (<run>/model)"]
    lines += ["", f"checkpoint: {result['checkpoint']}", "next:       run the same command again (or schedule it: mlxflow serve)"]
    return "\n".join(lines)


def format_bench(result: dict | None) -> str:
    """Accuracy per suite, targets side by side (the full report: report.md in result['path'])."""
    if not result:
        return ""
    targets = list(result["overall"])
    width = max(9, *(len(t) + 1 for t in targets))
    head = f"{'bench':<10}" + "".join(f"{t:>{width}}" for t in targets)
    rows = [f"{suite:<10}" + "".join(f"{acc.get(t, 0):>{width}.3f}" for t in targets)
            for suite, acc in result["accuracy"].items()]
    overall = [f"{'overall':<10}" + "".join(f"{result['overall'][t]['accuracy']:>{width}.3f}" for t in targets),
               f"{'invalid':<10}" + "".join(f"{result['overall'][t]['invalid_rate']:>{width}.3f}" for t in targets),
               f"{'tok/s':<10}" + "".join(f"{result['overall'][t]['tok_per_s'] or 0:>{width}.0f}" for t in targets)]
    return "\n".join([head, *rows, *overall, f"report:    {result['path']}/report.md"])


def format_eval(config, result: dict) -> str:
    return (f"eval '{config.name}': {config.checkpoint} on {result['tokens']:,} held-out {result['task']} tokens\n"
            f"loss {result['loss']:.4f}  ppl {result['ppl']:.3f}  (uniform ln(V) {result['uniform_loss']:.3f})")


def format_preference(result: dict | None) -> str:
    """Held-out preference metrics: the starting model beside the trained one."""
    if not result:
        return ""
    evals = result["eval"] if "start" in result["eval"] else {"reward-model": result["eval"]}
    keys = [k for k in ("accuracy", "margin", "kl", "loss", "abs_error") if any(k in e for e in evals.values())]
    lines = [f"{'held-out':<14}" + "".join(f"{k:>10}" for k in keys)]
    for label, e in evals.items():
        lines.append(f"{e.get('label', label):<14}" + "".join(f"{e.get(k, float('nan')):>10.3f}" for k in keys))
    return "\n".join(lines + [f"examples:     {next(iter(evals.values()))['examples']} held-out"])


def format_export(result: dict | None) -> str:
    """Each export's file and size, the parity gate's verdict per GGUF, how to load it in Ollama."""
    if not result:
        return ""
    lines = []
    for q, g in result["gguf"].items():
        gate = result["gates"].get(q)
        verdict = "" if gate is None else (
            f"  gate {'passed' if gate['passed'] else 'FAILED'}: {gate['tokens']['texts'] - gate['tokens']['differing_texts']}"
            f"/{gate['tokens']['texts']} texts same ids, {gate['identical']:.0%} answers identical, worst suite drop "
            f"{max(s['drop'] for s in gate['suites'].values()):.1f} pts")
        lines.append(f"gguf {q:<5} {g['gguf']} ({g.get('bytes', 0) / 1e6:.1f} MB){verdict}")
    for b, m in result["mlx"].items():
        lines.append(f"mlx {b}-bit  {m['model']}")
    if result.get("pushed"):
        lines.append(f"pushed to  {result['pushed']['repo_id']}")
    if result["gguf"]:
        first = next(iter(result["gguf"].values()))
        lines.append(f"ollama:     ollama create NAME -f {first['path']}/Modelfile")
    return "\n".join(lines)


def format_data(data: dict, train: dict) -> list[str]:
    """Lines for the filters' counts and each mixture's tokens drawn per source (none for plain data)."""
    lines = []
    for kind, info in data.items():
        if info.get("filters"):  # per source: rows in, dropped by each filter, rows out
            total = {k: sum(c[k] for c in info["filters"]) for k in info["filters"][0] if k != "source"}
            dropped = ", ".join(f"{k} {total[k]}" for k in ("length", "control", "charset", "exact_dup", "near_dup") if total[k])
            lines.append(f"filters {kind}: {total['rows_in']} rows -> {total['rows_out']} ({dropped or 'none dropped'})")
        drawn = (train.get(kind) or {}).get("mixture")
        if drawn:
            all_tokens = sum(s["tokens"] for s in drawn) or 1
            lines.append(f"{kind} mixture, tokens drawn: " + ", ".join(
                f"{s['name']} {s['tokens']:,} ({s['tokens'] / all_tokens:.1%})" for s in drawn))
    return [""] + lines if lines else []


def format_vlm(config, result: dict) -> str:
    """The VLM flow's held-out metrics beside their baselines (the bench rows)."""
    t = result["train"]
    lines = [f"vlm '{config.name}' finished: {t['step']} steps, held-out loss {t['initial_val_loss']:.3f} -> "
             f"{t['val_loss']:.3f}", "", f"{'suite':<20} {'metric':<12} {'model':>8} {'baseline':>9}"]
    bench = result["bench"]
    for r in bench["rows"] if isinstance(bench, dict) else bench:
        base = "" if r["baseline"] is None else f"{r['baseline']:.3f}"
        lines.append(f"{r['suite']:<20} {r['metric']:<12} {r['model']:>8.3f} {base:>9}  {r['baseline_kind']}")
    return "\n".join(lines + ["", f"checkpoint: {result['checkpoint']}"])


def format_summary(flow: str, config, result: dict) -> str:
    if flow == "vlm":
        return format_vlm(config, result)
    if flow == "export":
        return "\n\n".join(filter(None, [f"export '{config.name}' of {config.model} finished", format_export(result),
                                          format_bench(result.get("bench"))]))
    if flow in ("preference", "reward-model"):
        head = f"{flow} '{config.name}' finished: {result['train']['step']} steps"
        tail = f"checkpoint: {result['checkpoint']}"
        return "\n\n".join(filter(None, [head, format_preference(result), format_bench(result.get("bench")), tail]))
    if flow == "distill":
        return "\n\n".join(filter(None, [format_distill(config, result), format_bench(result.get("bench"))]))
    if flow == "rl":
        return format_rl(config, result)
    if flow == "bench":
        return format_bench(result)
    if flow == "eval":
        return format_eval(config, result)
    train, evals = result["train"], result["eval"]
    lines = [f"{flow} '{config.name}' finished", "",
             f"{'stage':<9} {'held-out loss: before -> after':<31} {'ppl':>7} {'uniform ln(V)':>14}"]
    stages = (("pretrain", "untrained"), ("sft", "pretrained")) if flow == "pipeline" else (("sft", "base"),)
    for stage, label in stages:
        e, t = evals[stage], train[stage]
        change = f"{label} {t['initial_val_loss']:.3f} -> {e['loss']:.3f}"
        lines.append(f"{stage:<9} {change:<31} {e['ppl']:>7.2f} {e['uniform_loss']:>14.3f}")
    lines += format_data(result.get("data") or {}, train)
    samples = result["samples"]
    lines += ["", f"samples (exact match {samples['exact_match']:.0%}):"]
    for s in samples["samples"]:
        mark = "ok " if s["correct"] else "-- "
        lines.append(f"  {mark}{s['prompt']!r} -> {s['reply']!r}" + ("" if s["correct"] else f" (expected {s['expected']!r})"))
    if result.get("export"):
        lines += ["", format_export(result["export"])]
    if result.get("bench"):
        lines += ["", format_bench(result["bench"])]
    model = result.get("model") or result["checkpoint"]
    lines += ["", f"checkpoint: {result['checkpoint']}" + (f" (linked as {model})" if model != result["checkpoint"] else ""),
              f"try it:     mlxflow generate --checkpoint {model} "
              "--prompt 'Sort these numbers in ascending order: 5 3 9 1 7 2 8 4'"]
    return "\n".join(lines)


def cmd_run(args) -> int:
    import importlib

    from mlxcore import config as configs

    module, name, config_class = FLOWS[args.flow]
    try:
        config = configs.load_config(args.config, args.set, cls=getattr(configs, config_class))
    except configs.ConfigError as e:
        return _err(str(e), 2)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    flow = getattr(importlib.import_module(module), name)
    state = flow(config, return_state=True)
    if not state.is_completed():
        error = state.result(raise_on_failure=False)
        return _err(f"flow {args.flow} {state.name.lower()}: {error}", 1)
    result = state.result()
    print(format_summary(args.flow, config, result))
    if isinstance(result, dict) and result.get("report"):  # tasks/report.py: the card and the trackers' deliveries
        from tasks.report import report_lines

        print("\n" + report_lines(result["report"]))
    return 0


def cmd_serve(args) -> int:
    from flows import serve

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return serve.main([args.config_dir] if args.config_dir else [])


def cmd_deploy(args) -> int:
    from mlxcore.config import ConfigError

    from flows import serve

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        ids = serve.deploy(args.pool, args.config_dir or serve.CONFIGS)
    except ConfigError as e:
        return _err(str(e), 2)
    except ValueError as e:  # no such work pool
        return _err(f"{e} (prefect work-pool create {args.pool} --type process)", 1)
    print(f"{len(ids)} deployments on work pool {args.pool!r}; run them with: prefect worker start --pool {args.pool}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxflow", description="MLX LLM training as Prefect flows")
    parser.set_defaults(prog="mlxflow")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a flow (ephemeral Prefect unless PREFECT_API_URL is set)")
    run.add_argument("flow", choices=sorted(FLOWS))
    run.add_argument("--config", help="YAML file overriding the flow's embedded defaults")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting, e.g. sft.lr=1e-4")
    run.set_defaults(func=cmd_run)
    srv = sub.add_parser("serve", help="register the deployments (pipeline, distill, rl, bench, eval: "
                         "the defaults and one per config) and run them")
    srv.add_argument("config_dir", nargs="?", help="where the YAML configs are (default: the repo's configs/)")
    srv.set_defaults(func=cmd_serve)
    dep = sub.add_parser("deploy", help="register the same deployments on a work pool (its workers run them)")
    dep.add_argument("--pool", required=True, help="the work pool (prefect work-pool create NAME --type process)")
    dep.add_argument("config_dir", nargs="?", help="where the YAML configs are (default: the repo's configs/)")
    dep.set_defaults(func=cmd_deploy)
    library_commands(sub)  # doctor, generate, speed, stats, fuse, download, pretokenize, clean
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
