"""`mlxcore`: the library's own commands, no Prefect needed (`mlxflow` has them too, beside run / serve / deploy).

  mlxcore doctor
  mlxcore generate --checkpoint DIR --prompt TEXT
  mlxcore speed [--preset 200mb] [--batch-size 1,2,4,8] [--fine-tune-type lora --quantize-bits 4] ...
  mlxcore stats [--preset 200mb | --model-dir DIR] [--seq-len 1024] [--tok-per-s 5000]
  mlxcore fuse --adapter DIR --out DIR
  mlxcore download SPEC [--kind sft] --out DIR
  mlxcore pretokenize SPEC... --kind sft --tokenizer DIR --out DIR [--format alpaca] [--max-tokens 513]
  mlxcore clean [RUN_DIR ...] [--dry-run]   # temp files left by killed writers (every stage also removes its own)
  mlxcore export --model DIR --out DIR [--format q8_0 --format mlx-4bit ...] [--no-gate]   # GGUF + Modelfile, MLX; gated
  mlxcore compare RUN_DIR RUN_DIR... [--out DIR] [--confidence 0.95]   # curves, bench deltas + intervals, config diff
  mlxcore serve-model --model DIR [--adapter DIR] [--port N] [--smoke [--prompt TEXT]]   # mlx_lm.server, OpenAI API
  mlxcore data list [--kind pretrain|sft|preference|rl|eval|vlm]   # the data catalog: name, kind, size, license
  mlxcore data show NAME                   # one dataset (spec, columns, license, terms, mixes) or a mix
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def error(prog: str, msg: str, code: int) -> int:
    print(f"{prog}: error: {msg}", file=sys.stderr)
    return code


def cmd_doctor(args) -> int:
    from mlxcore.perf import doctor

    print(doctor.format_report(doctor.report()))
    return 0


def cmd_generate(args) -> int:
    from mlxcore.models.generate import load_chat, reply

    try:
        model, tokenizer = load_chat(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        return error(args.prog, str(e), 2)
    print(reply(model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_p))
    return 0


def _speed_config(args):
    from mlxcore.perf.speed import SpeedConfig

    fields = {k: v for k, v in vars(args).items() if k in SpeedConfig.model_fields and v is not None}
    model = {}
    for shape in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
        if getattr(args, shape, None):
            model[shape] = getattr(args, shape)
    return SpeedConfig(**{**fields, "model": model, "batch_size": args.batch_size[0]})


def cmd_speed(args) -> int:
    from pydantic import ValidationError

    from mlxcore.perf import speed

    try:
        cfg = _speed_config(args)
    except ValidationError as e:
        return error(args.prog, str(e), 2)
    if len(args.batch_size) == 1 and args.max_memory_gb is None:
        try:
            rows = [speed.measure(cfg)]
        except (ValueError, FileNotFoundError) as e:
            return error(args.prog, str(e), 2)
    else:
        rows = speed.sweep(cfg, args.batch_size, args.max_memory_gb)
    what = cfg.model_dir or f"preset {cfg.preset}"
    knobs = [f"{cfg.fine_tune_type}"] + ([f"{cfg.quantize_bits}-bit base"] if cfg.quantize_bits else []) + \
            ([f"grad_checkpoint={cfg.grad_checkpoint}"] if cfg.grad_checkpoint else []) + \
            ([f"loss_chunk={cfg.loss_chunk}"] if cfg.loss_chunk else []) + (["sparse_loss"] if cfg.sparse_loss else []) + \
            ([f"mask_density={cfg.mask_density}"] if cfg.mask_density < 1 else [])
    first = next((r for r in rows if r.get("status") == "ok"), {})
    print(f"{what}, {cfg.dtype}, {', '.join(knobs)}, {cfg.optimizer}; device {first.get('device', '?')}")
    if first:
        print(f"params {first['params']:,}, trainable {first['trainable_params']:,}, "
              f"{first['flops_per_token']:,} train FLOPs/token, peak {first['peak_tflops']:.2f} TFLOP/s")
    print(speed.format_table(rows))
    phases = {k: v for k, v in first.items() if k.startswith("ms_")}
    if phases:
        print("per-phase ms: " + ", ".join(f"{k[3:]} {v:.1f}" for k, v in phases.items()))
    if first.get("in_step_ms"):
        c = first["in_step_ms"]
        print(f"in the compiled step: whole {c['whole']:.1f} ms, forward + backward alone {c['fwd_bwd']:.1f} ms "
              f"-> clip + optimizer add {c['clip_optimizer']:.1f} ms (medians, interleaved)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if any(r.get("status") == "ok" for r in rows) else 1


def cmd_stats(args) -> int:
    from mlxcore.perf import stats
    from mlxcore.config import ModelConfig
    from mlxcore.models.model import hf_config

    if args.model_dir:
        try:
            config = json.loads((Path(args.model_dir) / "config.json").read_text())
        except OSError as e:
            return error(args.prog, f"{args.model_dir}: cannot read config.json: {e.strerror}", 2)
    else:
        shapes = {k: getattr(args, k) for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                                                "intermediate_size") if getattr(args, k, None)}
        config = hf_config(ModelConfig(preset=args.preset, **shapes), args.vocab_size)
    peak = {"flops": args.peak_tflops * 1e12, "source": "--peak-tflops", "device": "given"} if args.peak_tflops else None
    info = stats.report(config, args.seq_len, args.dtype, args.tok_per_s, args.adapters, peak)
    rows = {
        "model": args.model_dir or f"preset {args.preset}",
        "matmul params (N)": f"{info['matmul_params']:,}",
        "seq_len": info["seq_len"],
        "FLOPs/token forward": f"{info['flops_per_token_forward']:,}",
        "FLOPs/token train": f"{info['flops_per_token_train']:,}",
        "formula": "forward = 2N + 4*L*T*heads*head_dim; train = 3x forward (2x for adapters)",
        "peak": f"{info['peak_flops'] / 1e12:.2f} TFLOP/s ({info['peak_source']}, {info['device']})",
    }
    if args.tok_per_s:
        rows["MFU"] = f"{info['mfu']:.1%} at {args.tok_per_s:,.0f} tok/s"
    width = max(map(len, rows))
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows.items()))
    return 0


def cmd_fuse(args) -> int:
    from mlxcore.models.adapters import is_adapter_dir
    from mlxcore.models.checkpoint import fuse

    if not is_adapter_dir(args.adapter):
        return error(args.prog, f"{args.adapter}: not an adapter dir (no adapter_config.json)", 2)
    try:
        out = fuse(args.adapter, args.out)
    except (ValueError, FileNotFoundError) as e:
        return error(args.prog, str(e), 2)
    print(f"fused model: {out}")
    return 0


def cmd_export(args) -> int:
    from mlxcore.config import ParityGateConfig
    from mlxcore.export.parity import ParityError
    from mlxcore.export.run import export_all
    from mlxcore.models.layout import is_model_dir

    if not is_model_dir(args.model):
        return error(args.prog, f"{args.model}: not a model dir (no config.json or adapter_config.json)", 2)
    gate = None if args.no_gate else ParityGateConfig(examples=args.examples, text=args.text)
    try:
        result = export_all(args.model, args.out, args.format or ["q8_0"], modelfile=not args.no_modelfile,
                            group_size=args.group_size, gate=gate)
    except (ValueError, FileNotFoundError, ParityError) as e:
        return error(args.prog, str(e), 2)
    if not result["passed"]:
        return error(args.prog, f"the parity gate failed (see {args.out}/parity-*.md)", 1)
    return 0


def cmd_download(args) -> int:
    from mlxcore.data.download import DownloadError, fetch

    try:
        manifest = fetch(args.spec, args.out, args.kind, args.max_download_mb)
    except DownloadError as e:
        return error(args.prog, str(e), 1)
    print(json.dumps({"out": args.out, "source": manifest["source"], "license": manifest.get("license"),
                      "data_files": manifest["data_files"]}, indent=2))
    return 0


def cmd_pretokenize(args) -> int:
    import tempfile

    from mlxcore.data.download import DownloadError, fetch
    from mlxcore.data.pretokenize import pretokenize
    from mlxcore.data.records import DataError

    source = {"format": args.format, "overlong": args.overlong, "val_fraction": args.val_fraction,
              "system_prompt": args.system_prompt, "prompt_format": args.prompt_format,
              "response_format": args.response_format}
    def fetched(tmp: str, split: str, specs: list[str]) -> list[str]:
        dirs = [str(Path(tmp) / f"{split}-{i}") for i in range(len(specs))]
        for spec, out in zip(specs, dirs):
            fetch(spec, out, args.kind, args.max_download_mb)
        return dirs

    try:
        with tempfile.TemporaryDirectory(prefix="mlxflow-fetch-") as tmp:
            inputs = {"train": fetched(tmp, "train", args.specs), "val": fetched(tmp, "val", args.val)}
            m = pretokenize(inputs, args.tokenizer, args.kind, args.out, source=source, max_tokens=args.max_tokens,
                            workers=args.workers)
    except (DownloadError, DataError, FileNotFoundError, FileExistsError, ValueError) as e:
        return error(args.prog, str(e), 1)
    splits = {k: {"docs": v["num_docs"], "tokens": v["num_tokens"]} for k, v in m["splits"].items()}
    print(json.dumps({"out": args.out, "splits": splits, "stats": m["stats"], "formats": m["formats"]}, indent=2))
    return 0


def _fmt_columns(columns: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in columns.items()) + "}"


def cmd_data_list(args) -> int:
    from mlxcore.data import catalog

    rows = [(e.name, ",".join(e.kind), str(e.size), e.license + (" (gated)" if e.gated else ""), e.description)
            for e in catalog.entries(args.kind)]
    head = ("name", "kind", "size", "license", "description")
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(4)] if rows else [len(h) for h in head[:4]]
    line = lambda r: "  ".join(f"{v:<{w}}" for v, w in zip(r[:4], widths)) + "  " + r[4]  # noqa: E731
    print("\n".join([line(head), "  ".join("-" * w for w in widths) + "  " + "-" * 11, *map(line, rows)]))
    return 0


def cmd_data_show(args) -> int:
    from mlxcore import lineage
    from mlxcore.data import catalog

    cat = catalog.load()
    if args.name in cat.mixes:
        m = cat.mixes[args.name]
        total = sum(m.weights.values())
        print(f"mix:      {m.name}\nbudget:   {m.budget_tokens:,} tokens\nsources:")
        for name, w in m.weights.items():
            e, epochs = cat.datasets[name], m.epochs.get(name, 1)
            print(f"  {name:<20} weight {w:g} ({w / total * m.budget_tokens / 1e9:,.3g}B tokens, at most {epochs:g} "
                  f"epoch{'' if epochs == 1 else 's'})  {e.license}" + ("" if e.spec else "  (fetched by hand: see access)"))
        print(f"why:      {m.reasoning}\nuse:      mlxcore.data.catalog.mix_sources({m.name!r}) -> data.pretrain.sources")
        return 0
    if args.name not in cat.datasets:
        return error(args.prog, str(catalog.unknown_name("catalog dataset or mix", args.name,
                                                         [*cat.datasets, *cat.mixes])), 2)
    e = cat.datasets[args.name]
    mixes = [f"{m.name} (weight {m.weights[e.name]:g})" for m in cat.mixes.values() if e.name in m.weights]
    fields = [("name", e.name), ("description", e.description), ("kind", ", ".join(e.kind)),
              ("spec", f"catalog:{e.name} -> {e.spec}" if e.spec else "none: see access"),
              ("repo", f"{e.repo}  (https://huggingface.co/datasets/{e.repo})"), ("format", e.format or "-"),
              ("columns", _fmt_columns(e.columns) if e.columns else "as they are"), ("size", str(e.size)),
              ("license", e.license + (" (gated: accept the terms on the hub, set HF_TOKEN)" if e.gated else "")),
              ("what it asks", lineage.license_terms(e.license)), ("terms", e.terms or "-"),
              ("access", e.access or "catalog:" + e.name), ("in mixes", ", ".join(mixes) or "none")]
    print("\n".join(f"{k + ':':<13} {v}" for k, v in fields))
    return 0


def cmd_clean(args) -> int:
    from mlxcore.io import clean_stale_tmp, temp_files

    for root in args.run_dirs:
        for path, state in temp_files(root, recursive=True):
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
            print(f"{state:8s} {size / 2**20:9.1f} MiB  {path}")
        if not args.dry_run:
            removed = clean_stale_tmp(root, recursive=True)
            print(f"{root}: removed {len(removed)} stale temp file(s)")
    return 0


def cmd_compare(args) -> int:
    """Runs side by side: compare.md, compare.json, loss-curves.png in --out; the markdown printed."""
    from mlxcore.bench.compare import CompareError, compare

    first = Path(args.runs[0])
    out = args.out or str((first.parent.parent if first.is_file() else first.parent) / "compare")
    try:
        result = compare(args.runs, out, confidence=args.confidence, resamples=args.resamples, seed=args.seed)
    except CompareError as e:
        return error(getattr(args, "prog", "mlxcore"), str(e), 2)
    print((Path(result["out"]) / "compare.md").read_text())
    print(f"written: {result['out']}/compare.md, compare.json, loss-curves.png")
    return 0


def cmd_serve_model(args) -> int:
    """Serve a checkpoint with mlx_lm.server on loopback; --smoke: one chat completion, print it, stop."""
    import signal

    from mlxcore.serving import ServeError, serve_model

    try:
        server = serve_model(args.model, adapter=args.adapter, host=args.host, port=args.port,
                             fuse=True if args.fuse else None, wait_s=args.wait_s,
                             log_level="WARNING" if args.smoke else "INFO")
    except (FileNotFoundError, ValueError) as e:
        return error(args.prog, str(e), 2)
    what = f"{server.model}" + (f" + adapter {server.adapter}" + (" (fused)" if server.fuse else "")
                                 if server.adapter else "")
    try:
        server.start()
    except ServeError as e:
        return error(args.prog, str(e), 1)
    except KeyboardInterrupt:  # start() has stopped the server
        return 130
    try:
        if args.smoke:
            print(f"serving {what} at {server.url}; asking: {args.prompt!r}", file=sys.stderr)
            try:
                reply = server.smoke(args.prompt, max_tokens=args.max_tokens)
            except ServeError as e:
                return error(args.prog, str(e), 1)
            print(reply)
            return 0
        if _in_main_thread():
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on `kill` too
        print(f"serving {what}\n  {server.url}/v1/chat/completions (OpenAI API, model \"{server.model_id}\")\n"
              f"  log: {server.log_path}\nCtrl-C stops it", file=sys.stderr, flush=True)
        try:
            with open(server.log_path, "rb") as log:  # the server's own log lines, as they come
                while server.running():
                    sys.stderr.buffer.write(log.read())
                    sys.stderr.flush()
                    time.sleep(0.5)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
            return 0
        return error(args.prog, f"the server exited with code {server.proc.returncode}:\n{server.log_tail()}", 1)
    finally:
        server.stop()


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["tiny", "200mb", "tiny-moe", "200mb-moe", "custom"], default="tiny")
    p.add_argument("--model-dir", help="a local Hugging Face / mlx-lm model dir instead of a preset")
    p.add_argument("--vocab-size", type=int, default=6400)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    for shape in ("hidden-size", "num-layers", "num-heads", "num-kv-heads", "head-dim", "intermediate-size"):
        p.add_argument(f"--{shape}", type=int, help="custom shape (with --preset custom, or to override a preset)")


def library_commands(sub) -> None:
    """Add the library's commands to an argparse subparsers object (`mlxcore` and `mlxflow` share them)."""
    doc = sub.add_parser("doctor", help="device, backend, BLAS and a measured sgemm rate")
    doc.set_defaults(func=cmd_doctor)
    gen = sub.add_parser("generate", help="chat with a checkpoint")
    gen.add_argument("--checkpoint", required=True)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.set_defaults(func=cmd_generate)

    sp = sub.add_parser("speed", help="synthetic-data training benchmark: step ms, tok/s, memory, MFU, decode")
    _add_model_args(sp)
    sp.add_argument("--batch-size", type=_csv_ints, default=[8], help="one size, or a comma list to sweep (OOM is a status)")
    sp.add_argument("--seq-len", type=int, default=256)
    sp.add_argument("--steps", type=int, default=5)
    sp.add_argument("--warmup", type=int, default=2)
    sp.add_argument("--fine-tune-type", choices=["full", "lora", "dora"], default="full")
    sp.add_argument("--lora-rank", type=int, default=8)
    sp.add_argument("--quantize-bits", type=int, choices=[4, 8], help="QLoRA: quantize the frozen base")
    sp.add_argument("--group-size", type=int, default=64)
    sp.add_argument("--grad-checkpoint", type=int, default=0, metavar="N", help="checkpoint segments of N layers")
    sp.add_argument("--loss-chunk", type=int, default=0, metavar="TOKENS")
    sp.add_argument("--sparse-loss", action="store_true")
    sp.add_argument("--mask-density", type=float, default=1.0, help="fraction of positions with loss (SFT-like)")
    sp.add_argument("--optimizer", choices=["adamw", "adafactor", "lion", "muon"], default="adamw")
    sp.add_argument("--fused-optimizer", choices=["auto", "on", "off"], default="auto",
                    help="clip + optimizer over concatenated buffers (mlxcore.train.fused)")
    sp.add_argument("--no-compile", dest="compile", action="store_false")
    sp.add_argument("--profile-timing", action="store_true", help="per-phase ms (data, fwd+bwd, clip, optimizer)")
    sp.add_argument("--decode-tokens", type=int, default=0, help="also time greedy decoding of N tokens after --prefill")
    sp.add_argument("--prefill", type=int, default=1024)
    sp.add_argument("--max-memory-gb", type=float, help="cap each sweep point's memory (reported as OOM when hit)")
    sp.add_argument("--json", help="write the rows here")
    sp.set_defaults(func=cmd_speed)

    st = sub.add_parser("stats", help="parameters, FLOPs per token, device peak FLOP/s, MFU")
    _add_model_args(st)
    st.add_argument("--seq-len", type=int, default=1024)
    st.add_argument("--tok-per-s", type=float, help="training throughput to turn into MFU")
    st.add_argument("--adapters", action="store_true", help="FLOPs of adapter training (frozen base)")
    st.add_argument("--peak-tflops", type=float, help="use this peak instead of measuring it")
    st.set_defaults(func=cmd_stats)

    fu = sub.add_parser("fuse", help="merge a LoRA/DoRA/QLoRA adapter dir into a plain checkpoint")
    fu.add_argument("--adapter", required=True, help="an adapter checkpoint (e.g. runs/x/sft-*/model)")
    fu.add_argument("--out", required=True)
    fu.set_defaults(func=cmd_fuse)

    ex = sub.add_parser("export", help="GGUF (+ Ollama Modelfile) and quantized MLX, gated on llama.cpp parity")
    ex.add_argument("--model", required=True, help="a checkpoint, adapter dir or local HF model dir")
    ex.add_argument("--out", required=True, help="where the exports go (one subdir each)")
    ex.add_argument("--format", action="append", choices=["f16", "q8_0", "q4_0", "mlx-4bit", "mlx-8bit"],
                    help="repeat for more (default q8_0)")
    ex.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128], help="MLX quantization group size")
    ex.add_argument("--no-modelfile", action="store_true", help="no Ollama Modelfile beside the GGUF")
    ex.add_argument("--no-gate", action="store_true", help="skip the llama.cpp parity gate")
    ex.add_argument("--examples", type=int, default=40, help="gate: bench questions per suite")
    ex.add_argument("--text", action="append", default=[], help="gate: a text file or dir both tokenizers must agree on")
    ex.set_defaults(func=cmd_export)

    dl = sub.add_parser("download", help="fetch a data spec (minimind:, gsm8k:, hf:owner/name[@rev]/path, "
                        "hfds:owner/name[:config][@rev]:split, catalog:NAME, local glob)")
    dl.add_argument("spec")
    dl.add_argument("--kind", choices=["pretrain", "sft"], help="what the data is for (minimind:auto needs it)")
    dl.add_argument("--out", required=True, help="a new dir: the file (hub) or a manifest naming the files (local)")
    dl.add_argument("--max-download-mb", type=float, default=2048)
    dl.set_defaults(func=cmd_download)

    pt = sub.add_parser("pretokenize", help="tokenize data specs into training shards (what the pipeline's stage does)")
    pt.add_argument("specs", nargs="+", help="training data specs")
    pt.add_argument("--val", action="append", default=[], metavar="SPEC", help="held-out data (default: 1%% of train)")
    pt.add_argument("--kind", choices=["pretrain", "sft"], required=True)
    pt.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer dir")
    pt.add_argument("--out", required=True, help="a new dir for the shards")
    pt.add_argument("--format", default="auto", choices=["auto", "text", "conversations", "instruction", "alpaca", "gsm8k", "ids"])
    pt.add_argument("--prompt-format")
    pt.add_argument("--response-format")
    pt.add_argument("--system-prompt")
    pt.add_argument("--max-tokens", type=int, help="per-document token limit")
    pt.add_argument("--overlong", choices=["truncate", "drop"], default="truncate")
    pt.add_argument("--val-fraction", type=float, default=0.01)
    pt.add_argument("--workers", type=int, default=0, help="processes; 0: every core (one for small inputs)")
    pt.add_argument("--max-download-mb", type=float, default=2048)
    pt.set_defaults(func=cmd_pretokenize)
    da = sub.add_parser("data", help="the data catalog: datasets with their licenses, and recommended mixes")
    dsub = da.add_subparsers(dest="data_command", required=True)
    dli = dsub.add_parser("list", help="every catalog dataset: name, kind, size, license, description")
    dli.add_argument("--kind", choices=["pretrain", "sft", "preference", "rl", "eval", "vlm"])
    dli.set_defaults(func=cmd_data_list)
    dsh = dsub.add_parser("show", help="everything about one dataset (or a mix: its entries, weights and why)")
    dsh.add_argument("name", help="a catalog dataset (catalog:NAME) or mix (recommended-10B)")
    dsh.set_defaults(func=cmd_data_show)
    cl = sub.add_parser("clean", help="list temp files left by killed writers and remove the stale ones")
    cl.add_argument("run_dirs", nargs="*", default=["runs"], metavar="RUN_DIR", help="default: runs")
    cl.add_argument("--dry-run", action="store_true", help="only list (stale / writing / unknown: another host)")
    cl.set_defaults(func=cmd_clean)

    cmp = sub.add_parser("compare", help="runs side by side: loss curves, bench deltas with paired bootstrap "
                         "intervals, config differences")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run dirs (their latest run) or run records "
                     "(RUN_DIR/records/*.json); the first is the baseline")
    cmp.add_argument("--out", help="where compare.md / compare.json / loss-curves.png go (default: compare/ beside "
                     "the first run dir)")
    cmp.add_argument("--confidence", type=float, default=0.95, help="of the bootstrap intervals")
    cmp.add_argument("--resamples", type=int, default=10_000)
    cmp.add_argument("--seed", type=int, default=0)
    cmp.set_defaults(func=cmd_compare)

    sv = sub.add_parser("serve-model", help="serve a checkpoint with mlx_lm.server (OpenAI API) on loopback")
    sv.add_argument("--model", required=True, help="a model dir, or an adapter dir (served on its base_model)")
    sv.add_argument("--adapter", help="an adapter dir to serve on --model (mlx_lm's --adapter-path)")
    sv.add_argument("--fuse", action="store_true", help="fuse the adapters into a temp model dir first "
                    "(QLoRA adapters always are)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=0, help="0: a free port")
    sv.add_argument("--wait-s", type=float, default=180.0, help="how long the server may take to answer")
    sv.add_argument("--smoke", action="store_true", help="send one chat completion, print the reply, stop")
    sv.add_argument("--prompt", default="Hello! Who are you?", help="the --smoke prompt")
    sv.add_argument("--max-tokens", type=int, default=32, help="the --smoke reply's limit")
    sv.set_defaults(func=cmd_serve_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxcore", description="The MLX training library's commands (no Prefect)")
    parser.set_defaults(prog="mlxcore")
    library_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
