"""Throughput of mlxcore's pretokenize stage vs the raw `tokenizers` encoder it is built on, and its memory.

    python bench/pretokenize.py                       # 64 MiB corpus, best of 2
    python bench/pretokenize.py --mb 4 --repeats 1 --json result.json
    python bench/pretokenize.py --text big.txt --tokenizer path/to/hf_tokenizer --workers 4

Corpus: the paragraphs (blank-line separated) of --text (default
$MLXFLOW_TEST_DATA/tinyshakespeare/input.txt, else a deterministic generated English-like
text), written as `{"text": paragraph}` JSONL rows, repeated until the file is --mb MiB; a
second file holds the same rows twice (2x the size). Tokenizer: --tokenizer (a Hugging Face
tokenizer dir; default $MLXFLOW_TEST_DATA/minimind_tokenizer), else a 4096-token byte-level
BPE trained on one copy of the text.

Reference: `Tokenizer.encode_batch(texts, add_special_tokens=False)` of the raw `tokenizers`
tokenizer (the transformers tokenizer's `backend_tokenizer`, as pretokenize uses) over the
texts of the same rows, already parsed and in memory, on the default rayon pool (all cores;
TOKENIZERS_PARALLELISM forced to true), loaded afresh each round so its BPE cache starts cold
as in pretokenize's fresh processes. Only the encode_batch calls are timed.

Ours: `pretokenize({"train": [corpus]}, tok, "pretrain", out, workers=--workers)` in a fresh
Python process, timed from just before the call to just after it (interpreter start and
imports, transformers' included, are not timed; starting the worker pool, reading the file,
writing and hashing the shards are). Its token count is train + val `num_tokens` minus the
number of documents (pretokenize appends one separator token per document), which must equal
the reference's count.

Peak memory of a pretokenize run: each process's own high-water mark (VmHWM in /proc: the main
process's at the end, each child's as last sampled, every 50 ms, before it exits), summed over
the main process and its children (the workers and multiprocessing's resource tracker), an
upper bound of what they held at once; and, as a lower bound, the peak of their summed RSS as
sampled. getrusage's ru_maxrss is not used: Linux carries the old address space's high-water
mark across exec, so a child's RUSAGE_SELF (and a worker's, in RUSAGE_CHILDREN) starts at the
peak of the process that launched it (this benchmark's, holding the texts and the reference's
encodings; for the workers, pretokenize's main process); the JSON keeps both for comparison.

The reference and ours take turns --repeats times (a busy machine slows both alike) and the
best time of each is reported; ratio = ours / reference tok/s, so 1.0 means pretokenize adds
nothing over the bare encoder. The 2x corpus is pretokenized once, for the memory ratio
(2x-input / 1x-input peak RSS; ~1.0 means memory does not grow with the corpus). Note that
pretokenize with --workers 0 tokenizes inputs under 2 MiB in its own process, without workers.
"""

from __future__ import annotations

# Only the standard library at the top: pretokenize's spawned workers re-import this file.
import argparse
import json
import math
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MiB = 1 << 20
VOCAB = 4096
RESULT_TAG = "PRETOKENIZE_BENCH_RESULT "


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mb", type=float, default=64, help="corpus size in MiB (a second corpus is twice that)")
    p.add_argument("--tokenizer", type=Path, help="a Hugging Face tokenizer dir (default: "
                   "$MLXFLOW_TEST_DATA/minimind_tokenizer, else a 4096-token BPE trained on the text)")
    p.add_argument("--text", type=Path, help="source text, paragraphs separated by blank lines (default: "
                   "$MLXFLOW_TEST_DATA/tinyshakespeare/input.txt, else generated text)")
    p.add_argument("--workers", type=int, default=0, help="pretokenize's workers (0: its default)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the best counts")
    p.add_argument("--ref-batch", type=int, default=0,
                   help="rows per reference encode_batch call (0: all rows in one call)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--_child", help=argparse.SUPPRESS)  # internal: one pretokenize run, in a fresh process
    args = p.parse_args(argv)
    if args.mb <= 0 or args.repeats < 1:
        p.error("--mb must be > 0 and --repeats >= 1")
    return args


# ---------------------------------------------------------------- corpus


def generated_text(n_bytes: int = MiB, seed: int = 0) -> str:
    """Deterministic English-like prose: Zipf-distributed invented words, sentences, paragraphs."""
    rng = random.Random(seed)
    common = ("the of and to a in that is was he for it with as his on be at by i this had not are but "
              "from or have an they which one you were her all she there would their we him been has when "
              "who will more no if out so said what up its about into than them can only other new some "
              "could time these two may then do first any my now such like our over man me even most made "
              "after also did many before must through back years where much your way well down should").split()
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "str", "th", "tr", "wh"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "ee", "oo", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "rt", "ck", "th", "ght", "ss"]
    lexicon, seen = list(common), set(common)
    while len(lexicon) < 6000:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((1, 1, 2, 2, 3))))
        word += rng.choice(codas) + rng.choice(("", "", "", "s", "ed", "ing", "ly", "er"))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    cum, total = [], 0.0
    for rank in range(len(lexicon)):
        total += 1.0 / (rank + 1) ** 1.07
        cum.append(total)
    paras, size = [], 0
    while size < n_bytes:
        sentences = []
        for _ in range(rng.randint(1, 7)):
            words = rng.choices(lexicon, cum_weights=cum, k=rng.randint(3, 22))
            if rng.random() < 0.12:
                words.insert(rng.randrange(len(words)), str(rng.randint(1, 2500)))
            for i in range(1, len(words) - 1):
                if rng.random() < 0.07:
                    words[i] += rng.choice((",", ",", ";", ":"))
            words[0] = words[0].capitalize()
            sentences.append(" ".join(words) + rng.choice((".", ".", ".", "!", "?")))
        sep = "\n" if rng.random() < 0.3 else " "
        para = sep.join(sentences)
        if rng.random() < 0.15:  # a speaker's name, as in plays
            para = rng.choice(lexicon[100:400]).upper() + ":\n" + para
        paras.append(para)
        size += len(para.encode()) + 2
    return "\n\n".join(paras) + "\n"


def paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t\r]*\n", text) if p.strip()]


def write_corpus(paras: list[str], path: Path, target_bytes: int | None = None) -> int:
    """JSONL rows of `paras`, once, or cycled until one more would pass `target_bytes`; the row count."""
    lines = [(json.dumps({"text": p}, ensure_ascii=False) + "\n").encode() for p in paras]
    rows = size = 0
    with open(path, "wb") as f:
        while rows < len(lines) if target_bytes is None else (not rows or size + len(lines[rows % len(lines)]) <= target_bytes):
            line = lines[rows % len(lines)]
            f.write(line)
            size += len(line)
            rows += 1
    return rows


def read_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def source_text(args) -> tuple[str, str]:
    data = os.environ.get("MLXFLOW_TEST_DATA")
    path = args.text or (Path(data) / "tinyshakespeare" / "input.txt" if data else None)
    if path is not None and (args.text or path.is_file()):
        return path.read_text(encoding="utf-8"), str(path)
    return generated_text(), "generated English-like text (seed 0)"


def prepare_tokenizer(args, one_copy: Path, out: Path) -> str:
    from mlxcore.config import TokenizerConfig
    from mlxcore.data.tokenizer import load_or_train

    data = os.environ.get("MLXFLOW_TEST_DATA")
    src = args.tokenizer or (Path(data) / "minimind_tokenizer" if data else None)
    if src is not None and (args.tokenizer or src.is_dir()):
        load_or_train(TokenizerConfig(path=str(src)), [], out)
        return str(src)
    train_mb = max(one_copy.stat().st_size / MiB, 0.01)
    load_or_train(TokenizerConfig(vocab_size=VOCAB, train_mb=train_mb),
                  [{"kind": "pretrain", "inputs": {"train": [str(one_copy)]}}], out)
    return f"{VOCAB}-token BPE trained on the text"


# ---------------------------------------------------------------- the two sides


def reference(backend, texts: list[str], batch: int) -> tuple[int, float]:
    """(tokens, seconds of the encode_batch calls)."""
    batch = batch or len(texts)
    tokens, seconds = 0, 0.0
    for start in range(0, len(texts), batch):
        part = texts[start : start + batch]
        t0 = time.perf_counter()
        encodings = backend.encode_batch(part, add_special_tokens=False)
        seconds += time.perf_counter() - t0
        tokens += sum(len(e.ids) for e in encodings)
        del encodings
    return tokens, seconds


def ours(corpus: Path, tok_dir: Path, out: Path, workers: int) -> dict:
    """One pretokenize run in a fresh interpreter; its result dict."""
    spec = json.dumps({"corpus": str(corpus), "tokenizer": str(tok_dir), "out": str(out), "workers": workers})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", spec],
                          stdout=subprocess.PIPE, text=True)
    shutil.rmtree(out, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"the pretokenize run failed (exit status {proc.returncode}); its output:\n{proc.stdout}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def _status_kib(pid: int | str, field: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in KiB; 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


class TreeSampler(threading.Thread):
    """Every `interval` s: the summed RSS of this process and its descendants (its peak is kept),
    and each descendant's own high-water mark (VmHWM: the last value seen before it exits)."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.tree_peak_kib, self.hwm_kib = 0, {}
        self.ok = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")

    def run(self) -> None:
        own = _cmdline(os.getpid())
        while self.ok:
            # not a child still between fork and exec: it reports this process's pages as its own
            kids = [p for p in _descendants(os.getpid()) if _cmdline(p) != own]
            self.tree_peak_kib = max(self.tree_peak_kib, sum(_status_kib(p, "VmRSS") for p in [os.getpid(), *kids]))
            for p in kids:  # the latest value: a new address space (exec) starts a new mark
                self.hwm_kib[p] = _status_kib(p, "VmHWM") or self.hwm_kib.get(p, 0)
            if self.done.wait(self.interval):
                return

    def stop(self) -> None:
        self.done.set()
        self.join()


def child(spec: str) -> None:
    spec = json.loads(spec)
    import mlxcore  # noqa: F401
    from mlxcore.data.pretokenize import INLINE_BYTES, pretokenize
    from transformers import AutoTokenizer  # noqa: F401  (pretokenize loads it; import it untimed)
    import tqdm.auto  # noqa: F401

    size = Path(spec["corpus"]).stat().st_size
    workers = spec["workers"] or (1 if size < INLINE_BYTES else len(os.sched_getaffinity(0)))  # its own rule
    before = _status_kib("self", "VmRSS") / 1024
    sampler = TreeSampler()
    sampler.start()
    t0 = time.perf_counter()
    manifest = pretokenize({"train": [spec["corpus"]]}, spec["tokenizer"], "pretrain", spec["out"],
                           workers=spec["workers"], progress_bar=False)
    seconds = time.perf_counter() - t0
    sampler.stop()
    self_mb = _status_kib("self", "VmHWM") / 1024
    kids_mb = sorted((kib / 1024 for kib in sampler.hwm_kib.values()), reverse=True)
    splits = manifest["splits"]
    num_tokens = sum(s["num_tokens"] for s in splits.values())
    num_docs = sum(s["num_docs"] for s in splits.values())
    print(RESULT_TAG + json.dumps({
        "seconds": seconds, "num_tokens": num_tokens, "num_docs": num_docs, "tokens": num_tokens - num_docs,
        "split_tokens": {k: s["num_tokens"] for k, s in splits.items()}, "workers": workers,
        "input_bytes": size, "rss_before_mb": before, "peak_self_mb": self_mb, "peak_children_mb": kids_mb,
        "peak_rss_mb": self_mb + sum(kids_mb), "tree_peak_mb": sampler.tree_peak_kib / 1024 if sampler.ok else None,
        # getrusage's ru_maxrss, for comparison only: floored by the launching process's peak (see the docstring)
        "rusage_self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rusage_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }), flush=True)


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._child:
        return child(args._child)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # the reference gets the whole rayon pool
    import mlxcore  # noqa: F401  (before anything that might load a BLAS)
    from mlxcore.data.tokenizer import load
    from tokenizers import Tokenizer

    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="pretokenize-bench-"))
    try:
        text, text_name = source_text(args)
        paras = paragraphs(text)
        if not paras:
            sys.exit(f"{text_name}: no paragraphs")
        one_copy, corpus, corpus2 = work / "one_copy.jsonl", work / "corpus_1x.jsonl", work / "corpus_2x.jsonl"
        write_corpus(paras, one_copy)  # each paragraph once: the BPE's training text
        docs = write_corpus(paras, corpus, int(args.mb * MiB))
        with open(corpus2, "wb") as dst:
            for _ in range(2):
                with open(corpus, "rb") as src:
                    shutil.copyfileobj(src, dst, 16 * MiB)
        tok_dir = work / "tokenizer"
        tok_name = prepare_tokenizer(args, one_copy, tok_dir)
        backend_json = load(tok_dir).backend_tokenizer.to_str()  # as pretokenize hands it to its workers
        vocab = Tokenizer.from_str(backend_json).get_vocab_size()
        texts = read_texts(corpus)
        assert len(texts) == docs
        size1, size2 = corpus.stat().st_size, corpus2.stat().st_size
        print(f"corpus: {len(paras):,} paragraphs of {text_name}, cycled to {size1 / MiB:.1f} MiB ({docs:,} rows); "
              f"2x: {size2 / MiB:.1f} MiB")
        print(f"tokenizer: {tok_name} ({vocab:,} tokens); {cores} cores; "
              f"pretokenize workers={args.workers or 'default'}")

        refs, runs = [], []
        for r in range(args.repeats):
            # a fresh tokenizer each round: its BPE cache starts cold, as in pretokenize's fresh processes
            refs.append(reference(Tokenizer.from_str(backend_json), texts, args.ref_batch))
            runs.append(ours(corpus, tok_dir, work / f"out-{r}", args.workers))
            print(f"  round {r + 1}/{args.repeats}: raw encode_batch {refs[-1][1]:.3f} s, "
                  f"pretokenize {runs[-1]['seconds']:.3f} s ({runs[-1]['workers']} worker(s))", flush=True)
        ref_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ref_tokens = refs[0][0]
        for tokens, _ in refs:
            assert tokens == ref_tokens, f"the reference counted {tokens} tokens, earlier {ref_tokens}"
        for run in runs:
            assert run["num_docs"] == docs, f"pretokenize wrote {run['num_docs']} documents for {docs} rows"
            assert run["tokens"] == ref_tokens, (f"pretokenize: {run['tokens']} tokens (without separators), "
                                                 f"raw encode_batch: {ref_tokens}")
        double = ours(corpus2, tok_dir, work / "out-2x", args.workers)
        assert double["num_docs"] == 2 * docs and double["tokens"] == 2 * ref_tokens, \
            f"2x corpus: {double['num_docs']} docs / {double['tokens']} tokens, expected {2 * docs} / {2 * ref_tokens}"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ref_s = min(s for _, s in refs)
    best = min(runs, key=lambda run: run["seconds"])
    single = min(runs, key=lambda run: run["peak_rss_mb"])  # the lowest 1x peak: the ratio errs towards growth
    ref_tps, our_tps = ref_tokens / ref_s, ref_tokens / best["seconds"]
    ratio = our_tps / ref_tps
    mem_ratio = double["peak_rss_mb"] / single["peak_rss_mb"]
    tree_ratio = (double["tree_peak_mb"] / single["tree_peak_mb"]
                  if double["tree_peak_mb"] and single["tree_peak_mb"] else None)

    print()
    print(f"{'best of ' + str(args.repeats):<32} {'tokens':>12} {'seconds':>9} {'tok/s':>12}")
    print(f"{'raw tokenizers encode_batch':<32} {ref_tokens:>12,} {ref_s:>9.3f} {ref_tps:>12,.0f}")
    print(f"{'mlxcore pretokenize':<32} {best['tokens']:>12,} {best['seconds']:>9.3f} {our_tps:>12,.0f}")
    print(f"{'ratio (pretokenize / raw)':<32} {'':>12} {'':>9} {ratio:>11.2f}x")
    print()
    print(f"{'pretokenize memory, MB':<34} {'1x':>9} {'2x':>9} {'2x / 1x':>8}")
    print(f"{'  workers':<34} {single['workers']:>9} {double['workers']:>9}")
    print(f"{'  RSS before the call':<34} {single['rss_before_mb']:>9.1f} {double['rss_before_mb']:>9.1f}")
    print(f"{'  peak RSS, main process':<34} {single['peak_self_mb']:>9.1f} {double['peak_self_mb']:>9.1f}")
    for i in range(max(len(single["peak_children_mb"]), len(double["peak_children_mb"]))):
        one, two = (f"{run['peak_children_mb'][i]:>9.1f}" if i < len(run["peak_children_mb"]) else f"{'-':>9}"
                    for run in (single, double))
        print(f"{'  peak RSS, child process ' + str(i + 1):<34} {one} {two}")
    print(f"{'  peak RSS, sum of the processes':<34} {single['peak_rss_mb']:>9.1f} {double['peak_rss_mb']:>9.1f} "
          f"{mem_ratio:>8.2f}")
    if tree_ratio is not None:
        print(f"{'  sampled peak of the summed RSS':<34} {single['tree_peak_mb']:>9.1f} {double['tree_peak_mb']:>9.1f} "
              f"{tree_ratio:>8.2f}")
    print(f"(raw encode_batch: this process peaked at {ref_peak_mb:.1f} MB with the texts in memory)")
    if single["workers"] != double["workers"]:
        print(f"note: the 1x and 2x runs used {single['workers']} and {double['workers']} worker(s) (pretokenize "
              "tokenizes inputs under 2 MiB in-process), so their memory is not like for like; "
              "use --mb >= 8 or set --workers")
    print(f"pretokenize / raw encode_batch: {ratio:.2f}x   peak memory 2x-input / 1x-input: {mem_ratio:.2f}")

    if args.json:
        result = {
            "corpus": {"text": text_name, "paragraphs": len(paras), "rows": docs, "bytes_1x": size1, "bytes_2x": size2},
            "tokenizer": tok_name, "vocab_size": vocab, "cores": cores, "repeats": args.repeats,
            "reference": {"tokens": ref_tokens, "seconds": ref_s, "tokens_per_s": ref_tps,
                          "all_seconds": [s for _, s in refs], "process_peak_rss_mb": ref_peak_mb},
            "pretokenize": {"tokens": best["tokens"], "seconds": best["seconds"], "tokens_per_s": our_tps,
                            "all_seconds": [run["seconds"] for run in runs], "runs": runs},
            "pretokenize_2x": double,
            "ratio": ratio, "peak_rss_mb_1x": single["peak_rss_mb"], "peak_rss_mb_2x": double["peak_rss_mb"],
            "memory_ratio": mem_ratio, "tree_memory_ratio": tree_ratio,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    assert math.isfinite(ratio) and ratio > 0 and math.isfinite(mem_ratio) and mem_ratio > 0


if __name__ == "__main__":
    main()
