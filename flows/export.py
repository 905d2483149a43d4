"""Ship a model: GGUF (+ Modelfile) and quantized MLX exports -> parity gate in llama.cpp -> hub upload.

`ship()` is the stage sequence the `export` flow runs and that `pipeline`, `finetune`, `distill`,
`preference` and `rl` end with (their `export:` section). The gate's answers are ordinary
bench answers (`bench-<label>` stages), so the flow's final bench reuses them and shows the
checkpoint beside its exports.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from mlxcore.config import BenchConfig, BenchTarget, ConfigError, ExportConfig, ExportRunConfig, with_overrides
from mlxcore.models.layout import is_model_dir
from tasks.bench import bench_answers, bench_report
from tasks.export import export_gguf, export_mlx, parity_gate, push_exports


def gate_bench(export: ExportConfig) -> BenchConfig:
    """The bench questions the gate asks (a flow whose bench asks the same ones reuses the answers)."""
    g = export.gate
    return BenchConfig(suites=g.suites, examples=g.examples, max_tokens=g.max_tokens, seed=g.seed, targets=[])


def ship(export: ExportConfig, model_dir: str, run: str, label: str, text: list[str] = ()) -> dict:
    """Export `model_dir` as `export` says; `text`: files the gate also tokenizes (e.g. the training data)."""
    ggufs = {q: export_gguf(model_dir, q, export.ollama, run) for q in export.gguf}
    mlx = {b: export_mlx(model_dir, b, export.mlx_group_size, run) for b in export.mlx_bits}
    gguf_targets = {q: BenchTarget(kind="gguf", path=g["gguf"], name=f"{label}-{q}") for q, g in ggufs.items()}
    targets = [*gguf_targets.values()]
    targets += [BenchTarget(kind="mlx-quantized", path=m["model"], bits=b, group_size=export.mlx_group_size,
                            name=f"{label}-mlx{b}") for b, m in mlx.items()]
    gates = {}
    if export.gate is not None and ggufs:
        questions = gate_bench(export)
        ours = bench_answers(label, BenchTarget(kind="checkpoint", path=model_dir, name=label), questions, run)
        for q, g in ggufs.items():
            theirs = bench_answers(f"{label}-{q}", gguf_targets[q], questions, run)
            gates[q] = parity_gate(model_dir, g["path"], g["gguf"], q, export.gate, ours["path"], theirs["path"],
                                   list(text), run)
    pushed = None
    if export.push is not None:
        # the first GGUF format's folder at the top (its file, Modelfile, card); the other formats' .gguf
        # files beside it (one Modelfile and card per repo: they would overwrite each other); each MLX
        # export in its own folder
        uploads = [(g["path"], "", [] if i == 0 else ["*.gguf"]) for i, g in enumerate(ggufs.values())]
        uploads += [(m["model"], f"mlx-{b}bit", []) for b, m in mlx.items()]
        pushed = push_exports(uploads, export.push, run)
    return {"gguf": ggufs, "mlx": mlx, "gates": gates, "pushed": pushed, "targets": targets}


@flow(name="export")
def export(config: ExportRunConfig, overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["formats=[f16,q4_0]", "gate.examples=20"]."""
    config = with_overrides(config, overrides)
    if not is_model_dir(config.model):
        raise ConfigError(f"model: {config.model!r} is not a local model dir (no config.json or adapter_config.json); "
                          "set model=/path/to/model (e.g. runs/demo/model after `mlxflow run pipeline`)")
    run = str(config.run_dir)
    model = str(Path(config.model).resolve())
    label = config.name
    shipped = ship(config, model, run, label)
    bench = None
    if config.gate is not None and shipped["targets"]:  # the checkpoint beside every export, on the gate's questions
        questions = gate_bench(config)
        targets = [BenchTarget(kind="checkpoint", path=model, name=label), *shipped["targets"]]
        answers = [bench_answers(t.label, t, questions, run)["path"] for t in targets]
        bench = bench_report(answers, [t.label for t in targets], run, title=f"export {label}: checkpoint vs exports")
    return shipped | {"bench": bench}
