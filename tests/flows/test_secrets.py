"""API keys reach the endpoint but never Prefect: a config names an environment variable or a
Prefect Secret block, the task reads the key when it makes its client, and no flow-run
parameter holds it. A literal key in a config is refused, naming file, line and key."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from prefect.client.orchestration import get_client

from tests.ollama_standin import OllamaStandin

pytestmark = pytest.mark.usefixtures("prefect_server")


def _bench_yaml(path, root, url: str, name: str, **key) -> str:
    path.write_text(yaml.safe_dump({
        "name": name, "out_dir": str(root / "runs"), "suites": ["copy"], "examples": 3, "max_tokens": 8,
        "targets": [{"kind": "openai", "url": url, "model": "qwen3:0.6b", "name": "served", "workers": 2, **key}]}))
    return str(path)


def _all_parameters() -> dict[str, str]:
    """Every flow run on the server: its id -> its parameters as JSON."""
    with get_client(sync_client=True) as client:
        runs, offset = [], 0
        while page := client.read_flow_runs(limit=200, offset=offset):
            runs += page
            offset += len(page)
    return {str(r.id): json.dumps(r.parameters, default=str) for r in runs}


def _run_bench(config: str) -> None:
    from flows.cli import main

    assert main(["run", "bench", "--config", config]) == 0


def _assert_key_sent_and_not_stored(hub: OllamaStandin, key: str, before: dict[str, str], run_name: str) -> None:
    chats = hub.requests("/v1/chat/completions")
    assert len(chats) == 3 and hub.requests("/v1/models")  # the health probe, then one request per question
    assert all(r.headers.get("authorization") == f"Bearer {key}" for r in hub.requests())
    params = _all_parameters()
    new = {k: v for k, v in params.items() if k not in before}
    assert any(run_name in v for v in new.values()), "the bench flow run was not recorded"
    assert not [k for k, v in params.items() if key in v], "an API key is stored in a flow run's parameters"


def test_a_key_from_an_environment_variable_is_sent_but_never_a_flow_parameter(tmp_path, monkeypatch):
    key = f"sk-env-{uuid.uuid4().hex}"
    monkeypatch.setenv("MLXFLOW_TEST_API_KEY", key)
    before = _all_parameters()
    with OllamaStandin() as hub:
        _run_bench(_bench_yaml(tmp_path / "b.yaml", tmp_path, hub.url, "keyed-env", api_key_env="MLXFLOW_TEST_API_KEY"))
        _assert_key_sent_and_not_stored(hub, key, before, "keyed-env")


def test_a_key_from_a_prefect_secret_block_is_sent_but_never_a_flow_parameter(tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    key = f"sk-block-{uuid.uuid4().hex}"
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    Secret(value=key).save("mlxflow-test-key", overwrite=True)
    before = _all_parameters()
    with OllamaStandin() as hub:
        _run_bench(_bench_yaml(tmp_path / "b.yaml", tmp_path, hub.url, "keyed-block", api_key_secret="mlxflow-test-key"))
        _assert_key_sent_and_not_stored(hub, key, before, "keyed-block")


def test_openai_endpoints_still_default_to_OPENAI_API_KEY(monkeypatch):
    from mlxcore.clients.chat import Teacher

    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")
    with OllamaStandin() as hub:
        with Teacher(url=hub.url, api="openai", retries=0) as t:
            t.chat([{"role": "user", "content": "hi"}])
        with Teacher(url=hub.url, api="ollama", retries=0) as t:  # not sent to an Ollama server
            t.chat([{"role": "user", "content": "hi"}])
        openai, ollama = hub.requests()
    assert openai.headers["authorization"] == "Bearer sk-default" and "authorization" not in ollama.headers


def test_a_named_key_that_is_missing_fails_before_any_request(monkeypatch):
    from mlxcore.clients.chat import Teacher
    from mlxcore.clients.secrets import SecretError

    monkeypatch.delenv("MLXFLOW_UNSET_KEY", raising=False)
    with OllamaStandin() as hub:
        with pytest.raises(SecretError, match="environment variable MLXFLOW_UNSET_KEY is not set"):
            Teacher(url=hub.url, api="openai", api_key_env="MLXFLOW_UNSET_KEY")
        with pytest.raises(SecretError, match="names a Prefect Secret block"):  # mlxcore alone cannot read blocks
            Teacher(url=hub.url, api="openai", api_key_secret="some-block")
        assert hub.requests() == []


def test_a_literal_key_is_refused_naming_file_line_and_the_fix(tmp_path, capsys):
    from flows.cli import main

    key = f"sk-literal-{uuid.uuid4().hex}"
    before = _all_parameters()
    with OllamaStandin() as hub:
        config = _bench_yaml(tmp_path / "bench.yaml", tmp_path, hub.url, "literal", api_key=key)
        assert main(["run", "bench", "--config", config]) == 2
        err = capsys.readouterr().err
        line = next(i for i, text in enumerate(open(config), 1) if "api_key:" in text)
        assert f"bench.yaml:{line}: targets.0.api_key: " in err
        assert "api_key_env: OPENAI_API_KEY" in err and "api_key_secret: <block name>" in err and key not in err

        teacher = tmp_path / "distill.yaml"
        teacher.write_text(f"teacher:\n  api: openai\n  api_key: {key}\n")
        assert main(["run", "distill", "--config", str(teacher)]) == 2
        err = capsys.readouterr().err
        assert "distill.yaml:3: teacher.api_key: " in err and "api_key_env" in err and key not in err

        assert main(["run", "distill", "--set", f"teacher.api_key={key}"]) == 2  # --set too
        assert "teacher.api_key: a literal API key is not accepted" in capsys.readouterr().err.replace("Value error, ", "")
        assert main(["run", "distill", "--set", f"teacher.api_key_env={key}"]) == 2  # a key where a name goes
        assert "not the key itself" in capsys.readouterr().err
        assert hub.requests() == []
    assert _all_parameters().keys() == before.keys()  # refused before any flow run exists
