"""Data stages: synthetic raw data or downloads, tokenizer, pretokenized shards."""

from __future__ import annotations

import time
from pathlib import Path

from prefect.artifacts import create_table_artifact

from mlxcore.config import DataConfig, SourceConfig, SyntheticConfig, TokenizerConfig
from mlxcore.data import download as downloads
from mlxcore.data import pretokenize as pretok
from mlxcore.data import synthetic, tokenizer as tokenizers
from mlxcore.io import dir_digest, path_digest, read_manifest
from tasks.caching import Stage
from tasks.progress import StageProgress, artifact_key


def _local_content(params: dict) -> list | None:
    """A local spec is keyed by the content of the files it matches, not by its pattern."""
    try:
        spec = downloads.parse_spec(params["spec"], params["kind"])
    except downloads.DownloadError:
        return None  # the task itself fails with the reason
    if isinstance(spec, downloads.HubFile):
        return None  # keyed by spec: pin a commit with @revision for a fixed snapshot
    try:
        return [(p.name, path_digest(p)) for p in downloads.match_local(params["spec"], spec.pattern)]
    except downloads.DownloadError:
        return None


def _tokenizer_source(params: dict) -> str | None:
    """A tokenizer copied from a local dir is keyed by that dir's content, not by its path."""
    path = params["config"].path
    if path and Path(path).is_dir():
        return dir_digest(path, tokenizers.TOKENIZER_FILES)
    return path  # missing: the task itself fails with the reason


DATA = Stage("data")
DOWNLOAD = Stage("download", extra=_local_content)
TOKENIZER = Stage("tokenizer", inputs=("pretrain_inputs", "sft_inputs"), extra=_tokenizer_source)
PRETOKENIZE = Stage("pretokenize", inputs=("inputs", "tokenizer_dir"))


def _output(out) -> dict:
    manifest = read_manifest(out)
    return {"path": str(out), "digest": manifest["digest"]}


@DATA.task()
def prepare_data(synthetic_config: SyntheticConfig, run_dir: str) -> dict:
    """Generate the synthetic raw dataset (tasks as pretraining text and SFT conversations)."""
    out = DATA.dir(locals())
    if not DATA.done(out):
        synthetic.write_dataset(synthetic_config, out)
    return _output(out)


@DOWNLOAD.task(task_run_name="download-{kind}-{spec}")  # fetch() retries transient errors itself
def download(spec: str, kind: str, max_download_mb: float, run_dir: str) -> dict:
    """Fetch a hub dataset file into the HF cache (size-guarded, retried), or pin local files."""
    out = DOWNLOAD.dir(locals())
    if not DOWNLOAD.done(out):
        downloads.fetch(spec, out, kind, max_download_mb)
    manifest = read_manifest(out)
    return {"path": str(out), "digest": manifest["digest"], "source": manifest["source"]}


def sources(data: DataConfig, kind: str, run_dir: str, raw: dict | None) -> tuple:
    """(inputs, format options) of one kind: download tasks for its specs, or the synthetic raw dir."""
    source: SourceConfig | None = getattr(data, kind)
    if source is None:
        return raw["path"], {}
    split = {s: [download(spec, kind, data.max_download_mb, run_dir)["path"] for spec in getattr(source, s)]
             for s in ("train", "val")}
    return split, source.options()


@TOKENIZER.task()
def tokenizer(config: TokenizerConfig, pretrain_inputs, sft_inputs, pretrain_source: dict, sft_source: dict,
              run_dir: str) -> dict:
    """Copy a local HF tokenizer, or train a byte-level BPE on the training text of both kinds."""
    out = TOKENIZER.dir(locals())
    if not TOKENIZER.done(out):
        corpus = [{"kind": "pretrain", "inputs": pretrain_inputs, "source": pretrain_source},
                  {"kind": "sft", "inputs": sft_inputs, "source": sft_source}]
        tokenizers.load_or_train(config, [c for c in corpus if c["inputs"] is not None], out)
    return _output(out) | {"vocab_size": read_manifest(out)["vocab_size"]}


@PRETOKENIZE.task(task_run_name="pretokenize-{kind}")
def pretokenize(inputs, tokenizer_dir: str, kind: str, source: dict, max_tokens: int | None, workers: int,
                run_dir: str) -> dict:
    """Tokenize one kind's rows on all cores into memmap shards (+ SFT loss masks)."""
    out = PRETOKENIZE.dir(locals())
    if not PRETOKENIZE.done(out):
        progress = StageProgress(f"pretokenize {kind}")
        started = time.monotonic()
        pretok.pretokenize(inputs, tokenizer_dir, kind, out, source=source, max_tokens=max_tokens,
                           workers=workers, on_progress=progress)
        _report(read_manifest(out), kind, Path(run_dir).name, time.monotonic() - started)
    manifest = read_manifest(out)
    tokens = {k: v["num_tokens"] for k, v in manifest["splits"].items()}
    return _output(out) | {"tokens": tokens, "stats": manifest["stats"]}


def _report(manifest: dict, kind: str, run_name: str, seconds: float) -> None:
    s, splits = manifest["stats"], manifest["splits"]
    total = sum(v["num_tokens"] for v in splits.values())
    rows = [{"split": name, "documents": v["num_docs"], "tokens": v["num_tokens"], "trainable": v["num_trainable"],
             "shards": len(v["shards"])} for name, v in splits.items()]
    create_table_artifact(
        table=rows, key=artifact_key(run_name, "pretokenize", kind),
        description=(f"pretokenize {kind}: {s['rows']} rows read, {s['truncated']} truncated, "
                     f"{s['dropped_overlong']} dropped as over-long, {s['dropped_no_labels']} dropped with no "
                     f"assistant tokens; formats {manifest['formats']}; {total / max(seconds, 1e-9):,.0f} tok/s"))
