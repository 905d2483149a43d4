"""Every export of one model into one directory, gated, without Prefect (`mlxcore export`).

The flows run the same pieces as cached stages (tasks/export.py); this is the library path:

  <out>/<name>-<qtype>/<name>-<qtype>.gguf   + Modelfile (Ollama), per GGUF format
  <out>/<name>-mlx-<bits>bit/                quantized MLX (mlx_lm.load reads it)
  <out>/parity-<qtype>.json / .md            the gate's verdict per GGUF
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from mlxcore.bench.run import answer
from mlxcore.bench.suites import make
from mlxcore.config import GGUF_TYPES, BenchTarget, ParityGateConfig
from mlxcore.export import gguf, mlx_quant, ollama, parity
from mlxcore.io import write_json


def model_name(model_dir: str | Path) -> str:
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" else path.name


def export_all(model_dir: str | Path, out_dir: str | Path, formats: Sequence[str], *, modelfile: bool = True,
               group_size: int = 64, gate: ParityGateConfig | None = ParityGateConfig(), text: Sequence[str] = (),
               log: Callable[[str], None] = print) -> dict:
    """Export `model_dir` in `formats` under `out_dir`, then gate each GGUF; `passed` is False when a gate fails."""
    out, name = Path(out_dir), model_name(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"gguf": {}, "mlx": {}, "gates": {}, "passed": True}
    for fmt in formats:
        if fmt in GGUF_TYPES:
            folder = out / f"{name}-{fmt}"
            folder.mkdir(exist_ok=True)
            info = gguf.export_gguf(model_dir, folder / f"{name}-{fmt}.gguf", fmt, name=name)
            if modelfile:
                ollama.write_bundle(folder / f"{name}-{fmt}.gguf", model_dir, folder)
            result["gguf"][fmt] = info
            log(f"gguf {fmt}: {info['path']} ({info['bytes'] / 1e6:.1f} MB, {info['seconds']:.1f} s)")
        elif fmt.startswith("mlx-"):
            bits = int(fmt.split("-")[1][0])
            info = mlx_quant.export_mlx_quantized(model_dir, out / f"{name}-{fmt}", bits=bits, group_size=group_size,
                                                  overwrite=True)  # as each GGUF is: a re-export replaces it
            result["mlx"][bits] = info
            log(f"mlx {bits}-bit: {out / f'{name}-{fmt}'}")
        else:
            raise ValueError(f"format {fmt!r}: one of {', '.join(GGUF_TYPES)}, mlx-4bit, mlx-8bit")
    if gate is not None and result["gguf"]:
        examples = make(gate.suites, gate.examples, gate.seed)
        ours = answer(BenchTarget(kind="checkpoint", path=str(model_dir)), examples, gate.max_tokens)
        for fmt, info in result["gguf"].items():
            theirs = answer(BenchTarget(kind="gguf", path=str(info["path"])), examples, gate.max_tokens)
            verdict = parity.gate(model_dir, info["path"], fmt, gate, ours, theirs, text)
            write_json(out / f"parity-{fmt}.json", verdict)
            (out / f"parity-{fmt}.md").write_text(parity.markdown(verdict, f"parity {name} {fmt}"))
            result["gates"][fmt] = verdict
            result["passed"] &= verdict["passed"]
            log(f"gate {fmt}: {'passed' if verdict['passed'] else 'FAILED: ' + '; '.join(verdict['reasons'])} "
                f"({verdict['identical']:.0%} answers identical)")
    return result
