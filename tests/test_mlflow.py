"""The model lifecycle against a real ``mlflow server``: train, fetch by run id or URI, serve, verify."""

import hashlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
import yaml
from mlflow import MlflowClient
from packaging.requirements import Requirement
from packaging.version import Version

from config.settings import child_environment
from service import create_app, demo, mlflow_store
from service.formats import read_model
from service.images import decode_image
from service.registry import ModelLoadError, ModelRegistry
from service.verify import held_out_pngs
from tests.support import (
    BIN,
    ROOT,
    cutting_proxy,
    free_port,
    mlflow_server,
    run_gunicorn,
    stop,
    wait_until_ready,
    write_template_checkpoint,
)

pytestmark = pytest.mark.slow

ADMIN_PASSWORD = "correct-horse-battery-staple-42"
UNKNOWN_RUN = "0123456789abcdef0123456789abcdef"
MODEL_NAME = "digits"
ALIAS = "champion"
EPOCHS = 2
# A few requests' worth of uploads, under MAX_FILES.
UPLOAD_BATCH = 60


@pytest.fixture(scope="module")
def tracking_url(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url


@pytest.fixture(scope="module")
def auth_tracking_url(tmp_path_factory):
    """A basic-auth tracking server whose admin is ``admin`` / ADMIN_PASSWORD; readers need credentials."""
    store = tmp_path_factory.mktemp("mlflow-auth")
    config = store / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{store / 'auth.db'}\n"
        "admin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-test-secret-for-csrf",
    }
    with mlflow_server(store, env, app_name="basic-auth") as url:
        yield url


def service_env(tracking_uri, models_dir, **extra):
    """The environment a user's shell would have: a tracking server, a models folder, no model set."""
    return {
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MODELS_DIR": str(models_dir),
        "PRED_MODEL_PATH": None,
        "PRED_MODEL_URI": None,
        "PRED_MODEL_UUID": None,
        "VERIFY_MODEL_ON_START": None,
        "MLFLOW_TRACKING_USERNAME": None,
        "MLFLOW_TRACKING_PASSWORD": None,
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def flask_model(*args, env, timeout=300):
    """Run ``flask --app wsgi model ARGS`` as a user would; return the finished process."""
    environment = child_environment(env)
    return subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "model", *args],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def flask_model_in_process(monkeypatch, *args, env):
    """Run ``flask model ARGS`` through click in this process (quicker than a new interpreter)."""
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, str(value))
    app = create_app({"TESTING": True, "MODELS_DIR": env["MODELS_DIR"]})
    result = app.test_cli_runner().invoke(args=["model", *args])
    # the shape of subprocess.run's result, so that both kinds are checked alike
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def assert_one_line_error(result, *fragments):
    """A failed command: non-zero exit, ending in one ``Error:`` line with ``fragments``, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def nothing_served_in(models_dir, run_id):
    """True when no model of ``run_id`` (nor any half-download) is left under ``models_dir``."""
    return not (Path(models_dir) / run_id).exists() and not list(Path(models_dir).rglob("model.pt"))


@pytest.fixture(scope="module")
def trained_run(tracking_url, tmp_path_factory):
    """A run trained by ``flask model train`` (a short run), registered as MODEL_NAME @ALIAS."""
    result = flask_model(
        "train", "--epochs", str(EPOCHS), "--train-limit", "600", "--register-name", MODEL_NAME, "--alias", ALIAS,
        env=service_env(tracking_url, tmp_path_factory.mktemp("unused-models")),
    )
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    assert len(run_id) == 32 and "\n" not in run_id, result.stdout  # stdout carries the run id alone
    TRAIN_OUTPUT[run_id] = result.stderr
    return run_id


# What ``flask model train`` printed on stderr, by run id.
TRAIN_OUTPUT = {}


def predict_over_http(url, pngs):
    predictions = []
    for start in range(0, len(pngs), UPLOAD_BATCH):
        files = [("image_file", (name, data, "image/png")) for name, data, _ in pngs[start : start + UPLOAD_BATCH]]
        response = requests.post(f"{url}/api/v1/model/predict", files=files, timeout=60)
        assert response.status_code == 200, response.text
        predictions += response.json()["data"]
    return predictions


def predict_in_process(model_path, pngs):
    classifier, _ = read_model(Path(model_path).read_bytes())
    predictions = []
    for start in range(0, len(pngs), UPLOAD_BATCH):
        chunk = pngs[start : start + UPLOAD_BATCH]
        predictions += classifier.predict([decode_image(data, name, 1_000_000) for name, data, _ in chunk])
    return predictions


def test_training_logs_params_metrics_checkpoint_and_plots(tracking_url, trained_run):
    client = MlflowClient(tracking_url)
    run = client.get_run(trained_run)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["epochs"] == str(EPOCHS) and params["architecture"] == "digit_cnn"
    assert {"seed", "split_seed", "test_fraction", "learning_rate", "batch_size"} <= set(params)
    for metric in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        history = client.get_metric_history(trained_run, metric)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), metric
    assert 0.3 < run.data.metrics["test_accuracy"] <= 1.0
    files = {f.path for f in client.list_artifacts(trained_run)} | {
        f.path for f in client.list_artifacts(trained_run, "model")
    }
    assert {"model/model.pt", "confusion_matrix.png", "sample_predictions.png"} <= files
    version = client.get_model_version_by_alias(MODEL_NAME, ALIAS)
    assert version.run_id == trained_run


def test_the_logged_model_pins_only_versions_a_package_index_serves(tracking_url, trained_run, tmp_path):
    client = MlflowClient(tracking_url)
    (model,) = client.search_logged_models(
        experiment_ids=[client.get_run(trained_run).info.experiment_id],
        filter_string=f"source_run_id = '{trained_run}'",
    )
    folder = mlflow_store.download_logged_model(model.model_id, tmp_path, tracking_uri=tracking_url).path
    environment = yaml.safe_load((folder / "python_env.yaml").read_text())
    conda = yaml.safe_load((folder / "conda.yaml").read_text())
    pip_lists = [
        (folder / "requirements.txt").read_text().splitlines(),
        [line for line in environment["dependencies"] if not line.startswith("-r")],
        next(item["pip"] for item in conda["dependencies"] if isinstance(item, dict)),
    ]
    pins = {}
    for line in (line.strip() for lines in pip_lists for line in lines):
        if not line or line.startswith(("#", "-")):
            continue
        requirement = Requirement(line)
        for spec in requirement.specifier:
            version = Version(spec.version)
            assert version.local is None, f"{line}: a local version label, which no package index serves"
            if spec.operator == "==":
                installed = Version(importlib.metadata.version(requirement.name)).public
                assert str(version) == installed, f"{line}: installed here is {installed}"
                pins[requirement.name] = str(version)
    assert "torch" in pins, pip_lists
    # MLflow warns of "mismatches between the model's dependencies and the current Python environment".
    assert "mismatch" not in TRAIN_OUTPUT[trained_run].lower(), TRAIN_OUTPUT[trained_run]
    # And pip itself finds every pinned version on the package index this machine installs from.
    served = {name: index_versions(name) for name in pins}
    if all(versions is None for versions in served.values()):
        pytest.skip("no package index answers here: the pins were checked for local labels only")
    for name, version in pins.items():
        assert served[name] is None or Version(version) in served[name], f"{name}=={version} is not on the index"


def index_versions(name):
    """The versions of ``name`` that pip finds on its package index, or None when it cannot ask."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", name], capture_output=True, text=True, timeout=120,
    )
    listed = next((line for line in result.stdout.splitlines() if line.startswith("Available versions:")), None)
    if result.returncode != 0 or listed is None:
        return None
    return {Version(version.strip()) for version in listed.partition(":")[2].split(",")}


def test_download_by_run_id_then_gunicorn_predicts_as_in_process(tracking_url, trained_run, tmp_path):
    models_dir = tmp_path / "models"
    result = flask_model("download", trained_run, env=service_env(tracking_url, models_dir))
    assert result.returncode == 0, result.stderr
    model_path = models_dir / trained_run / "model" / "model.pt"
    assert result.stdout.strip() == f"export PRED_MODEL_PATH={model_path}"
    # The model's own file only: the run's plots stay on the tracking server.
    assert [p.name for p in (models_dir / trained_run).iterdir()] == ["model"]
    assert [p.name for p in (models_dir / trained_run / "model").iterdir()] == ["model.pt"]
    assert "downloading run" in result.stderr and "1 file(s)" in result.stderr  # progress
    assert "Downloading artifacts" in result.stderr  # MLflow's progress bar, for a person at a terminal

    # Complete files: a second download needs no server at all.
    gone = f"http://127.0.0.1:{free_port()}"
    again = flask_model("download", trained_run, env=service_env(gone, models_dir))
    assert again.returncode == 0, again.stderr
    assert again.stdout == result.stdout

    run = MlflowClient(tracking_url).get_run(trained_run)
    pngs = held_out_pngs(int(run.data.params["split_seed"]), float(run.data.params["test_fraction"]))
    expected = predict_in_process(model_path, pngs)
    env = service_env(tracking_url, models_dir, PRED_MODEL_PATH=model_path)
    with run_gunicorn(tmp_path, env=env, workers=1) as server:
        served = predict_over_http(server.url, pngs)
        version = requests.get(f"{server.url}/api/v1/model/version", timeout=10).json()["data"]
    assert [p["prediction"] for p in served] == [p.label for p in expected]
    assert [p["confidence"] for p in served] == pytest.approx([p.confidence for p in expected], abs=1e-5)
    accuracy = sum(p["prediction"] == label for p, (_, _, label) in zip(served, pngs)) / len(pngs)
    assert accuracy == pytest.approx(run.data.metrics["test_accuracy"], abs=0.01)
    assert version["model_uuid"] == trained_run
    assert version["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()


def test_pred_model_uri_runs_fetches_once_serves_and_passes_its_start_up_check(tracking_url, trained_run, tmp_path):
    models_dir = tmp_path / "models"
    uri = f"runs:/{trained_run}/model/model.pt"
    env = service_env(tracking_url, models_dir, PRED_MODEL_URI=uri, VERIFY_MODEL_ON_START="1")
    with run_gunicorn(tmp_path, env=env, workers=2) as server:
        version = requests.get(f"{server.url}/api/v1/model/version", timeout=10).json()["data"]
        (name, data, _), = held_out_pngs()[:1]
        response = requests.post(f"{server.url}/api/v1/model/predict", files={"image_file": (name, data)}, timeout=30)
        log = server.wait_for("parity check passed", count=1)  # in the master, for both workers
    model_path = models_dir / trained_run / "model" / "model.pt"
    assert response.status_code == 200, response.text
    assert version["model_uuid"] == trained_run
    assert version["model_uri"] == uri
    assert version["model_path"] == str(model_path)
    assert version["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert log.count("downloading run") == 1, log  # in the master, once for both workers
    assert log.count("parity check passed") == 1, log  # likewise: the workers take the master's result
    assert "Downloading artifacts" not in log  # no progress bar in a server's log


def test_pred_model_uri_with_a_registered_alias(tracking_url, trained_run, tmp_path):
    models_dir = tmp_path / "models"
    env = service_env(tracking_url, models_dir, PRED_MODEL_URI=f"models:/{MODEL_NAME}@{ALIAS}")
    with run_gunicorn(tmp_path, env=env, workers=1) as server:
        version = requests.get(f"{server.url}/api/v1/model/version", timeout=10).json()["data"]
    assert version["model_uuid"] == trained_run
    assert (version["model_name"], version["model_version"]) == (MODEL_NAME, "1")
    assert version["model_uri"] == f"models:/{MODEL_NAME}@{ALIAS}"
    assert Path(version["model_path"]) == models_dir / trained_run / "model" / "model.pt"


def test_registered_version_numbers_resolve_too(tracking_url, trained_run, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", raising=False)
    fetched = mlflow_store.fetch_model_uri(f"models:/{MODEL_NAME}/1", tmp_path / "models", tracking_url)
    assert (fetched.run_id, fetched.model_name, fetched.model_version) == (trained_run, MODEL_NAME, "1")
    assert fetched.path == tmp_path / "models" / trained_run / "model" / "model.pt"
    assert "Downloading artifacts" not in capfd.readouterr().err
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # put back as it was
    with pytest.raises(mlflow_store.FetchError, match="not found"):
        mlflow_store.fetch_model_uri(f"models:/{MODEL_NAME}@no-such-alias", tmp_path / "models", tracking_url)


def test_a_model_that_fails_its_start_up_check_is_never_ready(tracking_url, trained_run, tmp_path):
    # The run's own weights, served with the labels in the wrong order: what train/serve skew looks like.
    tracking = mlflow_store.connect(tracking_url)
    downloaded = mlflow_store.download_run(trained_run, tmp_path / "models", tracking=tracking)
    checkpoint = torch.load(downloaded, weights_only=True)
    checkpoint["metadata"]["labels"] = [str(d) for d in reversed(range(10))]
    skewed = tmp_path / "skewed" / "models" / trained_run / "model" / "model.pt"
    skewed.parent.mkdir(parents=True)
    torch.save(checkpoint, skewed)
    env = service_env(
        tracking_url, tmp_path / "models", PRED_MODEL_PATH=skewed, VERIFY_MODEL_ON_START="1", API_KEY="k3y"
    )
    with run_gunicorn(tmp_path, env=env, workers=1, ready=False) as server:
        wait_until_ready(server.url, server.process, server.log_path, timeout=60, path="/health/live")
        anonymous = requests.get(f"{server.url}/health/ready", timeout=10)
        ready = requests.get(f"{server.url}/health/ready", headers={"Authorization": "Bearer k3y"}, timeout=10)
        (name, data, _), = held_out_pngs()[:1]
        predict = requests.post(
            f"{server.url}/api/v1/model/predict", files={"image_file": (name, data)},
            headers={"Authorization": "Bearer k3y"}, timeout=30,
        )
    assert anonymous.status_code == 503
    assert anonymous.json() == {"status": "unavailable", "reason": "the parity check failed"}
    assert ready.status_code == 503 and ready.json()["reason"] == "the parity check failed"
    assert "parity check failed" in ready.json()["detail"] and "points apart" in ready.json()["detail"]
    assert predict.status_code == 503


def test_verify_command_passes_a_run_and_fails_a_skewed_model(tracking_url, trained_run, tmp_path, monkeypatch):
    env = service_env(tracking_url, tmp_path / "models")
    passed = flask_model_in_process(monkeypatch, "verify", trained_run, env=env)
    assert passed.returncode == 0, passed.stderr
    assert passed.stdout.startswith("parity check passed:") and trained_run in passed.stdout

    checkpoint = torch.load(tmp_path / "models" / trained_run / "model" / "model.pt", weights_only=True)
    checkpoint["metadata"]["labels"] = [str(d) for d in reversed(range(10))]
    torch.save(checkpoint, tmp_path / "skewed.pt")
    failed = flask_model_in_process(
        monkeypatch, "verify", str(tmp_path / "skewed.pt"), "--run-id", trained_run, env=env
    )
    assert_one_line_error(failed, "parity check failed", "points apart", trained_run)


def test_download_errors_are_one_line_and_leave_nothing(tracking_url, tmp_path, monkeypatch):
    models_dir = tmp_path / "models"

    unknown = flask_model("download", UNKNOWN_RUN, env=service_env(tracking_url, models_dir))
    assert_one_line_error(unknown, UNKNOWN_RUN, "not found", tracking_url)

    unreachable_url = f"http://127.0.0.1:{free_port()}"
    unreachable = flask_model_in_process(
        monkeypatch, "download", UNKNOWN_RUN, env=service_env(unreachable_url, models_dir)
    )
    assert_one_line_error(unreachable, "cannot reach the MLflow tracking server", unreachable_url)

    client = MlflowClient(tracking_url)
    run = client.create_run(client.create_experiment("no-model-here"))
    notes = tmp_path / "notes.txt"
    notes.write_text("no model in this run")
    client.log_artifact(run.info.run_id, str(notes))
    client.set_terminated(run.info.run_id)
    without_model = flask_model_in_process(
        monkeypatch, "download", run.info.run_id, env=service_env(tracking_url, models_dir)
    )
    assert_one_line_error(without_model, "has no model/model.pt", "notes.txt")

    not_a_run = flask_model_in_process(monkeypatch, "download", "../../etc", env=service_env(tracking_url, models_dir))
    assert_one_line_error(not_a_run, "not an MLflow run id")

    assert not models_dir.exists() or not any(models_dir.iterdir())


def test_download_with_credentials_and_refused_credentials(auth_tracking_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    client = MlflowClient(auth_tracking_url)
    run = client.create_run(client.create_experiment("secured"))
    checkpoint = write_template_checkpoint(tmp_path / "upload" / "model.pt")
    client.log_artifact(run.info.run_id, str(checkpoint), "model")
    client.set_terminated(run.info.run_id)
    run_id = run.info.run_id
    models_dir = tmp_path / "models"

    wrong_password = "not-the-password-123"
    refused = flask_model_in_process(
        monkeypatch, "download", run_id,
        env=service_env(
            auth_tracking_url, models_dir, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=wrong_password
        ),
    )
    assert_one_line_error(refused, "refused the credentials", "MLFLOW_TRACKING_PASSWORD")
    assert wrong_password not in refused.stdout + refused.stderr
    anonymous = flask_model_in_process(monkeypatch, "download", run_id, env=service_env(auth_tracking_url, models_dir))
    assert_one_line_error(anonymous, "refused the credentials")
    assert not models_dir.exists() or not any(models_dir.iterdir())

    allowed = flask_model(
        "download", run_id,
        env=service_env(
            auth_tracking_url, models_dir, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD
        ),
    )
    assert allowed.returncode == 0, allowed.stderr
    assert ADMIN_PASSWORD not in allowed.stdout + allowed.stderr
    model_path = models_dir / run_id / "model" / "model.pt"
    assert model_path.read_bytes() == checkpoint.read_bytes()


UNOPENABLE_STORE = "sqlite:////proc/no-such-dir/mlflow.db"


def test_a_local_store_that_cannot_be_opened_is_one_fetch_error(tmp_path):
    message = f"cannot open the MLflow tracking store at {UNOPENABLE_STORE}"
    with pytest.raises(mlflow_store.FetchError, match=message) as raised:
        mlflow_store.connect(UNOPENABLE_STORE)
    assert "\n" not in str(raised.value)
    with pytest.raises(mlflow_store.FetchError, match=message):
        mlflow_store.fetch_model_uri(f"runs:/{UNKNOWN_RUN}/model/model.pt", tmp_path / "models", UNOPENABLE_STORE)
    with pytest.raises(mlflow_store.FetchError, match=message):
        mlflow_store.fetch_model_uri(f"models:/{MODEL_NAME}@{ALIAS}", tmp_path / "models", UNOPENABLE_STORE)
    assert not (tmp_path / "models").exists()


def test_a_runs_uri_already_on_disk_needs_no_tracking_store(tmp_path):
    model_path = write_template_checkpoint(tmp_path / "models" / UNKNOWN_RUN / "model" / "model.pt")
    fetched = mlflow_store.fetch_model_uri(f"runs:/{UNKNOWN_RUN}/model/model.pt", tmp_path / "models", UNOPENABLE_STORE)
    assert (fetched.path, fetched.run_id) == (model_path, UNKNOWN_RUN)


def test_download_refuses_a_planted_link_that_leads_outside_the_models_folder(tmp_path, monkeypatch):
    outside = write_template_checkpoint(tmp_path / "elsewhere" / "model.pt")
    planted = tmp_path / "models" / UNKNOWN_RUN / "model" / "model.pt"
    planted.parent.mkdir(parents=True)
    planted.symlink_to(outside)

    result = flask_model_in_process(
        monkeypatch, "download", UNKNOWN_RUN, env=service_env(UNOPENABLE_STORE, tmp_path / "models")
    )

    assert_one_line_error(result, "leads outside", "symbolic link")
    assert "export PRED_MODEL_PATH" not in result.stdout


def test_the_cli_fails_in_one_line_when_the_local_store_cannot_be_opened(tmp_path, monkeypatch):
    env = service_env(UNOPENABLE_STORE, tmp_path / "models")
    model_file = str(write_template_checkpoint(tmp_path / "model.pt"))
    for args in (("download", UNKNOWN_RUN), ("verify", UNKNOWN_RUN), ("verify", model_file, "--run-id", UNKNOWN_RUN)):
        result = flask_model_in_process(monkeypatch, *args, env=env)
        assert_one_line_error(result, "cannot open the MLflow tracking store", UNOPENABLE_STORE)


def test_an_interrupted_tracking_server_start_stops_the_server(tmp_path, monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        started.append(real_popen(["sleep", "60"], **kwargs))  # stands in for ``mlflow server``
        return started[-1]

    def interrupted(url):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo.subprocess, "Popen", popen)
    monkeypatch.setattr(demo, "tracking_server_answers", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            demo.start_tracking_server(tmp_path / "store", "127.0.0.1", free_port())
        assert started and started[0].poll() is not None
    finally:
        for process in started:
            stop(process)


@pytest.mark.parametrize("mode", ["dropped", "truncated"])
def test_an_interrupted_download_leaves_nothing_that_is_served(tracking_url, trained_run, tmp_path, mode, monkeypatch):
    models_dir = tmp_path / "models"
    with cutting_proxy(tracking_url, mode) as proxy_url:
        broken = flask_model_in_process(monkeypatch, "download", trained_run, env=service_env(proxy_url, models_dir))
    assert_one_line_error(broken, trained_run, "model/model.pt")
    assert nothing_served_in(models_dir, trained_run)
    assert not list(models_dir.iterdir())  # no half-download left behind either

    # Serving the path the download would have filled fails to start: no half model is served.
    models = ModelRegistry.from_config({"PRED_MODEL_PATH": str(models_dir / trained_run / "model" / "model.pt")})
    with pytest.raises(ModelLoadError, match="does not exist"):
        models.load()

    completed = flask_model_in_process(monkeypatch, "download", trained_run, env=service_env(tracking_url, models_dir))
    assert completed.returncode == 0, completed.stderr
    read_model((models_dir / trained_run / "model" / "model.pt").read_bytes())


def test_the_cli_commands_are_registered_with_the_app():
    app = create_app({"TESTING": True})
    result = app.test_cli_runner().invoke(args=["model", "--help"])
    assert result.exit_code == 0
    for command in ("download", "train", "verify", "serve", "tracking-server", "inspect"):
        assert command in result.output


def test_alias_without_a_registered_name_is_refused():
    app = create_app({"TESTING": True})
    result = app.test_cli_runner().invoke(args=["model", "train", "--alias", "x"])
    assert result.exit_code == 2
    assert "--alias needs --register-name" in result.output
