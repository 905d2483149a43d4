"""The bad-input corpus (tests/data/bad): each file or spec fails with file:line (or the spec),
a non-zero exit, and no output directory, whether through `mlxflow pretokenize` or the pipeline."""

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

BAD = Path(__file__).resolve().parent.parent / "data" / "bad"
REPO = BAD.parent.parent.parent

CASES = {  # file: (expected message after "<path>", kind)
    "malformed_json.jsonl": (":2: invalid JSON: Expecting ',' delimiter", "sft"),
    "empty.jsonl": (": no rows (empty file)", "sft"),
    "missing_field.jsonl": (":2: missing field 'answer' (gsm8k format)", "sft"),
    "wrong_type.jsonl": (":2: field 'output' must be a string, got int", "sft"),
    "non_utf8.jsonl": (":2: not UTF-8 text (byte 0xe9 at column 47)", "sft"),
    "utf16.jsonl": (":1: not UTF-8 text (byte 0xff at column 1)", "sft"),
    "wrong_vocab_ids.jsonl": (":2: token id 99999 is out of range for the tokenizer's 512 tokens", "sft"),
    "array_with_string.json": (":2: expected a JSON object, got str", "sft"),
}


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_file_fails_naming_file_and_line_with_no_output(name, small_data, tmp_path, capsys):
    expect, kind = CASES[name]
    out = tmp_path / "out"
    code = main(["pretokenize", str(BAD / name), "--kind", kind, "--tokenizer", str(small_data["tok"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"{BAD / name}{expect}" in err, err
    _no_output(out)


def test_a_10mb_single_line_is_refused_without_reading_it_all(small_data, tmp_path, capsys):
    big = tmp_path / "one_line.jsonl"
    big.write_bytes(b'{"text": "' + b"a" * (10 << 20) + b'"}\n')
    out = tmp_path / "out"
    code = main(["pretokenize", str(big), "--kind", "pretrain", "--tokenizer", str(small_data["tok"]), "--out", str(out)])
    assert code == 1 and f"{big}:1: a single line of over 8 MB" in capsys.readouterr().err
    _no_output(out)


@pytest.mark.parametrize("spec, expect", [
    ("s3:bucket/data.jsonl", "unknown spec prefix 's3:'"),
    ("hf:owner/name/../../etc/passwd", "'..'"),
    ("minimind:../secrets.jsonl", "bare file name"),
    ("gsm8k:validation", "gsm8k"),
])
def test_bad_specs_fail_naming_the_spec_before_any_network(spec, expect, small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a request would fail differently
    out = tmp_path / "out"
    code = main(["pretokenize", spec, "--kind", "sft", "--tokenizer", str(small_data["tok"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and f"data spec '{spec}'" in err and expect in err, err
    _no_output(out)


def test_the_console_command_exits_non_zero(small_data, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "flows.cli", "pretokenize", str(BAD / "missing_field.jsonl"), "--kind", "sft",
                          "--tokenizer", str(small_data["tok"]), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and f"{BAD / 'missing_field.jsonl'}:2: missing field 'answer'" in run.stderr
    _no_output(out)


@pytest.fixture
def _server(prefect_server):
    """The session's Prefect test server (else each pipeline run would start its own)."""


def _pipeline(tmp_path, *sets):
    return main(["run", "pipeline", "--config", str(REPO / "configs/smoke.yaml"), "--set", f"out_dir={tmp_path}", *sum((["--set", s] for s in sets), [])])


@pytest.mark.usefixtures("_server")
def test_pipeline_with_a_bad_file_fails_at_pretokenize_and_leaves_no_partial_stage(tmp_path, capsys):
    code = _pipeline(tmp_path, f"data.sft.train=[{BAD / 'wrong_type.jsonl'}]")
    assert code == 1 and f"{BAD / 'wrong_type.jsonl'}:2: field 'output' must be a string" in capsys.readouterr().err
    run = tmp_path / "smoke"
    assert not list(run.glob("pretokenize-*")) or all((d / "manifest.json").is_file() for d in run.glob("pretokenize-*"))
    assert not list(run.glob(".tmp-*")) and not list(run.glob("pretrain-*"))


@pytest.mark.usefixtures("_server")
def test_pipeline_with_a_traversal_spec_fails_naming_it(tmp_path, capsys):
    with _run_log_records() as records:
        code = _pipeline(tmp_path, "data.sft.train=['hf:a/b@main/../../x.jsonl']")
    err = capsys.readouterr().err
    assert code == 1 and "data spec 'hf:a/b@main/../../x.jsonl'" in err, err
    # Prefect's own failure records: one line each, no stack (tasks/logs.py). (Where its console
    # handler writes depends on which test set it up; the records are what every handler gets.)
    failed = [r for r in records if "DownloadError" in r.getMessage()]
    assert len(failed) >= 2 and all(r.exc_info is None for r in failed), [(r.name, r.getMessage()) for r in failed]
    assert not list((tmp_path / "smoke").glob("download-*"))


@pytest.mark.usefixtures("_server")
def test_model_vocab_that_does_not_match_the_tokenizer_fails_naming_the_field(tmp_path, capsys):
    code = _pipeline(tmp_path, "model.vocab_size=999")  # the smoke BPE has at most 512 tokens
    err = capsys.readouterr().err
    assert code == 1 and "model.vocab_size=999 does not match the BPE to train (at most 512 tokens)" in err, err
    assert not (tmp_path / "smoke").exists() or not list((tmp_path / "smoke").iterdir())  # no stage dir at all


@pytest.mark.usefixtures("_server")
def test_a_vocab_size_the_tokenizer_cannot_have_fails_before_any_stage_dir(tmp_path, capsys, test_data):
    tok = test_data / "minimind_tokenizer"  # 6400 tokens
    code = _pipeline(tmp_path, "model.vocab_size=512", f"tokenizer.path={tok}")
    err = capsys.readouterr().err
    assert code == 1 and f"model.vocab_size=512 does not match {tok} (6400 tokens)" in err, err
    assert not (tmp_path / "smoke").exists() or not list((tmp_path / "smoke").iterdir())


@pytest.mark.usefixtures("_server")
def test_a_vocab_size_the_trained_bpe_missed_fails_before_pretokenize(tmp_path, capsys):
    code = _pipeline(tmp_path, "model.vocab_size=300")  # the BPE learns more than 300 tokens
    err = capsys.readouterr().err
    assert code == 1 and "model.vocab_size=300 does not match" in err and "tokens); unset it" in err, err
    stages = [p.name.split("-")[0] for p in (tmp_path / "smoke").iterdir() if p.name not in ("report", "report.md")]
    assert sorted(stages) == ["data", "tokenizer"]
    assert "Failed" in (tmp_path / "smoke" / "report.md").read_text()  # the card of what ran, and how it ended


@contextlib.contextmanager
def _run_log_records():
    """The ERROR records of Prefect's run loggers as their handlers get them (after the loggers'
    filters, tasks/logs.py's among them), as a list. Kept by a filter added last, since Prefect's
    logging setup may run again mid-run and replace the loggers' handlers (filters stay)."""
    import logging

    records = []

    class Keep(logging.Filter):
        def filter(self, record):
            if record.levelno >= logging.ERROR:
                records.append(record)
            return True

    keep, loggers = Keep(), [logging.getLogger(n) for n in ("prefect.task_runs", "prefect.flow_runs")]
    # another test's library may have run logging.config.dictConfig, which disables every logger it
    # does not name (disable_existing_loggers): these two log in a user's process, so here too
    disabled = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.addFilter(keep)
        logger.disabled = False
    try:
        yield records
    finally:
        for logger, was in zip(loggers, disabled):
            logger.removeFilter(keep)
            logger.disabled = was


def test_run_logs_keep_the_traceback_of_anything_but_an_input_error(monkeypatch):
    """tasks/logs.py drops the stack only from mlxcore's input errors; a bug keeps its traceback,
    and MLXFLOW_TRACEBACKS=1 keeps them all."""
    import logging

    import tasks  # noqa: F401  (installs the filter)
    from mlxcore.data.errors import DataError

    logger = logging.getLogger("prefect.task_runs")
    with _run_log_records() as records:
        for exc in (DataError("x.jsonl:2: invalid JSON"), KeyError("a bug")):
            try:
                raise exc
            except Exception:
                logger.error("Task run failed with exception", exc_info=True)
        monkeypatch.setenv("MLXFLOW_TRACEBACKS", "1")
        try:
            raise DataError("x.jsonl:2: invalid JSON")
        except DataError:
            logger.error("Task run failed with exception", exc_info=True)
    assert [r.exc_info is not None for r in records] == [False, True, True]
