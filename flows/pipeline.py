"""The whole DAG: data -> tokenizer -> pretokenize -> pretrain -> sft [-> preference] -> eval -> sample
-> export (GGUF q8_0 + Modelfile, parity gate) -> bench."""

from __future__ import annotations

from prefect import flow, get_run_logger

from mlxcore.config import BenchTarget, PipelineConfig, with_overrides
from mlxcore.data.tokenizer import planned_size
from tasks.bench import run_bench
from tasks.data import prepare_data, pretokenize, sources, tokenizer
from flows.export import ship
from flows.preference import align
from tasks.evaluate import evaluate, sample
from tasks.report import reported
from tasks.record import record_run
from tasks.train import model_card, pretrain, publish, sft


def _files(inputs) -> list[str]:
    """The paths in a stage's inputs (a dir, a list, or {split: [...]})."""
    if isinstance(inputs, dict):
        return [p for v in inputs.values() for p in _files(v)]
    if isinstance(inputs, (list, tuple)):
        return [p for v in inputs for p in _files(v)]
    return [str(inputs)] if inputs else []


@flow(name="pipeline")
@reported
def pipeline(config: PipelineConfig = PipelineConfig(), overrides: list[str] = []) -> dict:
    """`overrides`: KEY=VALUE settings on top of `config`, e.g. ["sft.lr=1e-4", "model.preset=200mb"]."""
    config = with_overrides(config, overrides)
    run, data = str(config.run_dir), config.data
    size, exact = planned_size(config.tokenizer)
    config.model.check_vocab(size, exact, config.tokenizer.path or "the BPE to train")  # before any stage dir
    raw = prepare_data(data.synthetic, run) if data.uses_synthetic else None
    text_in, text_fmt = sources(data, "pretrain", run, raw)
    chat_in, chat_fmt = sources(data, "sft", run, raw)
    tok = tokenizer(config.tokenizer, text_in, chat_in, text_fmt, chat_fmt, run)
    config.model.check_vocab(tok["vocab_size"], tokenizer=tok["path"])
    text = pretokenize(text_in, tok["path"], "pretrain", text_fmt, config.pretokenize_limit("pretrain"), data.workers, run)
    chats = pretokenize(chat_in, tok["path"], "sft", chat_fmt, config.pretokenize_limit("sft"), data.workers, run)
    base = pretrain(text["path"], tok["path"], config.model, config.pretrain, run)
    chat = sft(chats["path"], tok["path"], base["checkpoint"], config.sft, run)
    evals = {
        "pretrain": evaluate(base["checkpoint"], text["path"], config.pretrain.batch_size, config.pretrain.seq_len, run),
        "sft": evaluate(chat["checkpoint"], chats["path"], config.sft.batch_size, config.sft.seq_len, run),
    }
    final, aligned, own = chat["checkpoint"], None, []
    if config.preference is not None:  # preference training on the SFT model; the bench shows both
        aligned = align(config.preference, chat["checkpoint"], tok["path"], run, data.max_download_mb)
        final = aligned["checkpoint"]
        own.append(BenchTarget(kind="checkpoint", path=chat["checkpoint"], name=f"{config.name}-sft"))
    samples = sample(final, chats["path"], config.sample, run)
    model = publish(final, run)
    shipped = None
    if config.export is not None and config.model.arch == "retention":  # GGUF / llama.cpp has no such model
        get_run_logger().warning("export skipped: GGUF / llama.cpp has no Power Retention (model.arch=retention)")
    elif config.export is not None:  # the gate also tokenizes the text the model was trained on
        shipped = ship(config.export, final, run, config.name, text=_files(text_in) + _files(chat_in))
        own += shipped.pop("targets")
    bench = None
    if config.bench is not None:  # our model (and its exports) vs the targets (default: the uniform-random baseline)
        ours = BenchTarget(kind="checkpoint", path=final, name=config.name)
        bench = run_bench([ours, *own], config.bench, run, title=f"bench {config.name}")
    model_card(final, {"eval": evals, "bench": bench, "sample exact match": samples["exact_match"]}, run)
    train = {"pretrain": base, "sft": chat} | ({"preference": aligned["train"]} if aligned else {})
    record_run("pipeline", config, {stage: t.get("checkpoint") for stage, t in train.items()}, final, bench, config.name)
    return {"checkpoint": final, "model": model, "train": train, "eval": evals, "samples": samples, "bench": bench,
            "preference": aligned, "export": shipped, "data": {"pretrain": text, "sft": chats}}
