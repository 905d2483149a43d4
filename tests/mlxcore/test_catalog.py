"""The data catalog: every entry and mix is well-formed, `catalog:` specs resolve (and fail) before any
request, `mix_sources` gives the weighted source dicts, and `data list` / `data show` print it."""

from __future__ import annotations

import pytest

from mlxcore.data import catalog, hfds
from mlxcore.data.download import DownloadError, HubFile, parse_spec
from mlxcore.data.records import detect_format
from mlxcore.preference import formats as pref_formats

ENTRIES = catalog.entries()


def test_the_catalog_covers_the_datasets_the_issue_names():
    names = {e.name for e in ENTRIES}
    assert {"minimind-pretrain", "minimind-sft-mini", "minimind-identity", "minimind-medical", "minimind-dpo",
            "gsm8k-train", "gsm8k-test", "fineweb-edu", "dolma", "the-stack-v2", "slimpajama", "alpaca", "dolly-15k",
            "ultrafeedback", "ultrafeedback-binarized", "tinyshakespeare"} <= names
    repos = {e.repo for e in ENTRIES}
    assert {"jingyaogong/minimind_dataset", "openai/gsm8k", "HuggingFaceFW/fineweb-edu", "allenai/dolma",
            "bigcode/the-stack-v2", "cerebras/SlimPajama-627B", "tatsu-lab/alpaca", "databricks/databricks-dolly-15k",
            "openbmb/UltraFeedback", "HuggingFaceH4/ultrafeedback_binarized"} <= repos


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_every_entry_has_a_license_a_kind_and_a_spec_that_parses(entry):
    assert entry.license and entry.kind and set(entry.kind) <= set(catalog.KINDS) and entry.description
    if entry.license == "other":
        assert entry.terms
    if entry.spec is None:  # not fetchable directly: says how, and catalog: refuses it with that text
        with pytest.raises(DownloadError) as e:
            parse_spec(f"catalog:{entry.name}")
        assert entry.access.split()[0] in str(e.value)
        return
    inner = parse_spec(entry.spec)
    assert inner.repo == entry.repo
    resolved = parse_spec(f"catalog:{entry.name}", entry.kind[0])
    assert (resolved.catalog, resolved.license, resolved.format) == (entry.name, entry.license, entry.format)
    assert dict(resolved.columns) == entry.columns
    if entry.columns and entry.format != "image-text":  # the mapped rows are in the entry's format (auto finds it)
        row = {ours: _sample(ours) for ours in entry.columns}
        detect = pref_formats.detect_format if entry.format in pref_formats.FORMATS else detect_format
        assert detect(row, "x") == entry.format


def _sample(field: str):
    return [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] if field in (
        "chosen", "rejected", "messages", "conversations") else "some text"


def test_the_known_entries_licenses_and_gating():
    lic = {e.name: e.license for e in ENTRIES}
    assert lic["fineweb-edu"] == lic["dolma"] == "odc-by" and lic["alpaca"] == "cc-by-nc-4.0"
    assert lic["dolly-15k"] == "cc-by-sa-3.0" and lic["gsm8k-train"] == lic["ultrafeedback"] == "mit"
    assert lic["slimpajama"] == lic["the-stack-v2"] == "other" and catalog.get("the-stack-v2").gated
    assert "Common Crawl" in catalog.get("slimpajama").terms and "license" in catalog.get("the-stack-v2").terms


@pytest.mark.parametrize("name", ["recommended-1B", "recommended-10B", "recommended-100B", "recommended-1T"])
def test_every_mix_has_positive_weights_over_catalog_entries_and_its_reasoning(name):
    mix = catalog.mix(name)
    assert sum(mix.weights.values()) > 0 and all(w >= 0 for w in mix.weights.values())
    assert all(catalog.get(n).kind[0] == "pretrain" for n in mix.weights) and len(mix.reasoning) > 200
    sources = catalog.mix_sources(name)
    assert [s["spec"] for s in sources] == [f"catalog:{n}" for n in mix.weights]
    assert [s["weight"] for s in sources] == list(mix.weights.values()) and all(s["epochs"] > 0 for s in sources)
    assert all(set(s) == {"spec", "weight", "epochs"} for s in sources)
    # the budgets grow, and no mix asks a source for more than the passes it allows
    for entry, w in mix.weights.items():
        tokens = catalog.get(entry).size.tokens
        if tokens:
            assert w / sum(mix.weights.values()) * mix.budget_tokens <= tokens * mix.epochs.get(entry, 1)


def test_a_malformed_catalog_names_the_entry_and_field():
    bad = ("datasets:\n  x:\n    description: d\n    kind: pretrain\n    repo: a/b\n    license: other\n"
           "    spec: hf:a/b/f\n    format: text\n")
    with pytest.raises(catalog.CatalogError) as e:
        catalog.parse(bad, "c.yaml")
    assert "c.yaml: datasets.x" in str(e.value) and "terms" in str(e.value)
    mix = ("datasets: {}\nmixes:\n  m:\n    budget_tokens: 10\n    weights: {nothing: 1}\n    reasoning: r\n")
    with pytest.raises(catalog.CatalogError, match="no catalog entry named nothing"):
        catalog.parse(mix)
    with pytest.raises(catalog.CatalogError, match="sum to a positive"):
        catalog.parse("datasets: {}\nmixes:\n  m: {budget_tokens: 1, weights: {a: 0}, reasoning: r}\n")


def test_catalog_specs_resolve_and_unknown_names_fail_with_close_matches():
    gsm = parse_spec("catalog:gsm8k-train")
    assert isinstance(gsm, HubFile) and (gsm.repo, gsm.path) == ("openai/gsm8k", "main/train-00000-of-00001.parquet")
    alpaca = parse_spec("catalog:alpaca")
    assert isinstance(alpaca, hfds.HfDataset) and (alpaca.repo, alpaca.split) == ("tatsu-lab/alpaca", "train")
    assert dict(alpaca.columns) == {"instruction": "instruction", "input": "input", "output": "output"}
    with pytest.raises(DownloadError) as e:
        parse_spec("catalog:gsm8k-trian")
    assert "'catalog:gsm8k-trian'" in str(e.value) and "gsm8k-train" in str(e.value) and "data list" in str(e.value)
    with pytest.raises(catalog.CatalogError, match="recommended-10B"):
        catalog.mix_sources("recommended-10b")


def test_unknown_catalog_names_fail_before_any_request(tmp_path, monkeypatch):
    from tests.hubstandin import HubStandin

    from mlxcore.data.download import fetch

    with HubStandin() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        for spec in ("catalog:nope", "catalog:dolma", "catalog:", "hfds:a/b", "hfds:a/b:train[:0]", "hfds:../b:train"):
            with pytest.raises(DownloadError) as e:
                fetch(spec, tmp_path / "out")
            assert repr(spec) in str(e.value)
        assert hub.log == [] and not (tmp_path / "out").exists()


def test_source_config_takes_catalog_specs():
    from mlxcore.config import SourceConfig

    assert SourceConfig(train=["catalog:gsm8k-train"]).train == ["catalog:gsm8k-train"]


# ------------------------------------------------------------------ the CLI


@pytest.mark.parametrize("main", ["mlxcore", "mlxflow"])
def test_data_list_prints_a_table_and_filters_by_kind(main, capsys):
    run = _main(main)
    assert run(["data", "list"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "kind", "size", "license", "description"]
    assert sum(1 for line in lines[2:] if line.strip()) == len(ENTRIES)
    alpaca = next(line for line in lines if line.startswith("alpaca "))
    assert "sft" in alpaca and "52K rows" in alpaca and "cc-by-nc-4.0" in alpaca
    assert run(["data", "list", "--kind", "preference"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line.strip()]
    assert names == [e.name for e in catalog.entries("preference")] and "alpaca" not in names


def test_data_show_prints_everything_about_an_entry_and_its_mixes(capsys):
    run = _main("mlxflow")
    assert run(["data", "show", "fineweb-edu-10bt"]) == 0
    out = capsys.readouterr().out
    for words in ("HuggingFaceFW/fineweb-edu", "hfds:HuggingFaceFW/fineweb-edu:sample-10BT:train", "odc-by",
                  "attribution", "recommended-1B (weight 0.9)", "{text: text}"):
        assert words in out, (words, out)
    assert run(["data", "show", "recommended-1T"]) == 0  # a mix: its entries, weights and reasoning
    out = capsys.readouterr().out
    assert "fineweb-edu" in out and "0.45" in out and "Muennighoff" in out


@pytest.mark.parametrize("main", ["mlxcore", "mlxflow"])
def test_unknown_names_exit_non_zero_with_close_matches(main, capsys):
    run = _main(main)
    assert run(["data", "show", "finweb-edu"]) == 2
    err = capsys.readouterr().err
    assert "unknown" in err and "fineweb-edu" in err
    with pytest.raises(SystemExit) as e:
        run(["data", "list", "--kind", "nonsense"])
    assert e.value.code == 2


def _main(which: str):
    if which == "mlxcore":
        from mlxcore.cli import main
    else:
        from flows.cli import main
    return main
