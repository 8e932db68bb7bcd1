"""One tracking server for every command: MLFLOW_TRACKING_URI, else the local one; no stray stores."""

import subprocess

import pytest

from config import settings
from service import demo, mlflow_store
from tests.support import BIN, ROOT, free_port

UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"


def stray_stores(folder):
    """What MLflow leaves in a working directory when it falls back to a local store."""
    return sorted(p.name for p in folder.iterdir() if p.name in ("mlflow.db", "mlruns", "mlartifacts"))


def test_the_default_is_the_local_tracking_server_the_demo_starts():
    assert settings.tracking_uri({}) == settings.LOCAL_TRACKING_URI == demo.tracking_server_url()
    assert settings.tracking_uri({"MLFLOW_TRACKING_URI": " https://mlflow.example.com "}) == "https://mlflow.example.com"


@pytest.mark.parametrize("uri", ["127.0.0.1:5000", "localhost:5000", "mlflow.example.com:443/prefix"])
def test_a_server_address_without_a_scheme_is_one_clear_error(uri, monkeypatch):
    with pytest.raises(settings.ConfigError, match=f"MLFLOW_TRACKING_URI: '{uri}' has no scheme: write http://{uri}"):
        settings.tracking_uri({"MLFLOW_TRACKING_URI": uri})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(mlflow_store.FetchError, match="has no scheme"):
        mlflow_store.connect()


def flask_model(*args, cwd, env):
    """``flask --app wsgi model ARGS`` run from another folder, as a user in their own directory would."""
    overrides = {"PYTHONPATH": str(ROOT), "PRED_MODEL_PATH": None, "PRED_MODEL_URI": None, **env}
    return subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "model", *args],
        cwd=cwd, env=settings.child_environment(overrides), capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
@pytest.mark.parametrize("command", [("verify", UNKNOWN_RUN), ("download", UNKNOWN_RUN)])
def test_commands_look_on_the_local_server_by_default_and_leave_no_store(command, tmp_path):
    result = flask_model(*command, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": None, "MODELS_DIR": str(tmp_path / "m")})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    # Whether or not a tracking server runs on this machine's port 5000, the command asked it.
    assert last.startswith("Error: ") and "at http://127.0.0.1:5000" in last, result.stderr
    assert "Traceback" not in result.stderr
    assert stray_stores(tmp_path) == []


@pytest.mark.slow
def test_a_missing_scheme_stops_the_command_in_one_line(tmp_path):
    result = flask_model("download", UNKNOWN_RUN, cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "127.0.0.1:5000"})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "Error: MLFLOW_TRACKING_URI: '127.0.0.1:5000' has no scheme: write http://127.0.0.1:5000 "
        "(or https://127.0.0.1:5000)"
    ]
    assert stray_stores(tmp_path) == []


def test_an_unreachable_local_server_says_how_to_start_it():
    port = free_port()
    with pytest.raises(mlflow_store.FetchError) as raised:
        mlflow_store.connect(f"http://127.0.0.1:{port}")
    assert "make mlflow" not in str(raised.value), "only the default server is started by make mlflow"
    if demo.tracking_server_answers(settings.LOCAL_TRACKING_URI):
        pytest.skip("a tracking server is running on this machine's port 5000")
    with pytest.raises(mlflow_store.FetchError, match="connection refused: start it with `make mlflow`"):
        mlflow_store.connect()


def test_a_lookup_in_a_local_store_that_does_not_exist_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for uri in ("sqlite:///mlflow.db", f"sqlite:///{tmp_path}/mlflow.db", "./mlruns", f"file://{tmp_path}/mlruns"):
        with pytest.raises(mlflow_store.FetchError, match=f"cannot open the MLflow tracking store at {uri}: .* does not exist"):
            mlflow_store.fetch_model_uri("models:/digits@champion", tmp_path / "models", uri)
        assert stray_stores(tmp_path) == [], uri


def test_a_store_is_created_only_when_asked(tmp_path):
    uri = f"sqlite:///{tmp_path}/new.db"
    tracking = mlflow_store.connect(uri, create=True)
    assert (tmp_path / "new.db").is_file()
    assert tracking.client.get_experiment_by_name("Default") is not None
    assert mlflow_store.connect(uri).uri == uri, "an existing store opens without create"


def test_long_mlflow_errors_end_at_a_sentence_not_mid_url(tmp_path):
    (tmp_path / "mlruns").mkdir()
    # MLflow refuses its old folder store with a paragraph that ends in a URL and advice.
    with pytest.raises(mlflow_store.FetchError) as raised:
        mlflow_store.connect(f"file://{tmp_path}/mlruns").client.get_run(UNKNOWN_RUN)
    message = str(raised.value)
    assert message.startswith(f"cannot open the MLflow tracking store at file://{tmp_path}/mlruns: ")
    assert message.endswith("."), message
    assert "maintenance mode" in message and "\n" not in message
    assert not message.rstrip(".").endswith(("http", "htt", "https://mlflow"))
    words = mlflow_store.first_line(ValueError("word " * 100))
    assert words.endswith("word...") and len(words) <= 303

