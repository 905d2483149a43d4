"""Data files read as a stream of chunks, so nothing here holds a whole corpus; `mlxcore.data.records`
turns their rows into training examples.

Read by `read_chunks`:
  *.jsonl / *.json(l) lines   one JSON object per line (the line number is the row's place)
  *.parquet                   row batches via pyarrow (the "line" is the 1-based row number)
  *.json                      a JSON array of objects (read whole: arrays do not stream)
  *.txt                       plain text; documents are separated by blank lines (pretraining)
  *.csv / *.tsv               a header row, then one row per line (quoted fields may span lines;
                              the line is where the row starts); every value is a string
  *.arrow / *.feather         Arrow IPC streams or files (`datasets`' cache and `save_to_disk`
                              files), row batches as parquet's
  + .gz / .bz2 / .xz / .zst   any of the text formats compressed (Dolma's .json.gz, FineWeb's
                              .jsonl.zst dumps), read through the codec as they stream
A directory `datasets`' `save_to_disk` wrote stands for its Arrow files (`saved_dataset_files`).
All are UTF-8; a UTF-8 byte-order mark at the very start of a file is skipped (Windows tools
write one), anywhere else it is data. Other encodings fail naming the file and line.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from mlxcore.data.errors import DataError

CHUNK_ROWS = 1024
CHUNK_BYTES = 256 << 10  # per worker task: small enough to balance the last tasks
MAX_LINE_BYTES = 8 << 20  # a longer JSONL line is refused before it is held in memory

BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark: Windows tools start files with it


def skip_bom(f) -> int:
    """Move a binary file at its start past a UTF-8 BOM; the bytes skipped (0 or 3). A BOM only
    means something as the file's first bytes: later ones are data (and fail as such). `f` needs
    `peek` (any buffered or decompressing reader), so nothing is read twice."""
    if f.peek(len(BOM))[:len(BOM)] == BOM:
        f.read(len(BOM))
        return len(BOM)
    return 0


# ---------------------------------------------------------------- reading files as chunks

# a compressed file is read through its codec, then as the file its name is without the suffix
CODECS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
# what decompressing a damaged or truncated file raises (pyarrow's zstd: OSError)
_CODEC_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)


def codec(path: Path) -> tuple[str | None, str]:
    """(the codec of a compressed file or None, the file's lower-case name without the codec's suffix)."""
    name = path.name.lower()
    for suffix, name_of in CODECS.items():
        if name.endswith(suffix):
            return name_of, name[: -len(suffix)]
    return None, name


class _Stream(io.RawIOBase):
    """A pyarrow input stream as a raw file, so that io.BufferedReader gives it peek and readline."""

    def __init__(self, stream):
        self.stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.stream.read(len(b))
        b[: len(data)] = data
        return len(data)


class _Reader:
    """A data file's bytes, decompressed if its name says so: `f` (read, peek, readline, iterate)
    and `pos()`, how far into the file on disk it has read (the progress a bar counts against the
    file's size). A damaged file fails naming it and its codec."""

    def __init__(self, path: Path):
        self.path, (self.codec, _) = path, codec(path)
        self.raw = open(path, "rb")
        try:
            if self.codec == "gzip":
                self.f = gzip.GzipFile(fileobj=self.raw, mode="rb")
            elif self.codec == "bz2":
                self.f = bz2.BZ2File(self.raw)
            elif self.codec == "xz":
                self.f = lzma.LZMAFile(self.raw)
            elif self.codec == "zstd":  # pyarrow's codec: no zstandard package needed
                import pyarrow as pa

                stream = pa.CompressedInputStream(pa.PythonFile(self.raw, mode="r"), "zstd")
                self.f = io.BufferedReader(_Stream(stream), 1 << 16)
            else:
                self.f = self.raw
        except Exception:
            self.raw.close()
            raise

    def pos(self) -> int:
        return self.raw.tell()

    def failed(self, e: Exception) -> DataError:
        return DataError(f"{self.path}: not a readable {self.codec} file ({type(e).__name__}: {e}); "
                         "is it whole, and compressed as its name says?")

    def close(self) -> None:
        if self.f is not self.raw:
            self.f.close()
        self.raw.close()


@contextmanager
def open_data(path: Path):
    """`_Reader` of `path`; decompression errors inside the block become one DataError naming the file."""
    reader = _Reader(path)
    try:
        yield reader
    except _CODEC_ERRORS as e:
        if reader.codec is None:
            raise
        raise reader.failed(e) from None
    finally:
        reader.close()


def file_kind(path: Path) -> str:
    """How a data file is read: jsonl, json-array, txt, csv, tsv, parquet or arrow."""
    compressed, name = codec(path)
    if name.endswith(".parquet") or name.endswith(".arrow") or name.endswith(".feather"):
        if compressed:
            raise DataError(f"{path}: a compressed {name.rsplit('.', 1)[1]} file; that format compresses its "
                            "own columns, so decompress the file first")
        return "parquet" if name.endswith(".parquet") else "arrow"
    if name.endswith(".txt") or name.endswith(".md"):
        return "txt"
    if name.endswith(".csv") or name.endswith(".tsv"):
        return name[-3:]
    if name.endswith(".json"):
        with open_data(path) as r:
            skip_bom(r.f)
            head = r.f.read(4096).lstrip()
        if head.startswith(b"["):
            return "json-array"
        if head.split(b"\n", 1)[0].strip() == b"{":  # a pretty-printed object: one document, not JSON lines
            return "json-array"
    return "jsonl"


class LineBlock(NamedTuple):
    """Whole JSONL lines as one bytes block (cheap to hand to a worker), from line `first` on."""

    first: int
    data: bytes


def chunk_items(chunk) -> list[tuple[int, Any]]:
    """(line, payload) items of a chunk; a LineBlock is split here, blank lines skipped."""
    if not isinstance(chunk, LineBlock):
        return chunk
    lines = chunk.data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return [(chunk.first + i, line) for i, line in enumerate(lines) if line.strip()]


def read_chunks(path: str | Path, rows: int | None = None, max_bytes: int | None = None) -> Iterator[tuple[Any, int]]:
    """Yield (chunk, bytes_read_so_far); `chunk_items(chunk)` gives its (line, payload) items.

    JSONL comes as LineBlocks of about `max_bytes` (decoded and parsed by whoever encodes them,
    in parallel); parquet, Arrow, CSV and JSON arrays as lists of row dicts; txt as lists of
    documents. The bytes are those of the file on disk (compressed, where it is).
    """
    path, rows, max_bytes = Path(path), rows or CHUNK_ROWS, max_bytes or CHUNK_BYTES
    kind = file_kind(path)
    if kind == "parquet":
        yield from _parquet_chunks(path, rows)
    elif kind == "arrow":
        yield from _arrow_chunks(path, rows)
    else:
        with open_data(path) as reader:
            if kind == "json-array":
                yield from _array_chunks(path, reader, rows)
            elif kind == "txt":
                yield from _text_chunks(reader, rows, max_bytes)
            elif kind in ("csv", "tsv"):
                yield from _csv_chunks(path, reader, rows, kind)
            else:
                yield from _line_blocks(path, reader, max_bytes)


def _line_blocks(path: Path, reader: _Reader, max_bytes: int):
    first, rest, f = 1, b"", reader.f
    skip_bom(f)
    while block := f.read(max_bytes):
        block = rest + block
        cut = block.rfind(b"\n") + 1
        if not cut:  # one line longer than a block: read on, up to the limit
            if len(block) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{first}: a single line of over {MAX_LINE_BYTES >> 20} MB; one row may "
                                "not be that long (is this a JSON array, or not JSONL at all?)")
            rest = block
            continue
        yield LineBlock(first, block[:cut]), reader.pos()
        first += block.count(b"\n", 0, cut)
        rest = block[cut:]
    if rest:
        yield LineBlock(first, rest), reader.pos()


def _text_chunks(reader: _Reader, rows: int, max_bytes: int):
    """Plain text: documents are runs of non-blank lines."""
    items, size, doc, doc_line, f = [], 0, [], 0, reader.f
    skip_bom(f)
    for lineno, line in enumerate(f, 1):
        if line.strip():
            doc_line = doc_line or lineno
            doc.append(line)
            continue
        if not doc:
            continue
        items.append((doc_line, b"".join(doc).rstrip(b"\r\n")))
        size += items[-1][1].__len__()
        doc, doc_line = [], 0
        if len(items) >= rows or size >= max_bytes:
            yield items, reader.pos()
            items, size = [], 0
    if doc:
        items.append((doc_line, b"".join(doc).rstrip(b"\r\n")))
    if items:
        yield items, reader.pos()


def _csv_chunks(path: Path, reader: _Reader, rows: int, kind: str):
    """CSV / TSV with a header row: each row a dict of the header's names to strings. A row with more
    fields than the header, a header without names, or text that is not UTF-8 fails naming the line."""
    delimiter = "\t" if kind == "tsv" else ","
    skip_bom(reader.f)

    def lines():  # decoded one physical line at a time, so an error names its own line
        for n, raw in enumerate(reader.f, 1):
            yield utf8(raw, f"{path}:{n}")

    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))  # long documents: csv's default is 128 KB
    # strict: a stray quote fails here, naming its row, instead of swallowing the lines after it
    table = csv.reader(lines(), delimiter=delimiter, strict=True)
    line = 1
    try:
        header = next(table, None)
        if header is None:
            return
        if not all(h.strip() for h in header) or len(set(header)) != len(header):
            raise DataError(f"{path}:1: the header row must name every column once, got {header[:12]}")
        items = []
        line = table.line_num + 1
        for values in table:
            if values:  # a blank line is no row
                if len(values) > len(header):
                    raise DataError(f"{path}:{line}: {len(values)} fields, but the header (line 1) names "
                                    f"{len(header)}; is a value's {delimiter!r} unquoted?")
                items.append((line, dict(zip(header, values + [None] * (len(header) - len(values))))))
                if len(items) >= rows:
                    yield items, reader.pos()
                    items = []
            line = table.line_num + 1
        if items:
            yield items, reader.pos()
    except csv.Error as e:
        raise DataError(f"{path}:{line}: not readable as {kind.upper()}: {e}") from None


def _parquet_chunks(path: Path, rows: int):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise DataError(f"{path}: not a readable parquet file: {e}") from None
    total, done, row = path.stat().st_size, 0, 0
    n = max(pf.metadata.num_rows, 1)
    for batch in pf.iter_batches(batch_size=rows):
        items = [(row + i + 1, r) for i, r in enumerate(batch.to_pylist())]
        row += len(items)
        done = total * row // n
        yield items, done


def _arrow_chunks(path: Path, rows: int):
    """An Arrow IPC stream (what `datasets` writes: its cache and `save_to_disk` files) or IPC file
    (Feather v2): record batches, re-cut to `rows` rows; the "line" is the 1-based row number."""
    import pyarrow as pa

    source = pa.memory_map(str(path))
    try:
        try:
            batches = iter(pa.ipc.open_stream(source))
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                file = pa.ipc.open_file(source)
            except pa.ArrowInvalid as e:
                raise DataError(f"{path}: not a readable Arrow IPC stream or file: {e}") from None
            batches = (file.get_batch(i) for i in range(file.num_record_batches))
        row = 0
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:  # cut off or damaged after its first batches
                raise DataError(f"{path}: not a readable Arrow file after row {row} ({type(e).__name__}: {e}); "
                                "is it whole?") from None
            if batch is None:
                break
            for start in range(0, batch.num_rows, rows):
                part = batch.slice(start, rows).to_pylist()
                yield [(row + i + 1, r) for i, r in enumerate(part)], source.tell()
                row += len(part)
    finally:
        source.close()


def _array_chunks(path: Path, reader: _Reader, rows: int):
    """A JSON document read whole, since JSON documents do not stream: an array of rows (Alpaca's
    layout), or an object whose one list of objects is the rows (`{"version": ..., "data": [...]}`,
    what `datasets` reads with `field="data"`)."""
    skip_bom(reader.f)
    raw = reader.f.read()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"{path}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(path)
        raise DataError(f"{where}: invalid JSON {'array ' if raw.lstrip()[:1] == b'[' else ''}file: {e}") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if len(lists) != 1:
            raise DataError(f"{path}: one JSON object with the keys {sorted(data)[:12]}, not rows; "
                            + (f"which of {lists} holds the rows? Extract it: jq -c '.{lists[0]}[]' {path.name} > rows.jsonl"
                               if lists else "no key holds a list of objects (rows)"))
        data = data[lists[0]]
    size = reader.pos()
    for start in range(0, len(data), rows):
        part = data[start : start + rows]
        yield [(start + i + 1, r if isinstance(r, dict) else json.dumps(r).encode()) for i, r in enumerate(part)], \
            size * (start + len(part)) // max(len(data), 1)


def utf8(payload: bytes, where: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text (byte 0x{payload[e.start]:02x} at column {e.start + 1})") from None


def saved_dataset_files(path: Path) -> list[Path]:
    """The Arrow files of a directory `datasets`' `save_to_disk` wrote (its `state.json` lists them,
    in order). A saved DatasetDict names its splits in the error; any other directory is refused."""
    name = str(path).rstrip("/")
    if (path / "dataset_dict.json").is_file():
        try:
            splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            splits = sorted(d.name for d in path.iterdir() if (d / "state.json").is_file())
        raise DataError(f"{name!r} is a DatasetDict saved by datasets; name one split's directory: "
                        + ", ".join(f"'{name}/{s}'" for s in splits))
    if not (path / "state.json").is_file():
        if (path / "train.jsonl").is_file():  # mlx-lm's data layout: train / valid / test.jsonl
            val = (f"['{name}/valid.jsonl']" if (path / "valid.jsonl").is_file()
                   else "[] (val_fraction of train held out)")
            raise DataError(f"{name!r} is a directory in mlx-lm's layout; give its splits apart, e.g. "
                            f"train=['{name}/train.jsonl'] val={val} (a glob of it would train on its "
                            "valid and test rows too)")
        raise DataError(f"{name!r} is a directory; name its files with a glob such as '{name}/*.jsonl' "
                        "(or give a directory datasets' save_to_disk wrote)")
    try:
        names = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path / 'state.json'}: not a datasets save_to_disk state ({type(e).__name__}: {e})") from None
    for n in names:
        if not isinstance(n, str) or Path(n).name != n or n in (".", ".."):
            raise DataError(f"{path / 'state.json'}: {n!r} is not a file name in that directory")
        if not (path / n).is_file():
            raise DataError(f"{path / n} (listed in {path / 'state.json'}) is missing")
    files = [path / n for n in names]
    if not files:
        raise DataError(f"{path / 'state.json'} lists no data files")
    return [f.resolve() for f in files]
