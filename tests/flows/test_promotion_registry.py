"""Champion / challenger and the MLflow model registry, for real: a real `mlflow server` (SQLite) on
loopback (the tracker tests' fixture); each promoted model is a new version and the alias `champion`
moves to it."""

import pytest

from mlxcore.tracking import promotion

from tests.flows.test_tracking import mlflow_server  # noqa: F401  (the fixture: a server of this module's own)

mlflow = pytest.importorskip("mlflow")


def test_each_champion_is_a_new_registered_version_with_the_champion_alias(mlflow_server, tmp_path):  # noqa: F811
    from mlflow import MlflowClient

    mlflow_server["wait"]()  # the fixture does not wait for /health (the tracker tests' runs retry instead)
    uri = mlflow_server["uri"]
    first, second = tmp_path / "iter-1", tmp_path / "iter-2"
    for d in (first, second):
        d.mkdir()
        (d / "config.json").write_text("{}")
    one = promotion.register(str(first), "gate", uri, tags={"key": 1, "score": 0.5})
    two = promotion.register(str(second), "gate", uri, tags={"key": 2, "score": 0.7})
    assert (one["version"], two["version"], two["alias"]) == (1, 2, "champion")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias("gate", "champion")
    assert champion.version == "2" and champion.run_id == two["run_id"] and champion.tags["key"] == "2"
    assert champion.tags["local_path"] == str(second.resolve())
    assert client.get_model_version("gate", "1").tags["local_path"] == str(first.resolve())
    # the model files are in the registry's artifact store
    assert [f.path for f in client.list_artifacts(two["run_id"], "model")] == ["model/config.json"]
