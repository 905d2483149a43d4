"""Data stages: synthetic raw data or downloads, filters, tokenizer, pretokenized shards, mixtures."""

from __future__ import annotations

import time
from pathlib import Path

from prefect.artifacts import create_table_artifact

from mlxcore.config import DataConfig, FilterConfig, SourceConfig, SyntheticConfig, TokenizerConfig
from mlxcore.data import download as downloads
from mlxcore.data import filters, mixture
from mlxcore.data.inputs import check_columns, is_mixture, row_options, source_parts
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
    if not isinstance(spec, downloads.LocalFiles):
        return None  # hub files, hfds: splits, catalog: entries are keyed by spec: pin a commit with @revision
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
FILTER = Stage("filter", inputs=("inputs",))
MIX = Stage("mix", inputs=("data_dirs",))


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
    """Fetch a hub file or dataset split (size-guarded, retried; its license recorded), or pin local files."""
    out = DOWNLOAD.dir(locals())
    if not DOWNLOAD.done(out):
        downloads.fetch(spec, out, kind, max_download_mb)
    manifest = read_manifest(out)
    return {"path": str(out), "digest": manifest["digest"], "source": manifest["source"],
            "license": manifest.get("license", "unknown")}


def sources(data: DataConfig, kind: str, run_dir: str, raw: dict | None) -> tuple:
    """(inputs, format options) of one kind: download tasks for its specs (a mixture's: per source,
    each source's column mapping checked on local files before any download), then the filter stage
    when `data.filters` turns one on; or the synthetic raw dir."""
    source: SourceConfig | None = getattr(data, kind)
    if source is None:
        return raw["path"], {}
    opts = source.options()
    if source.sources:
        opts["sources"] = source.mixture()
        for i, s in enumerate(source.sources):
            check_columns(s.spec, kind, s.columns, f"data.{kind}.sources.{i}.columns")
        inputs = {"sources": [{"train": [download(s.spec, kind, data.max_download_mb, run_dir)["path"]], "val": []}
                              for s in source.sources]}
    else:
        inputs = {s: [download(spec, kind, data.max_download_mb, run_dir)["path"] for spec in getattr(source, s)]
                  for s in ("train", "val")}
    if data.filters.active:
        inputs = filter_rows(inputs, kind, row_options(opts), data.filters, run_dir)["inputs"]
    return inputs, opts


@FILTER.task(task_run_name="filter-{kind}")
def filter_rows(inputs, kind: str, source: dict, config: FilterConfig, run_dir: str) -> dict:
    """Drop rows by length, control characters, charset, exact and near duplicates, counted per source."""
    out = FILTER.dir(locals())
    if not FILTER.done(out):
        filters.filter_sources(source_parts(inputs, source), kind, config.model_dump(), out)
        _filter_report(read_manifest(out), kind, Path(run_dir).name)
    return _output(out) | {"inputs": filters.filtered_inputs(out, inputs), "counts": read_manifest(out)["counts"]}


def tokenizer(config: TokenizerConfig, pretrain_inputs, sft_inputs, pretrain_source: dict, sft_source: dict,
              run_dir: str) -> dict:
    """The tokenizer stage, keyed without the mixtures' weights (a new weight trains no new tokenizer)."""
    return train_tokenizer(config, pretrain_inputs, sft_inputs, row_options(pretrain_source), row_options(sft_source),
                           run_dir)


@TOKENIZER.task()
def train_tokenizer(config: TokenizerConfig, pretrain_inputs, sft_inputs, pretrain_source: dict, sft_source: dict,
                    run_dir: str) -> dict:
    """Copy a local HF tokenizer, or train a byte-level BPE on the training text of both kinds."""
    out = TOKENIZER.dir(locals())
    if not TOKENIZER.done(out):
        corpus = [{"kind": "pretrain", "inputs": pretrain_inputs, "source": pretrain_source},
                  {"kind": "sft", "inputs": sft_inputs, "source": sft_source}]
        tokenizers.load_or_train(config, [c for c in corpus if c["inputs"] is not None], out)
    return _output(out) | {"vocab_size": read_manifest(out)["vocab_size"]}


def pretokenize(inputs, tokenizer_dir: str, kind: str, source: dict, max_tokens: int | None, workers: int,
                run_dir: str) -> dict:
    """One kind's rows as shards: the pretokenize stage, or for a mixture one per source (each cached on
    its own: a new weight re-tokenizes nothing) and the mix stage; with the filter stage's counts."""
    if not is_mixture(inputs):
        out = pretokenize_source(inputs, tokenizer_dir, kind, source, max_tokens, workers, run_dir)
    else:
        parts = source_parts(inputs, source)
        dirs = [pretokenize_source.with_options(task_run_name=f"pretokenize-{kind}-{p['name']}")(
                    p["inputs"], tokenizer_dir, kind, p["opts"], max_tokens, workers, run_dir)["path"] for p in parts]
        out = mix(dirs, [{k: p[k] for k in ("name", "spec", "weight", "epochs")} for p in parts], kind, run_dir)
    if isinstance(inputs, dict) and inputs.get("filtered"):
        out = out | {"filters": read_manifest(inputs["filtered"])["counts"]}
    return out


@PRETOKENIZE.task(task_run_name="pretokenize-{kind}")
def pretokenize_source(inputs, tokenizer_dir: str, kind: str, source: dict, max_tokens: int | None, workers: int,
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


@MIX.task(task_run_name="mix-{kind}")
def mix(data_dirs: list[str], sources: list[dict], kind: str, run_dir: str) -> dict:
    """A weighted mixture of pretokenized sources, drawn in the weights' exact shares by the training loader."""
    out = MIX.dir(locals())
    if not MIX.done(out):
        mixture.write_mixture([s | {"data_dir": d} for s, d in zip(sources, data_dirs)], out)
        _mix_report(read_manifest(out), kind, Path(run_dir).name)
    manifest = read_manifest(out)
    per_source = [{"name": s["name"], "spec": s["spec"], "weight": s["weight"], "share": s["share"],
                   "epochs": s["epochs"], "train_docs": s["train"]["num_docs"], "train_tokens": s["train"]["num_tokens"],
                   "val_docs": s["val"]["num_docs"], "val_tokens": s["val"]["num_tokens"]}
                  for s in manifest["mixture"]["sources"]]
    tokens = {k: v["num_tokens"] for k, v in manifest["splits"].items()}
    return _output(out) | {"tokens": tokens, "stats": manifest["stats"], "mixture": per_source}


def _mix_report(manifest: dict, kind: str, run_name: str) -> None:
    sources = manifest["mixture"]["sources"]
    total = sum(s["train"]["num_tokens"] for s in sources) or 1
    rows = [{"source": s["name"], "spec": s["spec"], "weight": s["weight"], "share of draws": f"{s['share']:.1%}",
             "epochs": "no limit" if s["epochs"] is None else s["epochs"], "documents": s["train"]["num_docs"],
             "tokens": s["train"]["num_tokens"], "share of tokens held": f"{s['train']['num_tokens'] / total:.1%}",
             "held-out documents": s["val"]["num_docs"]} for s in sources]
    create_table_artifact(
        table=rows, key=artifact_key(run_name, "mix", kind),
        description=(f"mixture {kind}: {len(sources)} sources; training draws sequences in the shares of the "
                     "weights (to one sequence per source at every step); tokens as pretokenized per source"))


def _filter_report(manifest: dict, kind: str, run_name: str) -> None:
    total = manifest["total"]
    create_table_artifact(
        table=[*manifest["counts"], total], key=artifact_key(run_name, "filter", kind),
        description=(f"filter {kind}: {total['rows_in']} rows in, {total['rows_out']} out; dropped by the first filter "
                     "that refused them (length, control, charset, exact_dup, near_dup); dropped.jsonl in the stage "
                     "dir lists each dropped row"))
