"""Image + text rows -> preprocessed shards (the cached `vlm-preprocess` stage) -> batches.

Row formats (JSONL, one object a line; image paths relative to the JSONL file or absolute):

  {"text": "a red circle left of a blue square", "images": ["img/0001.png"]}
  {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0001.png"},
                                             {"type": "text", "text": "what color is the circle?"}]},
                {"role": "assistant", "content": "red"}]}

A `text` row may place its images with `<image>` markers (as many as images), else the images
come first; the LM loss covers the text (and the end token). A chat row is rendered in ChatML;
the loss covers the assistant turns. `label` (int) and `task` pass through to the evaluation.
Every image becomes `tokens_per_image` placeholder tokens (`<|image_pad|>`) whose embeddings the
model replaces with the projected vision features. Bad input (missing or unreadable image, more
than `max_images_per_sample`, a wrong field) fails with `file:line` and writes nothing.

Output dir:  tokenizer/ (HF files + preprocessor_config.json), <split>/shard-00000/ with
`pixels.npy` (float16 [N_images, S, S, 3], resized and normalised), `tokens.npy`, `mask.npy`,
`captions.npy` (flat int32), `index.npy` (per row: token start, length, first image, images,
caption start, caption length), `rows.jsonl` (the text / label / answer each row is scored on),
and manifest.json (kind `vlm-data`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mlxcore import lineage
from mlxcore.io import atomic_dir, read_manifest, write_json, write_jsonl, write_manifest

IMAGE_TOKEN = "<|image_pad|>"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
INDEX_COLUMNS = ("tok_start", "tok_len", "img_start", "n_img", "cap_start", "cap_len")


class RowError(ValueError):
    """A bad row: the message starts with `file:line`."""


# ----------------------------------------------------------------------------- rows
def _image_path(base: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise RowError(f"{where}: an image must be a path string, got {type(value).__name__}")
    p = Path(value)
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise RowError(f"{where}: image {value!r} not found ({p})")
    return p


def parse_row(obj, base: Path, where: str, max_images: int) -> dict:
    """One JSONL object -> {"segments": [(kind, value, trained)], "images": [Path], "caption", ...}.

    segments: ("text", str, bool) and ("image", index, False) in order."""
    if not isinstance(obj, dict):
        raise RowError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    extra = {k: obj[k] for k in ("label", "task") if k in obj}
    if "label" in extra and not isinstance(extra["label"], int):
        raise RowError(f"{where}: field 'label' must be an integer")
    if "text" in obj:
        text, imgs = obj["text"], obj.get("images", [])
        if not isinstance(text, str):
            raise RowError(f"{where}: field 'text' must be a string")
        if not isinstance(imgs, list):
            raise RowError(f"{where}: field 'images' must be a list of paths")
        if len(imgs) > max_images:
            raise RowError(f"{where}: {len(imgs)} images, more than max_images_per_sample={max_images}")
        images = [_image_path(base, v, f"{where}: images[{i}]") for i, v in enumerate(imgs)]
        parts = text.split("<image>")
        if len(parts) > 1 and len(parts) - 1 != len(images):
            raise RowError(f"{where}: {len(parts) - 1} <image> markers but {len(images)} images")
        segs = []
        if len(parts) == 1:
            segs = [("image", i, False) for i in range(len(images))] + [("text", text, True)]
        else:
            for i, part in enumerate(parts):
                if part:
                    segs.append(("text", part, True))
                if i < len(images):
                    segs.append(("image", i, False))
        caption = text.replace("<image>", "").strip()
        return {"segments": segs, "images": images, "caption": caption, "kind": "text", **extra}
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise RowError(f"{where}: field 'messages' must be a non-empty list")
        segs, images, prompt, answer = [], [], "", None
        for m_i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise RowError(f"{where}: messages[{m_i}] needs a role of system, user or assistant")
            content = m.get("content")
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                raise RowError(f"{where}: messages[{m_i}].content must be a string or a list of parts")
            trained = m["role"] == "assistant"
            segs.append(("text", f"<|im_start|>{m['role']}\n", False))
            text_of_turn = ""
            for p_i, part in enumerate(parts):
                w = f"{where}: messages[{m_i}].content[{p_i}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    if trained:
                        raise RowError(f"{w}: an assistant turn cannot hold an image")
                    images.append(_image_path(base, part.get("image"), w))
                    segs.append(("image", len(images) - 1, False))
                elif kind == "text" and isinstance(part.get("text"), str):
                    segs.append(("text", part["text"], trained))
                    text_of_turn += part["text"]
                else:
                    raise RowError(f"{w}: a part is {{'type': 'image', 'image': path}} or {{'type': 'text', 'text': str}}")
            segs.append(("text", "<|im_end|>", trained))
            segs.append(("text", "\n", False))
            if trained and answer is None:
                answer = text_of_turn
            elif not trained and answer is None:
                prompt += text_of_turn
        if len(images) > max_images:
            raise RowError(f"{where}: {len(images)} images, more than max_images_per_sample={max_images}")
        if not any(t for k, _, t in segs if k == "text"):
            raise RowError(f"{where}: no assistant turn to train on")
        return {"segments": segs, "images": images, "caption": None, "question": prompt, "answer": answer,
                "kind": "chat", **extra}
    raise RowError(f"{where}: a row needs 'text' (+ 'images') or 'messages'; it has {', '.join(sorted(obj)) or 'no fields'}")


def read_jsonl(path: str | Path, max_images: int) -> list[dict]:
    path = Path(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(f"{where}: not valid JSON: {e.msg}") from None
            row = parse_row(obj, path.parent, where, max_images)
            row["where"] = where
            rows.append(row)
    if not rows:
        raise RowError(f"{path}: no rows")
    return rows


# ----------------------------------------------------------------------------- images
def load_image(path: Path, size: int, where: str, processor=None) -> np.ndarray:
    """[size, size, 3] float32, resized (bicubic) and normalised with MEAN / STD; with `processor`
    (an mlx-vlm model's own image processor, `mlxvlm.image_processor`) prepared by it instead."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if processor is not None:
                from mlxcore.vlm import mlxvlm

                x = mlxvlm.pixels(processor, im.convert("RGB"))
                if x.shape != (size, size, 3):
                    raise RowError(f"{where}: the model's image processor made a {x.shape} image, not {size}x{size}")
                return x
            im = im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            x = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, RowError):
            raise
        raise RowError(f"{where}: cannot read image {path}: {e}") from None
    return (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)


# ----------------------------------------------------------------------------- tokenizer
def build_tokenizer(texts: list[str], out_dir: Path, vocab_size: int, image_size: int) -> None:
    """A small byte-level BPE (mlxcore.data.tokenizer) + the image placeholder token + the image processor config."""
    from mlxcore.data import tokenizer as toks

    toks.train_bpe(texts, vocab_size, 2, out_dir)
    tok = toks.load(out_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.save_pretrained(str(out_dir))
    write_json(out_dir / "preprocessor_config.json", preprocessor_config(image_size))


def preprocessor_config(image_size: int) -> dict:
    return {"image_processor_type": "MlxflowImageProcessor", "size": {"height": image_size, "width": image_size},
            "do_resize": True, "resample": 3, "do_normalize": True, "image_mean": list(MEAN),
            "image_std": list(STD), "do_convert_rgb": True}


class Encoder:
    def __init__(self, tokenizer_dir: Path, tokens_per_image: int, image_token: str = IMAGE_TOKEN):
        from mlxcore.data import tokenizer as toks

        self.tok = toks.load(tokenizer_dir)
        self.image_id = self.tok.convert_tokens_to_ids(image_token)
        self.eos = self.tok.eos_token_id
        self.k = tokens_per_image

    def text(self, s: str) -> list[int]:
        return self.tok.encode(s, add_special_tokens=False)

    def row(self, row: dict) -> tuple[list[int], list[int], list[int]]:
        """(tokens, loss mask, caption tokens) of a parsed row."""
        ids, mask = [], []
        for kind, value, trained in row["segments"]:
            piece = [self.image_id] * self.k if kind == "image" else self.text(value)
            ids += piece
            mask += [int(trained)] * len(piece)
        if row["kind"] == "text":
            ids.append(self.eos)
            mask.append(1)
        cap = self.text(row["caption"]) + [self.eos] if row.get("caption") else []
        return ids, mask, cap


# ----------------------------------------------------------------------------- preprocess
def preprocess(files: dict[str, list[str]], out_dir: str | Path, *, image_size: int, patch_size: int,
               max_images_per_sample: int, max_tokens: int, vocab_size: int = 512,
               tokenizer_dir: str | Path | None = None, on_progress=None) -> dict:
    """Validate every row, then write the tokenizer and the shards of each split (atomically).

    With `tokenizer_dir` an mlx-vlm model dir (`mlxvlm.is_mlxvlm_dir`: fine-tuning it) the model
    decides: its tokenizer and image token, its image processor (size, normalisation) and its
    tokens per image. With `tokenizer_dir` one of our VLM dirs, its image and patch size. Either
    way `image_size` and `patch_size` are then the model's, not the arguments'."""
    from mlxcore.vlm import image_geometry, mlxvlm

    processor, image_token = None, IMAGE_TOKEN
    if (geometry := image_geometry(tokenizer_dir)) is not None:
        image_size, patch_size = geometry["image_size"], geometry["patch_size"]
    if image_size % patch_size:
        raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}")
    k = (image_size // patch_size) ** 2
    if mlxvlm.is_mlxvlm_dir(tokenizer_dir):
        spec = mlxvlm.data_spec(tokenizer_dir)
        image_size, patch_size, image_token, k = (spec[x] for x in ("image_size", "patch_size", "image_token", "tokens_per_image"))
        processor = mlxvlm.image_processor(tokenizer_dir)
    parsed = {s: [r for f in fs for r in read_jsonl(f, max_images_per_sample)] for s, fs in files.items()}
    total = sum(len(r["images"]) for rows in parsed.values() for r in rows)
    done = 0
    with atomic_dir(out_dir, replace=True) as tmp:
        tok_dir = tmp / "tokenizer"
        tok_dir.mkdir()
        if tokenizer_dir is not None:
            from mlxcore.data import tokenizer as toks

            toks.copy_files(tokenizer_dir, tok_dir)
            if processor is not None:  # the model's own processor files travel with its tokenizer
                for name in mlxvlm.PROCESSOR_FILES:
                    if (Path(tokenizer_dir) / name).is_file():
                        shutil.copy2(Path(tokenizer_dir) / name, tok_dir / name)
            else:
                write_json(tok_dir / "preprocessor_config.json", preprocessor_config(image_size))
        else:
            texts = [v for r in parsed.get("train", []) for kind, v, _ in r["segments"] if kind == "text"]
            build_tokenizer(texts, tok_dir, vocab_size, image_size)
        enc = Encoder(tok_dir, k, image_token)
        stats = {}
        for split, rows in parsed.items():
            shard = tmp / split / "shard-00000"
            shard.mkdir(parents=True)
            toks_, masks, caps, pix, index, meta = [], [], [], [], [], []
            for r in rows:
                ids, mask, cap = enc.row(r)
                if len(ids) > max_tokens:
                    raise RowError(f"{r['where']}: {len(ids)} tokens (images included), more than max_tokens={max_tokens}")
                index.append((sum(map(len, toks_)), len(ids), len(pix), len(r["images"]), sum(map(len, caps)), len(cap)))
                toks_.append(ids)
                masks.append(mask)
                caps.append(cap)
                for p in r["images"]:
                    pix.append(load_image(p, image_size, r["where"], processor).astype(np.float16))
                    done += 1
                    if on_progress is not None and done % 64 == 0:
                        on_progress(done, total)
                meta.append({k_: r.get(k_) for k_ in ("caption", "question", "answer", "label", "task", "kind", "where")})
            np.save(shard / "tokens.npy", np.array([t for ids in toks_ for t in ids], np.int32))
            np.save(shard / "mask.npy", np.array([m for ms in masks for m in ms], np.uint8))
            np.save(shard / "captions.npy", np.array([t for c in caps for t in c], np.int32))
            np.save(shard / "index.npy", np.array(index, np.int64).reshape(-1, len(INDEX_COLUMNS)))
            np.save(shard / "pixels.npy", np.stack(pix) if pix else np.zeros((0, image_size, image_size, 3), np.float16))
            write_jsonl(shard / "rows.jsonl", meta)
            stats[split] = {"rows": len(rows), "images": len(pix), "max_images": max((r_[3] for r_ in index), default=0),
                            "max_tokens": max((r_[1] for r_ in index), default=0),
                            "max_caption": max((r_[5] for r_ in index), default=0)}
        if on_progress is not None:
            on_progress(total, total)
        cfg = {"image_size": image_size, "patch_size": patch_size, "max_images_per_sample": max_images_per_sample,
               "max_tokens": max_tokens}
        write_manifest(tmp, "vlm-data", cfg, splits=stats, tokens_per_image=k, image_token_id=enc.image_id,
                       vocab_size=len(enc.tok), eos_id=enc.eos, pad_id=enc.tok.pad_token_id or 0,
                       inputs={s: [str(f) for f in fs] for s, fs in files.items()},
                       **lineage.fields(lineage.of_inputs(files)))  # a download's sources + licenses
    return read_manifest(out_dir, "vlm-data")


# ----------------------------------------------------------------------------- batches
class Split:
    """One split of a preprocessed dir, in memory (small by design)."""

    def __init__(self, data_dir: str | Path, split: str):
        self.manifest = read_manifest(data_dir, "vlm-data")
        d = Path(data_dir) / split / "shard-00000"
        if not d.is_dir():
            raise FileNotFoundError(f"{data_dir}: no {split} split")
        self.tokens, self.mask = np.load(d / "tokens.npy"), np.load(d / "mask.npy")
        self.captions, self.index = np.load(d / "captions.npy"), np.load(d / "index.npy")
        self.pixels = np.load(d / "pixels.npy")
        self.rows = [json.loads(line) for line in (d / "rows.jsonl").read_text().splitlines()]
        m = self.manifest
        self.pad, self.image_size = m["pad_id"], m["config"]["image_size"]
        self.max_images = max(1, max(s["max_images"] for s in m["splits"].values()))
        self.seq_len = max(s["max_tokens"] for s in m["splits"].values())
        self.cap_len = max(1, max(s["max_caption"] for s in m["splits"].values()))

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, ids) -> dict:
        """Host arrays of rows `ids`: tokens [B, T] (+ shifted targets, mask), pixels [B, M, S, S, 3],
        image_valid [B, M], caption tokens [B, C] + mask, pair_valid [B] (a caption with an image)."""
        B, T, M, C, S = len(ids), self.seq_len, self.max_images, self.cap_len, self.image_size
        inputs = np.full((B, T), self.pad, np.int32)
        targets = np.full((B, T), self.pad, np.int32)
        mask = np.zeros((B, T), np.float32)
        pixels = np.zeros((B, M, S, S, 3), np.float32)
        image_valid = np.zeros((B, M), np.float32)
        caps = np.full((B, C), self.pad, np.int32)
        cap_mask = np.zeros((B, C), np.float32)
        pair = np.zeros((B,), np.float32)
        for b, i in enumerate(ids):
            ts, tl, is_, ni, cs, cl = (int(v) for v in self.index[i])
            seq = self.tokens[ts:ts + tl]
            inputs[b, :tl - 1] = seq[:-1]
            targets[b, :tl - 1] = seq[1:]
            mask[b, :tl - 1] = self.mask[ts + 1:ts + tl]
            if ni:
                pixels[b, :ni] = self.pixels[is_:is_ + ni]
                image_valid[b, :ni] = 1
            caps[b, :cl] = self.captions[cs:cs + cl]
            cap_mask[b, :cl] = 1
            pair[b] = float(ni > 0 and cl > 0)
        return {"inputs": inputs, "targets": targets, "mask": mask, "pixels": pixels, "image_valid": image_valid,
                "captions": caps, "caption_mask": cap_mask, "pair_valid": pair}


class Batches:
    """`next(cursor) -> (batch, cursor)` over a shuffled epoch (seeded by epoch: exact resume);
    `take(n)` the first n batches in order (held-out)."""

    def __init__(self, data_dir, split: str, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.split, self.batch_size, self.seed, self.shuffle = Split(data_dir, split), batch_size, seed, shuffle
        if len(self.split) < batch_size and shuffle:
            raise ValueError(f"{data_dir}: the {split} split has {len(self.split)} rows, fewer than batch_size={batch_size}")

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.split)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next(self, cursor: dict):
        epoch, index = cursor["epoch"], cursor["index"]
        if index + self.batch_size > len(self.split):
            epoch, index = epoch + 1, 0
        ids = self._order(epoch)[index:index + self.batch_size]
        return self.split.batch(ids), {"epoch": epoch, "index": index + self.batch_size}

    def take(self, n: int) -> list[dict]:
        order = self._order(0)
        return [self.split.batch(order[s:s + self.batch_size]) for s in range(0, len(order), self.batch_size)][:n]
