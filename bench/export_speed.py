"""Export speed and size per format, and how fast each export decodes in its consumer, in one run.

    python bench/export_speed.py --model runs/demo/model        # the demo's model
    python bench/export_speed.py --preset 200mb                 # a preset with random weights (MiniMind's
                                                                #   tokenizer from $MLXFLOW_TEST_DATA)

For each format (GGUF f16 / q8_0 / q4_0 through mlxcore.export.gguf, MLX 4 / 8-bit through
mlx_quant): export seconds, bytes, and greedy decode tok/s of the same prompt for 64 tokens
(GGUF in llama.cpp via llama-cpp-python, MLX in mlx-lm), beside the float checkpoint in mlx-lm.
The ratio column is each export's decode tok/s ÷ the checkpoint's in mlx-lm, same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = "Sort these numbers in ascending order: 5 3 9 1 7 2 8 4"


def build(preset: str, out: Path, tokenizer_dir: Path) -> Path:
    from mlxcore.config import ModelConfig
    from mlxcore.data import tokenizer as tokenizers
    from mlxcore.models.checkpoint import save_model_dir
    from mlxcore.models.model import from_config, hf_config

    tok = tokenizers.load(tokenizer_dir)
    config = hf_config(ModelConfig(preset=preset), len(tok), tokenizers.special_ids(tok))
    save_model_dir(out, from_config(config), config, tokenizer_dir=tokenizer_dir)
    return out


def mlx_decode(model_dir: Path, max_tokens: int) -> float:
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(str(model_dir))
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    last = None
    for last in stream_generate(model, tok, ids, max_tokens=max_tokens, sampler=make_sampler(temp=0.0)):
        pass
    return last.generation_tps


def gguf_decode(path: Path, max_tokens: int) -> float:
    from mlxcore.export.parity import _open

    llm = _open(path)
    try:
        tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
        llm.eval(tokens)
        start, n = time.perf_counter(), 0
        for _ in range(max_tokens):  # greedy, not stopping at end of turn, so every format decodes the same count
            token = llm.sample(top_k=1, temp=0.0)
            llm.eval([token])
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        llm.close()


def main(argv=None) -> list[dict]:
    import mlxcore  # noqa: F401  (fast BLAS first)
    from mlxcore.export.gguf import export_gguf
    from mlxcore.export.mlx_quant import export_mlx_quantized

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a local model dir (default: --preset with random weights)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", type=Path, help="for --preset (default: MiniMind's from $MLXFLOW_TEST_DATA)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="export-speed-"))
    model = args.model
    if model is None:
        tok = args.tokenizer or Path(os.environ.get("MLXFLOW_TEST_DATA", "")) / "minimind_tokenizer"
        model = build(args.preset, work / "model", tok)
    base = mlx_decode(model, args.max_tokens)
    rows = [{"format": "checkpoint (mlx-lm)", "seconds": 0.0, "mb": sum(f.stat().st_size for f in model.glob("model*.safetensors")) / 1e6,
             "tok_per_s": base}]
    for q in ("f16", "q8_0", "q4_0"):
        info = export_gguf(model, work / f"m-{q}.gguf", q)
        rows.append({"format": f"gguf {q} (llama.cpp)", "seconds": info["seconds"], "mb": info["bytes"] / 1e6,
                     "tok_per_s": gguf_decode(work / f"m-{q}.gguf", args.max_tokens)})
    for bits in (8, 4):
        start = time.perf_counter()
        export_mlx_quantized(model, work / f"mlx-{bits}", bits=bits)
        seconds = time.perf_counter() - start
        mb = sum(f.stat().st_size for f in (work / f"mlx-{bits}").glob("*.safetensors")) / 1e6
        rows.append({"format": f"mlx {bits}-bit (mlx-lm)", "seconds": seconds, "mb": mb,
                     "tok_per_s": mlx_decode(work / f"mlx-{bits}", args.max_tokens)})
    print(f"{'format':<22} {'export s':>9} {'MB':>8} {'decode tok/s':>13} {'÷ checkpoint':>13}")
    for r in rows:
        r["ratio"] = r["tok_per_s"] / base
        print(f"{r['format']:<22} {r['seconds']:>9.2f} {r['mb']:>8.1f} {r['tok_per_s']:>13.0f} {r['ratio']:>12.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
