"""`vlm-eval`: held-out retrieval, zero-shot classification, captioning BLEU and VQA accuracy.

- Retrieval (rows with an image and a caption, per task): image->text and text->image
  recall@1/5/10 and their mean. Captions repeat (ten digit captions), so a retrieved item is a
  hit when its caption is the query's caption; `chance_*` is the expected recall of a random
  ranking under that rule.
- Zero-shot (rows with a `label`): the image's embedding against the prompts
  "a photo of the digit <word>" for every class; accuracy of the best-scoring prompt.
- Captioning (task `caption`): greedy captions from the image alone, corpus BLEU (sacrebleu)
  against the reference; baseline: the most frequent training caption for every image.
- VQA (chat rows): greedy answers, exact match after strip/lower; baseline: the most frequent
  training answer to the same question (the majority answer when the question is new).
"""

from __future__ import annotations

import base64
import collections
import io
import json
import math
from pathlib import Path

import mlxcore  # noqa: F401  (fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from mlxcore.io import atomic_dir, write_json, write_manifest, write_text
from mlxcore.models import checkpoint as ckpt
from mlxcore.vlm.data import MEAN, STD, Split
from mlxcore.vlm.synthetic import DIGIT_WORDS, ZERO_SHOT_TEMPLATE


def _embed_texts(model, enc_ids: list[list[int]], pad: int, batch: int = 256) -> np.ndarray:
    out = []
    L = max(map(len, enc_ids))
    for s in range(0, len(enc_ids), batch):
        chunk = enc_ids[s:s + batch]
        ids = np.full((len(chunk), L), pad, np.int32)
        m = np.zeros((len(chunk), L), np.float32)
        for i, t in enumerate(chunk):
            ids[i, :len(t)], m[i, :len(t)] = t, 1
        e = model.text_embedding(mx.array(ids), mx.array(m))
        out.append(np.array(e))
    return np.concatenate(out)


def _embed_images(model, pixels: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([np.array(model.image_embedding(mx.array(pixels[s:s + batch].astype(np.float32))))
                           for s in range(0, len(pixels), batch)])


def _chance(n: int, m: int, k: int) -> float:
    """P(at least one of m relevant items among the top k of n in a random order)."""
    k = min(k, n)
    return 1.0 - math.comb(n - m, k) / math.comb(n, k) if n - m >= k else 1.0


def retrieval(img: np.ndarray, txt: np.ndarray, captions: list[str], ks=(1, 5, 10)) -> dict:
    """Recall@k both ways over unique captions (i2t) and over images (t2i), hits by caption."""
    unique = sorted(set(captions))
    pos = {c: i for i, c in enumerate(unique)}
    gt = np.array([pos[c] for c in captions])
    u_txt = np.stack([txt[captions.index(c)] for c in unique])
    sim_i2t = img @ u_txt.T  # [N, U]
    rank_i2t = np.argsort(-sim_i2t, axis=1)
    sim_t2i = txt @ img.T  # [N, N]: each row's caption against every image
    rank_t2i = np.argsort(-sim_t2i, axis=1)
    counts = collections.Counter(gt.tolist())
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(np.mean([gt[i] in rank_i2t[i, :k] for i in range(len(gt))]))
        out[f"t2i_r{k}"] = float(np.mean([np.any(gt[rank_t2i[i, :k]] == gt[i]) for i in range(len(gt))]))
        out[f"chance_i2t_r{k}"] = min(k, len(unique)) / len(unique)
        out[f"chance_t2i_r{k}"] = float(np.mean([_chance(len(gt), counts[g], k) for g in gt]))
    out["mean_recall"] = float(np.mean([out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]))
    out["items"], out["unique_texts"] = len(gt), len(unique)
    return out


def generate(model, prompts: list[list[int]], pixels: np.ndarray, stop: int, max_new: int, batch: int = 64) -> list[list[int]]:
    """Greedy continuations of `prompts` (rows with their images [N, M, S, S, 3]); equal-length prompts batch together."""
    outs: list[list[int] | None] = [None] * len(prompts)
    by_len = collections.defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch):
            part = idx[s:s + batch]
            seq = mx.array(np.array([prompts[i] for i in part], np.int32))
            pix = mx.array(pixels[part].astype(np.float32))
            done = np.zeros(len(part), bool)
            new = []
            for _ in range(max_new):
                nxt = mx.argmax(model(seq, pix)[:, -1], axis=-1)
                tok = np.array(nxt)
                new.append(np.where(done, stop, tok))
                done |= tok == stop
                seq = mx.concatenate([seq, nxt[:, None].astype(mx.int32)], axis=1)
                if done.all():
                    break
            gen = np.stack(new, axis=1) if new else np.zeros((len(part), 0), np.int64)
            for j, i in enumerate(part):
                row = gen[j].tolist()
                outs[i] = row[:row.index(stop)] if stop in row else row
    return outs


def _png(pixels: np.ndarray, scale: int = 4, mean=MEAN, std=STD) -> str:
    from PIL import Image

    x = np.clip(pixels.astype(np.float32) * np.array(std) + np.array(mean), 0, 1)
    im = Image.fromarray((x * 255).round().astype(np.uint8), mode="RGB")
    im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def evaluate(model_dir: str | Path, data_dir: str | Path, split: str = "val", **kw) -> tuple[dict, str]:
    """(metrics, markdown report with sample images and generated captions)."""
    from mlxcore.perf._blas import blas_threads

    with blas_threads(1):  # tiny matmuls in loops: one MKL thread (see blas_threads)
        return _evaluate(model_dir, data_dir, split, **kw)


def _evaluate(model_dir: str | Path, data_dir: str | Path, split: str = "val", *, max_new_tokens: int = 16,
             batch_size: int = 64, samples: int = 8) -> tuple[dict, str]:
    """(metrics, markdown report with sample images and generated captions)."""
    from mlxcore.data import tokenizer as toks
    import sacrebleu

    model, _ = ckpt.load(model_dir)
    model.eval()
    data = Split(data_dir, split)
    train_rows = Split(data_dir, "train").rows if (Path(data_dir) / "train").is_dir() else []
    tok = toks.load(Path(data_dir) / "tokenizer")
    eos = tok.eos_token_id
    rows, idx = data.rows, data.index
    first_pix = np.stack([data.pixels[int(r[2])] if r[3] else np.zeros_like(data.pixels[0]) for r in idx])
    metrics: dict = {}
    # -- retrieval, per task
    joint = hasattr(model, "image_embedding")  # an mlx-vlm model (mlxvlm.py) has no joint space: generation only
    paired = [i for i, r in enumerate(rows) if r.get("caption") and idx[i][3] > 0]
    if paired and joint:
        img = _embed_images(model, first_pix[paired])
        txt = _embed_texts(model, [data.captions[int(idx[i][4]):int(idx[i][4] + idx[i][5])].tolist() for i in paired], data.pad)
        for task in sorted({rows[i].get("task") or "all" for i in paired}):
            sel = [j for j, i in enumerate(paired) if (rows[i].get("task") or "all") == task]
            if len(sel) >= 2:
                metrics[f"retrieval_{task}"] = retrieval(img[sel], txt[sel], [rows[paired[j]]["caption"] for j in sel])
    # -- zero-shot classification
    labelled = [i for i, r in enumerate(rows) if r.get("label") is not None and idx[i][3] > 0]
    if labelled and joint:
        classes = sorted({rows[i]["label"] for i in labelled} | {r["label"] for r in train_rows if r.get("label") is not None})
        words = [DIGIT_WORDS[c] if 0 <= c < 10 else str(c) for c in classes]
        prompts = [tok.encode(ZERO_SHOT_TEMPLATE.format(w), add_special_tokens=False) + [eos] for w in words]
        pe = _embed_texts(model, prompts, data.pad)
        ie = _embed_images(model, first_pix[labelled])
        pred = np.array(classes)[np.argmax(ie @ pe.T, axis=1)]
        truth = np.array([rows[i]["label"] for i in labelled])
        metrics["zero_shot"] = {"accuracy": float(np.mean(pred == truth)), "items": len(labelled),
                                "classes": len(classes), "chance": 1.0 / len(classes),
                                "prompt": ZERO_SHOT_TEMPLATE}
    # -- generation: captions and VQA answers
    def prompt_of(i: int) -> list[int]:
        ts, tl = int(idx[i][0]), int(idx[i][1])
        seq, m = data.tokens[ts:ts + tl], data.mask[ts:ts + tl]
        return seq[:int(np.argmax(m > 0))].tolist()

    all_pix = np.stack([data.batch([i])["pixels"][0] for i in range(len(rows))]) if rows else None
    gen_rows = [i for i, r in enumerate(rows) if (r.get("task") == "caption" or r.get("kind") == "chat") and idx[i][3] > 0]
    texts = {}
    if gen_rows:
        outs = generate(model, [prompt_of(i) for i in gen_rows], all_pix[gen_rows], eos, max_new_tokens, batch_size)
        texts = {i: tok.decode(o, skip_special_tokens=True).strip() for i, o in zip(gen_rows, outs)}
    caps = [i for i in gen_rows if rows[i].get("task") == "caption"]
    if caps:
        hyps, refs = [texts[i] for i in caps], [rows[i]["caption"] for i in caps]
        common = collections.Counter(r["caption"] for r in train_rows if r.get("task") == "caption").most_common(1)
        base = common[0][0] if common else ""
        metrics["captioning"] = {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
                                 "baseline_bleu": sacrebleu.corpus_bleu([base] * len(refs), [refs]).score,
                                 "baseline": f"the most frequent training caption ({base!r})",
                                 "exact_match": float(np.mean([h == r for h, r in zip(hyps, refs)])), "items": len(caps)}
    vqa = [i for i in gen_rows if rows[i].get("kind") == "chat" and rows[i].get("answer") is not None]
    if vqa:
        norm = lambda s: (s or "").strip().lower()  # noqa: E731
        by_q = collections.defaultdict(collections.Counter)
        for r in train_rows:
            if r.get("kind") == "chat":
                by_q[r.get("question")][norm(r.get("answer"))] += 1
        overall = sum(by_q.values(), collections.Counter())
        guess = lambda q: (by_q[q] or overall or collections.Counter({"": 1})).most_common(1)[0][0]  # noqa: E731
        metrics["vqa"] = {"accuracy": float(np.mean([norm(texts[i]) == norm(rows[i]["answer"]) for i in vqa])),
                          "baseline_accuracy": float(np.mean([guess(rows[i]["question"]) == norm(rows[i]["answer"]) for i in vqa])),
                          "baseline": "the most frequent training answer to the same question", "items": len(vqa)}
    # -- the report
    lines = ["### vlm-eval", "", "| metric | value | baseline |", "|---|---|---|"]
    for task, m in metrics.items():
        if task.startswith("retrieval_"):
            for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "mean_recall"):
                base = f"{m['chance_' + k]:.3f} (chance)" if "chance_" + k in m else "—"
                lines.append(f"| {task} {k} | {m[k]:.3f} | {base} |")
    if "zero_shot" in metrics:
        z = metrics["zero_shot"]
        lines.append(f"| zero-shot accuracy ({z['items']} images) | {z['accuracy']:.3f} | {z['chance']:.3f} (chance) |")
    if "captioning" in metrics:
        c = metrics["captioning"]
        lines.append(f"| captioning BLEU | {c['bleu']:.1f} | {c['baseline_bleu']:.1f} (most frequent caption) |")
    if "vqa" in metrics:
        v = metrics["vqa"]
        lines.append(f"| VQA exact match | {v['accuracy']:.3f} | {v['baseline_accuracy']:.3f} (majority answer) |")
    shown = (caps or gen_rows)[:samples]
    pc = Path(data_dir) / "tokenizer" / "preprocessor_config.json"  # the normalisation (an mlx-vlm model's own)
    norm = json.loads(pc.read_text()) if pc.is_file() else {}
    mean, std = norm.get("image_mean", MEAN), norm.get("image_std", STD)
    if shown:
        lines += ["", "#### Held-out images and generated text", "", "| image | generated | reference |", "|---|---|---|"]
        for i in shown:
            ref = rows[i].get("caption") or f"{rows[i].get('question')} → {rows[i].get('answer')}"
            lines.append(f"| ![img]({_png(all_pix[i][0], mean=mean, std=std)}) | {texts.get(i, '')} | {ref} |")
    return metrics, "\n".join(lines) + "\n"


def write(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path, **kw) -> dict:
    metrics, md = evaluate(model_dir, data_dir, **kw)
    with atomic_dir(out_dir, replace=True) as tmp:
        write_json(tmp / "metrics.json", metrics)
        write_text(tmp / "report.md", md)
        write_manifest(tmp, "vlm-eval", {"model": str(model_dir), "data": str(data_dir), **kw})
    return metrics


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m mlxcore.vlm.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("data_dir")
    p.add_argument("--split", default="val")
    a = p.parse_args(argv)
    metrics, _ = evaluate(a.model_dir, a.data_dir, a.split)
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
