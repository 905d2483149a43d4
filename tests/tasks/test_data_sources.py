"""The data tasks' checks that run before any download: a mixture's column mapping on local files."""

import json

import pytest

from mlxcore.config import DataConfig, MixSource, SourceConfig
from mlxcore.data.records import DataError


def test_a_mapped_column_a_local_file_lacks_fails_before_any_download(tmp_path):
    from tasks.data import sources

    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps({"text": "a b c"}) + "\n")
    bad.write_text(json.dumps({"content": "a b c"}) + "\n")
    data = DataConfig(pretrain=SourceConfig(sources=[MixSource(spec=str(good), weight=0.5),
                                                     MixSource(spec=str(bad), weight=0.5, columns={"text": "body"})]))
    with pytest.raises(DataError, match=rf"{bad}:1: data.pretrain.sources.1.columns.text: no column 'body'"):
        sources(data, "pretrain", str(tmp_path / "run"), None)
    assert not (tmp_path / "run").exists()  # no download stage ran, not even the good source's
