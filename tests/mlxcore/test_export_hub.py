"""Hub pushes through the real huggingface_hub client against a loopback stand-in of the upload API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlxcore.export.hub import PushError, push
from tests.hubstandin import HubStandin, closed_endpoint

TOKEN, READ_TOKEN = "hf_write_token_for_tests", "hf_read_only_token"
REPO = "me/tiny-mlx"


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with HubStandin(tokens={TOKEN: "write", READ_TOKEN: "read"}) as h:
        yield h


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A real quantized MLX export of a tiny model (plus a README with metadata and a stray temp file)."""
    from mlxcore.data.tokenizer import train_bpe
    from mlxcore.export.mlx_quant import export_mlx_quantized
    from tests.conftest import hf_model_dir

    root = tmp_path_factory.mktemp("push")
    train_bpe(["a tiny model to push to the hub"] * 30, 300, 1, root / "tok")
    hf_model_dir(root / "base", root / "tok", "qwen3", vocab_size=512)
    out = root / "mlx-8bit"
    export_mlx_quantized(root / "base", out, bits=8)
    (out / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: mlx\n---\n# tiny\n")
    (out / ".tmp-model.safetensors~host~1~2~3").write_bytes(b"half-written")  # a writer still running
    return out


def _local(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and not p.name.startswith(".tmp-")}


def test_push_uploads_every_file_byte_identical_with_the_bearer_token(hub, export_dir):
    result = push(export_dir, REPO, token=TOKEN, endpoint=hub.endpoint, commit_message="tiny 8-bit")
    local = _local(export_dir)
    assert {"model.safetensors", "config.json", "tokenizer.json", "manifest.json", "README.md"} <= set(local)
    remote = hub.files(REPO)
    assert {p: remote[p] for p in local} == local  # every byte, every file
    assert set(remote) == set(local) | {".gitattributes"}  # the temp file stayed home
    assert hub.api_calls and {c["authorization"] for c in hub.api_calls} == {f"Bearer {TOKEN}"}
    assert [c["path"] for c in hub.api_calls] == ["/api/repos/create", "/api/validate-yaml",
                                                  f"/api/models/{REPO}/preupload/main",
                                                  f"/api/models/{REPO}/commit/main"]
    (commit,) = hub.commits
    assert commit["summary"] == "tiny 8-bit" and set(commit["added"]) == set(local)
    assert result["commit"] == commit["oid"] and result["commit_url"].endswith(commit["oid"])
    assert result["files"] == sorted(local) and result["bytes"] == sum(map(len, local.values()))
    assert result["url"] == f"{hub.endpoint}/{REPO}" and result["endpoint"] == hub.endpoint
    assert not hub.is_private(REPO)


def test_pushed_model_downloads_and_loads_with_mlx_lm(hub, export_dir, tmp_path):
    import mlx_lm
    from huggingface_hub import snapshot_download

    from mlxcore.data.download import _library_online

    push(export_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    with _library_online():
        got = snapshot_download(REPO, endpoint=hub.endpoint, token=TOKEN, local_dir=tmp_path / "dl")
    downloaded = _local(Path(got))
    assert all(downloaded[p] == data for p, data in _local(export_dir).items())
    model, tokenizer = mlx_lm.load(got)
    assert tokenizer.encode("a tiny model") and model.model.layers[0].self_attn.q_proj.bits == 8


def test_hf_endpoint_and_hf_token_from_the_environment(hub, export_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = push(export_dir, REPO, private=True)
    assert result["endpoint"] == hub.endpoint and hub.is_private(REPO)
    assert {c["authorization"] for c in hub.api_calls} == {f"Bearer {TOKEN}"}
    again = push(export_dir, REPO)  # nothing changed: no second commit, the head is reported
    assert again["commit"] == result["commit"] and len(hub.commits) == 1


def test_revision_and_path_in_repo(hub, export_dir):
    push(export_dir, REPO, token=TOKEN, endpoint=hub.endpoint)
    result = push(export_dir, REPO, token=TOKEN, endpoint=hub.endpoint, revision="v2", path_in_repo="mlx-8bit/")
    assert result["path_in_repo"] == "mlx-8bit" and all(f.startswith("mlx-8bit/") for f in result["files"])
    branch, main = hub.files(REPO, "v2"), hub.files(REPO, "main")
    assert branch["mlx-8bit/config.json"] == (export_dir / "config.json").read_bytes()
    assert not any(p.startswith("mlx-8bit/") for p in main)  # main untouched
    assert hub.commits[-1]["revision"] == "v2"


@pytest.mark.parametrize("token, status, words", [
    ("hf_wrong", 401, "token was rejected"),
    (READ_TOKEN, 403, "may not write"),
])
def test_rejected_tokens_give_a_clear_error(hub, export_dir, token, status, words):
    with pytest.raises(PushError) as e:
        push(export_dir, REPO, token=token, endpoint=hub.endpoint)
    msg = str(e.value)
    assert words in msg and f"HTTP {status}" in msg and REPO in msg and hub.endpoint in msg
    assert "\n" not in msg and not hub.commits and not hub.repo_exists(REPO)


def test_no_token_fails_before_any_request(hub, export_dir, monkeypatch, tmp_path):
    from huggingface_hub import constants

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(PushError, match="no token; set HF_TOKEN") as e:
        push(export_dir, REPO, endpoint=hub.endpoint)
    assert REPO in str(e.value) and hub.endpoint in str(e.value) and not hub.log


def test_unreachable_hub_and_offline_mode(export_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    nowhere = closed_endpoint()
    with pytest.raises(PushError, match="cannot be reached") as e:
        push(export_dir, REPO, token=TOKEN, endpoint=nowhere)
    assert nowhere in str(e.value) and "HF_ENDPOINT" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PushError, match="HF_HUB_OFFLINE"):
        push(export_dir, REPO, token=TOKEN, endpoint=nowhere)


def test_bad_arguments(hub, export_dir, tmp_path):
    with pytest.raises(PushError, match="not a repo id"):
        push(export_dir, "no-owner", token=TOKEN, endpoint=hub.endpoint)
    with pytest.raises(PushError, match="not a directory"):
        push(tmp_path / "missing", REPO, token=TOKEN, endpoint=hub.endpoint)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PushError, match="no files"):
        push(tmp_path / "empty", REPO, token=TOKEN, endpoint=hub.endpoint)
    with pytest.raises(PushError, match="leaves the repo"):
        push(export_dir, REPO, token=TOKEN, endpoint=hub.endpoint, path_in_repo="../x")
    assert not hub.log
    assert os.environ.get("HF_HUB_OFFLINE") == "0"
