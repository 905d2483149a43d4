"""Vision-language stages: synthetic image-text data or hub downloads, image preprocessing, training,
`vlm-eval`, bench.

Content-keyed like every stage: a download (`vlm-download`, an `hfds:` / `catalog:` spec) is keyed
on its spec and column mapping like a text download (pin a commit with `@revision`); preprocessing
is keyed on the JSONL files *and* the folders they sit in (their images; a download dir by its
manifest, which records the commit the split resolved to and the digest of its rows and images),
training on the preprocessed dir's digest (+ the start model's), evaluation on the checkpoint's
and the data's, the bench report on the evaluation's. The trainer runs in a child process
(`mlxcore.train.launch`, job kind `vlm`), retried from its last checkpoint if killed.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from mlxcore.config import TrainConfig, VLMDataConfig, VLMEvalConfig, VLMLossConfig, VLMModelConfig
from mlxcore.data.download import data_files
from mlxcore.io import atomic_dir, dir_digest, read_manifest, write_json, write_manifest, write_text
from mlxcore.vlm import data as vlm_data
from mlxcore.vlm import evaluate as vlm_eval
from mlxcore.vlm import hub, synthetic
from mlxcore.vlm.train import VLMJob
from tasks.caching import Stage
from tasks.progress import artifact_key, progress_bar
from tasks.train import crashed, run_training


def _image_dirs(params: dict) -> dict:
    """The folders of the JSONL files: their images are part of the data's content."""
    files = [f for fs in (params.get("files") or {}).values() for f in fs]
    return {str(Path(f).parent): dir_digest(Path(f).parent) for f in files if Path(f).is_file()}


SYNTHETIC = Stage("vlm-synthetic")
DOWNLOAD = Stage("vlm-download", module="mlxcore.vlm.hub")  # versioned by the download code only
PREPROCESS = Stage("vlm-preprocess", inputs=("files",), extra=_image_dirs)
TRAIN = Stage("vlm-train", inputs=("data_dir", "init_from"), product="model")
EVAL = Stage("vlm-eval", inputs=("checkpoint", "data_dir"))
BENCH = Stage("vlm-bench", inputs=("eval_dir",))


@SYNTHETIC.task()
def synthetic_data(digits: bool, scenes: int, val_fraction: float, seed: int, run_dir: str) -> dict:
    """scikit-learn's digits + generated shape scenes, as PNG files and JSONL rows."""
    out = SYNTHETIC.dir(locals())
    if not SYNTHETIC.done(out):
        with atomic_dir(out, replace=True) as tmp:
            counts = synthetic.write(tmp / "data", digits=digits, scenes=scenes, val_fraction=val_fraction, seed=seed)
            write_manifest(tmp, "vlm-synthetic", {"digits": digits, "scenes": scenes, "val_fraction": val_fraction,
                                                  "seed": seed}, counts=counts,
                           sources=[{"name": "scikit-learn load_digits (UCI optical digits)", "license": "CC-BY-4.0"},
                                    {"name": "generated shape scenes", "license": "generated"}])
    return {"files": {s: [str(out / "data" / f"{s}.jsonl")] for s in ("train", "val")},
            "counts": read_manifest(out)["counts"]}


@DOWNLOAD.task(task_run_name="vlm-download-{spec}")  # fetch() retries transient errors itself
def download(spec: str, columns: dict, max_download_mb: float, run_dir: str) -> dict:
    """An image-text split of the hub (`hfds:` / `catalog:`) as JSONL + PNG files, size-guarded, its commit,
    rows, digests and license in the manifest."""
    out = DOWNLOAD.dir(locals())
    if not DOWNLOAD.done(out):
        hub.fetch(spec, out, columns, max_download_mb)
    m = read_manifest(out)
    return {"path": str(out), "files": [str(p) for p in data_files(out)], "digest": m["digest"],
            "source": m["source"], "license": m.get("license", "unknown")}


def sources(data: VLMDataConfig, run_dir: str) -> dict[str, list[str]]:
    """{split: [JSONL files]}: local files as they are, hub specs downloaded; else the synthetic set."""
    if data.train:
        if not data.val:
            from mlxcore.config import ConfigError

            raise ConfigError("data.train is set: set data.val (held-out JSONL files) too; the metrics are held-out")
        for spec in data.train + data.val:  # every spec checked before anything is fetched
            hub.check_spec(spec)
        return {split: [f for spec in specs for f in
                        ([str(Path(spec).expanduser().resolve())] if hub.is_local(spec) else
                         download(spec, dict(data.columns), data.max_download_mb, run_dir)["files"])]
                for split, specs in (("train", data.train), ("val", data.val))}
    return synthetic_data(data.digits, data.scenes, data.val_fraction, data.seed, run_dir)["files"]


@PREPROCESS.task()
def preprocess(files: dict, image_size: int, patch_size: int, max_images_per_sample: int, max_tokens: int,
               vocab_size: int, tokenizer_dir: str | None, run_dir: str) -> dict:
    """Validate the rows (file:line errors), resize + normalise the images, tokenize, write shards."""
    out = PREPROCESS.dir(locals())
    if not PREPROCESS.done(out):
        with progress_bar(1, "vlm-preprocess images", "image") as bar:
            vlm_data.preprocess(files, out, image_size=image_size, patch_size=patch_size,
                                max_images_per_sample=max_images_per_sample, max_tokens=max_tokens,
                                vocab_size=vocab_size, tokenizer_dir=tokenizer_dir, on_progress=bar)
        m = read_manifest(out)
        create_table_artifact(table=[{"split": s, **v} for s, v in m["splits"].items()],
                              key=artifact_key(Path(run_dir).name, "vlm-preprocess"),
                              description=f"vlm-preprocess: {image_size}px images, {m['tokens_per_image']} tokens each")
    m = read_manifest(out)
    return {"path": str(out), "digest": m["digest"], "splits": m["splits"]}


@TRAIN.task(retries=1, retry_condition_fn=crashed)
def train_vlm(data_dir: str, init_from: str | None, model: VLMModelConfig, loss: VLMLossConfig, train: TrainConfig,
              run_dir: str) -> dict:
    """Train (or LoRA-fine-tune `init_from`) on LM + contrastive + matching losses through `train.fit`."""
    out = TRAIN.dir(locals())
    job = VLMJob(data_dir=data_dir, out_dir=str(out), train=train, model=None if init_from else model,
                 init_from=init_from, loss=loss)
    return run_training("vlm-train", job, run_dir)


@EVAL.task()
def evaluate(checkpoint: str, data_dir: str, config: VLMEvalConfig, run_dir: str) -> dict:
    """Recall@K both ways, zero-shot accuracy, captioning BLEU, VQA exact match (+ a markdown artifact)."""
    out = EVAL.dir(locals())
    if not EVAL.done(out):
        vlm_eval.write(checkpoint, data_dir, out, max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                       samples=config.samples)
    create_markdown_artifact(key=artifact_key(Path(run_dir).name, "vlm-eval"), markdown=(out / "report.md").read_text(),
                             description="vlm-eval: held-out metrics, sample images with generated captions")
    return {"path": str(out), "metrics": json.loads((out / "metrics.json").read_text())}


def bench_rows(metrics: dict) -> list[dict]:
    """The bench report's rows: each metric of the trained model beside its baseline."""
    rows = []
    for key, m in metrics.items():
        if key.startswith("retrieval_"):
            for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
                rows.append({"suite": key, "metric": k, "model": round(m[k], 4), "baseline": round(m[f"chance_{k}"], 4),
                             "baseline_kind": "chance"})
            rows.append({"suite": key, "metric": "mean_recall", "model": round(m["mean_recall"], 4), "baseline": None,
                         "baseline_kind": ""})
    if "zero_shot" in metrics:
        z = metrics["zero_shot"]
        rows.append({"suite": "zero_shot", "metric": "accuracy", "model": round(z["accuracy"], 4),
                     "baseline": round(z["chance"], 4), "baseline_kind": "chance"})
    if "captioning" in metrics:
        c = metrics["captioning"]
        rows.append({"suite": "captioning", "metric": "bleu", "model": round(c["bleu"], 2),
                     "baseline": round(c["baseline_bleu"], 2), "baseline_kind": "most frequent caption"})
    if "vqa" in metrics:
        v = metrics["vqa"]
        rows.append({"suite": "vqa", "metric": "exact_match", "model": round(v["accuracy"], 4),
                     "baseline": round(v["baseline_accuracy"], 4), "baseline_kind": "majority answer"})
    return rows


def bench_markdown(rows: list[dict], title: str = "vlm bench") -> str:
    """The bench rows as the text bench report's markdown: a heading, then one table (metric beside baseline)."""
    fmt = lambda v: "–" if v is None else f"{v:.4g}"  # noqa: E731
    lines = [f"### {title}", "", "| suite | metric | model | baseline | baseline kind |", "|---|---|---|---|---|"]
    lines += [f"| {r['suite']} | {r['metric']} | {fmt(r['model'])} | {fmt(r['baseline'])} | {r['baseline_kind'] or '–'} |"
              for r in rows]
    return "\n".join(lines) + "\n"


@BENCH.task()
def bench_report(eval_dir: str, run_dir: str, title: str = "vlm bench") -> dict:
    """Each held-out metric beside its baseline: `report.json` / `report.md` in the stage dir (as the text
    bench report), `<run>/vlm-bench.json`, a table and a markdown artifact."""
    out = BENCH.dir(locals())
    rows = bench_rows(json.loads((Path(eval_dir) / "metrics.json").read_text()))
    md = bench_markdown(rows, title)
    if not BENCH.done(out):
        with atomic_dir(out, replace=True) as tmp:
            write_json(tmp / "report.json", rows)
            write_text(tmp / "report.md", md)
            write_manifest(tmp, "vlm-bench-report", {"eval": str(eval_dir)}, rows=len(rows))
    write_json(Path(run_dir) / "vlm-bench.json", rows)
    name = Path(run_dir).name
    create_table_artifact(table=rows, key=artifact_key(name, "vlm-bench"),
                          description="vlm bench: the trained model vs chance / majority baselines (held-out)")
    create_markdown_artifact(markdown=md, key=artifact_key(name, "vlm-bench-report"), description=f"{title} report")
    # covers_eval: the card shows this table, not the eval section's wide one
    return {"path": str(out), "rows": rows, "covers_eval": True}
