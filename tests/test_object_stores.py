"""Models kept in object stores, read straight from there as MLflow's own client reads them: a real
S3-compatible server (``moto_server``, checking signatures) and a real GCS emulator, behind a real
tracking server that does not proxy artifacts."""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass

import boto3
import pytest
import requests

from service import mlflow_store
from tests.support import (
    BIN, ROOT, SERVICE_VARIABLES, free_port, mlflow_server, run_gunicorn, stop, write_template_checkpoint,
)
from tests.test_rollout import continuous_load, served_version, wait_for_version

MODEL, ALIAS = "store-digits", "champion"
CLEAN = {name: None for name in SERVICE_VARIABLES if name != "WEB_CONCURRENCY"}
# No credentials but the ones a test gives: not from a profile, a file or an instance's metadata.
NO_AMBIENT_AWS = {
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_PROFILE": None, "AWS_SESSION_TOKEN": None,
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3:
    endpoint: str
    key_id: str
    secret: str

    def env(self, **changes):
        """The variables a user of this store sets, with ``changes``."""
        return {
            **NO_AMBIENT_AWS, "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret, **changes,
        }

    def client(self):
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=self.key_id, aws_secret_access_key=self.secret,
        )


def wait_for_port(port, process, log, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """``moto_server`` on a free loopback port, checking every request's signature: its first three
    requests (unsigned) make a user, its key and its policy; from then on only that key works."""
    folder, port = tmp_path_factory.mktemp("s3"), free_port()
    log = folder / "moto.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_port(port, process, log)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="serving")
        key = iam.create_access_key(UserName="serving")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="serving", PolicyName="all", PolicyDocument=json.dumps(policy))
        store = S3(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        store.client().create_bucket(Bucket="mlflow")
        yield store
    finally:
        stop(process)


# Logs, as a team does: a run's model/model.pt, an MLflow logged model, and a model.pt copied to
# the store by hand and registered from its path, with no run. Prints the versions.
REGISTER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import boto3, mlflow, torch
    from mlflow import MlflowClient
    sys.path.insert(0, sys.argv[1])
    from service.architectures import DigitCNN
    from tests.support import write_template_checkpoint

    model, bucket = sys.argv[2], sys.argv[3]
    client = MlflowClient()
    client.create_registered_model(model)
    versions = {}
    with mlflow.start_run() as run:
        write_template_checkpoint(Path("run/model.pt"), seed=1)
        mlflow.log_artifact("run/model.pt", artifact_path="model")
    versions["run_id"] = run.info.run_id
    versions["run"] = client.create_model_version(model, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version
    torch.manual_seed(2)
    with mlflow.start_run():
        logged = mlflow.pytorch.log_model(
            DigitCNN().eval(), name="model", input_example=torch.rand(1, 1, 28, 28).numpy(),
            metadata={"architecture": "digit_cnn"}, registered_model_name=model,
        )
    versions["logged"], versions["logged_id"] = logged.registered_model_version, logged.model_id
    write_template_checkpoint(Path("loose.pt"), seed=3)
    boto3.client("s3", endpoint_url=os.environ["MLFLOW_S3_ENDPOINT_URL"]).upload_file("loose.pt", bucket, "loose/digits/model.pt")
    versions["path"] = client.create_model_version(model, f"s3://{bucket}/loose/digits").version
    print(json.dumps({k: str(v) for k, v in versions.items()}))
    """
)


@pytest.fixture(scope="module")
def tracking(s3, tmp_path_factory):
    """A tracking server whose runs keep their artifacts in the S3 store, unproxied, and three
    versions of MODEL: from a run, from a logged model, from a storage path with no run."""
    folder = tmp_path_factory.mktemp("s3-tracking")
    with mlflow_server(folder / "mlflow", artifact_root="s3://mlflow/artifacts") as url:
        env = {**os.environ, **s3.env(), "MLFLOW_TRACKING_URI": url, "PYTHONPATH": str(ROOT)}
        env = {k: v for k, v in env.items() if v is not None}
        result = subprocess.run(
            [sys.executable, "-c", REGISTER, str(ROOT), MODEL, "mlflow"], cwd=folder, env=env,
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        versions = json.loads(result.stdout.strip().splitlines()[-1])
        versions["loose_sha256"] = hashlib.sha256((folder / "loose.pt").read_bytes()).hexdigest()
        yield url, versions


def model_download(target, env, models_dir, timeout=120):
    """``flask --app wsgi model download TARGET`` with ``env``; return the finished process."""
    environment = {**os.environ, **CLEAN, **env, "MODELS_DIR": str(models_dir)}
    environment = {k: str(v) for k, v in environment.items() if v is not None}
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "flask"), "--app", "wsgi", "model", "download", target], cwd=ROOT, env=environment,
        capture_output=True, text=True, timeout=timeout,
    )
    result.seconds = time.monotonic() - started
    return result


def one_error_line(result):
    """The single ``Error:`` line a failed command printed, and nothing else of note (no traceback)."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_run_a_logged_model_and_a_storage_path_are_served_and_rolled_out_by_alias(s3, tracking, tmp_path):
    url, versions = tracking
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    client.set_registered_model_alias(MODEL, ALIAS, versions["run"])
    env = {
        **CLEAN, **s3.env(), "MLFLOW_TRACKING_URI": url, "PRED_MODEL_URI": f"models:/{MODEL}@{ALIAS}",
        "MODELS_DIR": tmp_path / "models", "PRED_MODEL_POLL_SECONDS": 1,
    }
    with run_gunicorn(tmp_path, env=env, workers=2) as server:
        _, data = served_version(server)
        assert data["model_uuid"] == versions["run_id"]  # the template's clients still get the run id
        assert data["model_source"] == f"runs:/{versions['run_id']}/model"
        with continuous_load(server.url, tmp_path) as load:
            client.set_registered_model_alias(MODEL, ALIAS, versions["logged"])
            wait_for_version(server, versions["logged"])
            assert served_version(server)[1]["model_source"] == f"models:/{versions['logged_id']}"

            client.set_registered_model_alias(MODEL, ALIAS, versions["path"])
            wait_for_version(server, versions["path"])
            _, data = served_version(server)
            assert data["model_source"] == "s3://mlflow/loose/digits"
            assert data["sha256"] == versions["loose_sha256"]  # the very file copied to the store
            assert data["model_uuid"].startswith(f"{MODEL}-v{versions['path']}-")  # no run: the folder it is in

            client.set_registered_model_alias(MODEL, ALIAS, versions["run"])  # and back
            wait_for_version(server, versions["run"])
        log = server.log()
    assert load.results and load.failures() == [], load.failures()[:3]
    assert "Traceback" not in log
    assert s3.secret not in log
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no staging left behind


def test_a_version_from_a_storage_path_downloads_once_and_only_its_model(s3, tracking, tmp_path):
    url, versions = tracking
    s3.client().put_object(Bucket="mlflow", Key="loose/digits/notes/huge.bin", Body=b"x" * 200_000)
    env = {**s3.env(), "MLFLOW_TRACKING_URI": url, "MAX_MODEL_FILE_SIZE": 6_000_000}
    first = model_download(f"models:/{MODEL}/{versions['path']}", env, tmp_path)
    assert first.returncode == 0, first.stderr
    path = first.stdout.strip().removeprefix("export PRED_MODEL_PATH=")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == versions["loose_sha256"]
    assert sorted(p.name for p in (tmp_path / os.path.basename(os.path.dirname(path))).iterdir()) == ["model.pt"]
    again = model_download(f"models:/{MODEL}/{versions['path']}", {**env, "MLFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:9"},
                           tmp_path)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr  # from disk: the store is not asked


def test_a_model_over_the_size_limit_is_refused_before_it_is_downloaded(s3, tracking, tmp_path):
    url, versions = tracking
    result = model_download(
        f"models:/{MODEL}/{versions['path']}", {**s3.env(), "MLFLOW_TRACKING_URI": url, "MAX_MODEL_FILE_SIZE": 1000},
        tmp_path,
    )
    line = one_error_line(result)
    assert "over the limit of 1000 (MAX_MODEL_FILE_SIZE): not downloading it" in line
    assert list(tmp_path.iterdir()) == []  # nothing staged, nothing kept


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, "refused the credentials (SignatureDoesNotMatch): "
                                                      "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ({"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNKEY000000"}, "refused the credentials (InvalidAccessKeyId)"),
        ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
         "no credentials for the S3 store at http://127.0.0.1:"),
    ],
    ids=["wrong secret", "unknown key", "no credentials"],
)
@pytest.mark.parametrize("what", ["run", "path"])
def test_wrong_credentials_give_one_line_naming_the_variables(s3, tracking, tmp_path, change, expected, what):
    url, versions = tracking
    result = model_download(f"models:/{MODEL}/{versions[what]}", {**s3.env(**change), "MLFLOW_TRACKING_URI": url},
                            tmp_path)
    line = one_error_line(result)
    assert expected in line, line
    assert s3.secret not in result.stderr + result.stdout
    assert list(tmp_path.iterdir()) == []


def test_an_endpoint_that_never_answers_times_out_with_one_line(s3, tracking, tmp_path):
    url, versions = tracking
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = {
            **s3.env(MLFLOW_S3_ENDPOINT_URL=endpoint), "MLFLOW_TRACKING_URI": url,
            "MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT": 2,
        }
        result = model_download(f"models:/{MODEL}/{versions['path']}", env, tmp_path, timeout=90)
    line = one_error_line(result)
    assert f"cannot reach the S3 store at {endpoint}: timed out (check MLFLOW_S3_ENDPOINT_URL)" in line, line
    assert result.seconds < 60  # two attempts of two seconds, not botocore's three of sixty


def test_start_up_with_refused_credentials_stops_with_one_line(s3, tracking, tmp_path):
    url, versions = tracking
    env = {
        **CLEAN, **s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret"), "MLFLOW_TRACKING_URI": url,
        "PRED_MODEL_URI": f"models:/{MODEL}/{versions['path']}", "MODELS_DIR": tmp_path / "models",
    }
    with run_gunicorn(tmp_path, env=env, ready=False) as server:
        assert server.process.wait(timeout=120) != 0
        log = server.log()
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "PRED_MODEL_URI" in errors[0] and "AWS_SECRET_ACCESS_KEY" in errors[0], log
    assert "Traceback" not in log and s3.secret not in log and "not-the-secret" not in log


def test_without_boto3_the_error_says_what_to_install(s3, tracking, tmp_path):
    url, versions = tracking
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['boto3'] = sys.modules['botocore'] = None\n")
    env = {**s3.env(), "MLFLOW_TRACKING_URI": url, "PYTHONPATH": blocker}
    line = one_error_line(model_download(f"models:/{MODEL}/{versions['run']}", env, tmp_path / "models"))
    assert "needs boto3 (s3://): pip install -r requirements.txt" in line, line


def test_secrets_never_reach_a_message(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEJr//token")
    error = RuntimeError(
        "GET https://ecs.example:9021/bucket/model.pt?X-Amz-Algorithm=AWS4&X-Amz-Signature=abc123 failed "
        "for http://admin:hunter22@minio.local:9000 with key wJalrXUtnFEMI/K7MDENG and FwoGZXIvYXdzEJr//token"
    )
    line = mlflow_store.first_line(error)
    for secret in ("abc123", "X-Amz", "hunter22", "wJalrXUtnFEMI", "FwoGZXIvYXdzEJr"):
        assert secret not in line, line
    assert "https://ecs.example:9021/bucket/model.pt failed for http://minio.local:9000" in line
    assert mlflow_store.shown_uri("gs://b/m?X-Goog-Signature=s&X-Goog-Credential=c") == "gs://b/m"


# -- GCS, through a real emulator (gcp-storage-emulator, the JSON API google-cloud-storage speaks) ---

@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    folder, port = tmp_path_factory.mktemp("gcs"), free_port()
    log = folder / "gcs.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
             "--default-bucket", "models"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_for_port(port, process, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)


def test_a_version_registered_from_gcs_is_served(gcs, tracking, tmp_path, monkeypatch):
    from google.cloud import storage
    from mlflow import MlflowClient

    url, _ = tracking
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    checkpoint = write_template_checkpoint(tmp_path / "model.pt", seed=4)
    storage.Client(project="test").bucket("models").blob("digits/v1/model.pt").upload_from_filename(str(checkpoint))
    version = MlflowClient(tracking_uri=url).create_model_version(MODEL, "gs://models/digits/v1").version
    env = {"MLFLOW_TRACKING_URI": url, "STORAGE_EMULATOR_HOST": gcs, "GOOGLE_APPLICATION_CREDENTIALS": None}
    uri = f"models:/{MODEL}/{version}"
    result = model_download(uri, env, tmp_path / "models")
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().removeprefix("export PRED_MODEL_PATH=")
    assert open(path, "rb").read() == checkpoint.read_bytes()

    serve = {**CLEAN, **env, "PRED_MODEL_URI": uri, "MODELS_DIR": tmp_path / "served"}
    with run_gunicorn(tmp_path, env=serve, workers=1) as server:
        data = requests.get(server.url + "/api/v1/model/version", timeout=10).json()["data"]
    assert data["model_source"] == "gs://models/digits/v1" and data["model_version"] == str(version)

    missing = model_download(uri, {**env, "GOOGLE_APPLICATION_CREDENTIALS": tmp_path / "absent.json"},
                             tmp_path / "elsewhere")
    line = one_error_line(missing)
    assert f"GOOGLE_APPLICATION_CREDENTIALS names {tmp_path / 'absent.json'}, which is not a readable file" in line


@pytest.mark.parametrize("status, expected", [
    (401, "GCS refused access without credentials: set GOOGLE_APPLICATION_CREDENTIALS"),
    (403, "GCS denied access (Forbidden): check GOOGLE_APPLICATION_CREDENTIALS"),
])
def test_a_gcs_refusal_names_the_key_variable(tracking, tmp_path, status, expected):
    """A GCS endpoint that refuses every request, as GCS refuses a private bucket to a client with no key."""
    from mlflow import MlflowClient

    class Refusing(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"error": {"code": status, "message": "no"}}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    url, _ = tracking
    version = MlflowClient(tracking_uri=url).create_model_version(MODEL, f"gs://private/refused-{status}").version
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing) as refusing:
        threading.Thread(target=refusing.serve_forever, daemon=True).start()
        env = {"MLFLOW_TRACKING_URI": url, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{refusing.server_port}"}
        line = one_error_line(model_download(f"models:/{MODEL}/{version}", env, tmp_path))
        refusing.shutdown()
    assert expected in line, line
