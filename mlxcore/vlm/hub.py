"""Image-text data from the Hugging Face Hub for the `vlm` flow: `hfds:` splits and `catalog:` entries.

    fetch("hfds:ylecun/mnist:train[:2000]", out_dir, columns={"image": "image", "label": "label"})
    fetch("catalog:mnist-train", out_dir)

The split goes through `mlxcore.data.download.fetch` like a text split (spec parsing, the `datasets`
library, offline cache, size guard, retries, atomic out dir, manifest with revision / rows /
sha256 / license); `ImageRows` is the per-row rewrite it applies: each row's image (a column of
datasets' `Image` feature) is saved as `images/<row>.png` in the out dir and the row becomes the
JSONL rows `mlxcore.vlm.data` reads, with the image path relative to the JSONL file:

  text (+ label)       {"text": caption, "images": ["images/0000001.png"], "label": 3, "task": "caption"}
  label only           {"text": "a photo of the digit three", ..., "label": 3, "task": "classes"}
                       (class names 0-9 as the zero-shot prompt words; other names "a photo of a <name>")
  question + answer    {"messages": [user: image + question, assistant: answer]}  (as well as the above)

Column mapping, {our field: the dataset's column}: `image` (required), `text`, `label`, `question`,
`answer`; `text`, `label` or `question` + `answer` must be there. Empty: `image` is the split's
Image column when there is one, `text` the first of text / caption / sentence, `label` /
`question` / `answer` the columns of those names. A mapping that names a missing column, an image
column that is not an Image feature, a label that is not an integer fail before any row is kept.

The manifest's source adds `images` (count), `image_bytes` and `images_sha256` (of the PNG bytes,
in order), so its digest changes with any pixel. `hf:` files (a JSONL + image files of a repo)
are refused: give an `hfds:` split, or local JSONL + image files.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from mlxcore.data import download, hfds
from mlxcore.vlm.synthetic import DIGIT_WORDS, ZERO_SHOT_TEMPLATE

FIELDS = ("image", "text", "label", "question", "answer")
TEXT_NAMES = ("text", "caption", "sentence")
IMAGES = "images"


def _kind(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return f"{type(feature).__name__}({dtype!r})" if isinstance(dtype, str) else type(feature).__name__


class ImageRows:
    """`convert` for `download.fetch`: rows -> vlm JSONL rows, images -> `<out>/images/*.png`."""

    def __init__(self, out_dir: Path, features, columns: dict[str, str], where: str):
        from datasets import ClassLabel, Image

        self.dir, self.where = Path(out_dir) / IMAGES, where
        self.bytes = self.n = 0
        self.sha = hashlib.sha256()
        names = list(features) if features is not None else None
        if not columns:
            if features is None:
                raise hfds.RowError(f"{where}: the split does not say its columns; give data.columns "
                                    "(e.g. {image: image, text: caption})")
            images = [c for c, f in features.items() if isinstance(f, Image)]
            columns = {"image": images[0]} if images else {}
            text = next((c for c in TEXT_NAMES if c in features), None)
            columns |= {"text": text} if text else {}
            columns |= {f: f for f in ("label", "question", "answer") if f in features}
            if not images:
                raise hfds.RowError(f"{where}: no image column (datasets' Image feature) among its columns "
                                    f"{names}; name one with data.columns.image")
        unknown = sorted(set(columns) - set(FIELDS))
        if unknown:
            raise hfds.RowError(f"{where}: unknown field(s) {unknown} in the column mapping {columns}; "
                                f"the fields are {', '.join(FIELDS)}")
        if "image" not in columns:
            raise hfds.RowError(f"{where}: the column mapping {columns} names no `image` column")
        if not ("text" in columns or "label" in columns or {"question", "answer"} <= set(columns)):
            raise hfds.RowError(f"{where}: the column mapping {columns} needs `text`, `label` or `question` + `answer`")
        if features is not None:
            missing = [c for c in columns.values() if c not in features]
            if missing:
                raise hfds.RowError(f"{where}: no column {', '.join(map(repr, missing))} for the column mapping "
                                    f"{columns} (the split has {names})")
            image = features[columns["image"]]
            if not isinstance(image, Image):
                raise hfds.RowError(f"{where}: column {columns['image']!r} (data.columns.image) is a {_kind(image)} "
                                    f"feature, not an image (datasets' Image feature); image columns: "
                                    f"{[c for c, f in features.items() if isinstance(f, Image)] or 'none'}")
        self.columns = columns
        label = features.get(columns["label"]) if features is not None and "label" in columns else None
        self.label_names = list(label.names) if isinstance(label, ClassLabel) else None
        self.dir.mkdir(parents=True, exist_ok=True)

    def _png(self, value, where: str) -> bytes:
        from PIL import Image as PILImage

        if isinstance(value, dict) and value.get("bytes"):  # an Image column read with decode=False
            value = PILImage.open(io.BytesIO(value["bytes"]))
        if not isinstance(value, PILImage.Image):
            raise hfds.RowError(f"{where}: column {self.columns['image']!r} holds a {type(value).__name__}, "
                                "not an image")
        if value.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):
            value = value.convert("RGB")
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()

    def _label_text(self, label: int) -> str:
        name = self.label_names[label] if self.label_names and 0 <= label < len(self.label_names) else str(label)
        if name.isdigit() and int(name) < 10:
            return ZERO_SHOT_TEMPLATE.format(DIGIT_WORDS[int(name)])
        return f"a photo of a {name.replace('_', ' ')}"

    def __call__(self, row: dict, where: str) -> list[dict]:
        c = self.columns
        row = hfds.map_row(row, c, where)
        data = self._png(row["image"], where)
        self.n += 1
        rel = f"{IMAGES}/{self.n:07d}.png"
        with open(self.dir / rel.split("/")[1], "wb") as f:
            f.write(data)
        self.bytes += len(data)
        self.sha.update(data)
        out, extra = [], {}
        if "label" in c:
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, int):
                raise hfds.RowError(f"{where}: column {c['label']!r} (data.columns.label) must hold integer labels "
                                    f"(a ClassLabel or int), got {type(label).__name__} {label!r}")
            extra["label"] = label
        text = row.get("text")
        if "text" in c:
            if not isinstance(text, str) or not text.strip():
                raise hfds.RowError(f"{where}: column {c['text']!r} (data.columns.text) must hold non-empty text, "
                                    f"got {type(text).__name__} {text!r}"[:300])
            out.append({"text": text, "images": [rel], **extra, "task": "caption"})
        elif "label" in c:
            out.append({"text": self._label_text(extra["label"]), "images": [rel], **extra, "task": "classes"})
        if {"question", "answer"} <= set(c):
            q, a = row["question"], row["answer"]
            a = a[0] if isinstance(a, list) and a else a
            if not isinstance(q, str) or not isinstance(a, str):
                raise hfds.RowError(f"{where}: columns {c['question']!r} / {c['answer']!r} must hold text")
            out.append({"messages": [{"role": "user", "content": [{"type": "image", "image": rel},
                                                                   {"type": "text", "text": q}]},
                                     {"role": "assistant", "content": a}]})
        return out

    def summary(self) -> dict:
        return {"images": self.n, "image_bytes": self.bytes, "images_sha256": self.sha.hexdigest(),
                "columns": dict(self.columns)}


def check_spec(spec: str) -> None:
    """DownloadError (before anything is fetched) for a spec the vlm data stage cannot take."""
    parsed = download.parse_spec(spec, "vlm")
    if getattr(parsed, "catalog", None):
        from mlxcore.data import catalog

        entry = catalog.get(parsed.catalog)
        if "vlm" not in entry.kind:
            raise download.DownloadError(f"data spec {spec!r}: catalog entry {entry.name!r} is {', '.join(entry.kind)} "
                                         "data, not image-text (kind vlm); `mlxflow data list --kind vlm` lists those")
    if isinstance(parsed, download.HubFile):
        raise download.DownloadError(
            f"data spec {spec!r}: hf: files are not supported for image-text data (a JSONL would need each image "
            "it names fetched too); give an hfds:<owner>/<name>[:<config>][@<revision>]:<split> split of a dataset "
            "with an Image column, a catalog: entry of kind vlm, or local JSONL + image files")


def is_local(spec: str) -> bool:
    return isinstance(download.parse_spec(spec, "vlm"), download.LocalFiles)


def fetch(spec: str, out_dir: str | os.PathLike, columns: dict[str, str] | None = None,
          max_download_mb: float = 2048, retries: int = 4, backoff_s: float = 1.0) -> dict:
    """Fetch an image-text split into `out_dir` (JSONL + images/, manifest of kind "download"); returns
    the manifest. `columns` ({our field: their column}) replaces a catalog entry's mapping."""
    check_spec(spec)
    return download.fetch(spec, out_dir, "vlm", max_download_mb, retries, backoff_s,
                          columns=columns or None, convert=ImageRows)
