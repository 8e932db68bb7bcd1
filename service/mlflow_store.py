"""Models on an MLflow tracking server: connect, resolve ``runs:/`` and ``models:/`` URIs, fetch atomically.

Every download, by the ``model download`` command, at start-up for ``PRED_MODEL_URI`` or by the
embedded demo, goes through :func:`download_run`: the run's artifacts land in a hidden folder
beside ``models/<run_id>/``, the model file is loaded as the service would load it, and only then
is the folder renamed into place. A broken transfer therefore never leaves a model that is served.

The tracking server is ``MLFLOW_TRACKING_URI``, else the local one (``config.settings.tracking_uri``);
MLflow reads its other variables itself (``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``,
``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_INSECURE_TLS``...).

Artifacts that the tracking server does not proxy are read straight from their store, as MLflow's
own client does: S3 and S3-compatible stores (ECS, MinIO, Ceph) with boto3 and the ``AWS_*``,
``MLFLOW_S3_ENDPOINT_URL`` and ``MLFLOW_S3_IGNORE_TLS`` variables, GCS with google-cloud-storage
and ``GOOGLE_APPLICATION_CREDENTIALS``. Their errors become one line naming the variable to check
(:func:`_store_problem`), and their transfers time out (:func:`_bound_object_store_waits`).
"""

import functools
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
from mlflow import MlflowClient
from mlflow.environment_variables import (
    MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT,
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR,
    MLFLOW_S3_ENDPOINT_URL,
)
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.credentials import get_default_host_creds, read_mlflow_creds
from mlflow.utils.rest_utils import http_request

from config import settings
from service.formats import MLMODEL, MODEL_ARTIFACT_DIR, MODEL_FILE, read_model_file

log = logging.getLogger(__name__)

MODEL_ARTIFACT = f"{MODEL_ARTIFACT_DIR}/{MODEL_FILE}"
# A run id becomes a folder name: accept what MLflow generates, never a path.
_RUN_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,255}\Z")  # \Z: no trailing newline
# MLflow 3's logged-model ids: models:/m-<hex>.
_MODEL_ID = re.compile(r"\Am-[A-Za-z0-9]{1,64}\Z")
_URI_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
# Unreachable servers should fail in seconds: MLflow's own client retries for minutes.
PROBE_TIMEOUT_S = 10
_AUTH_ERRORS = {"UNAUTHENTICATED": "refused the credentials", "PERMISSION_DENIED": "denied access"}
# A signed URL's query (S3 presigned, GCS signed) is a credential for as long as it lives.
_SIGNED_QUERY = re.compile(r"\?[^\s'\"]*(?:signature|x-amz-|x-goog-|sig=|token=)[^\s'\"]*", re.IGNORECASE)
# Secrets the object stores' clients read from the environment: never shown.
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN")
# An object store that accepts a connection and never answers must not hold a fetch for long:
# botocore's own default is 60 s per read, three attempts.
OBJECT_STORE_TIMEOUT_S = 60
OBJECT_STORE_CONNECT_TIMEOUT_S = 10
_S3_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken",
    "AuthorizationHeaderMalformed", "InvalidClientTokenId", "UnrecognizedClientException", "401", "403",
}
_S3_CONNECTION_ERRORS = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ProxyConnectionError", "ConnectionError", "ResponseStreamingError",
}


class FetchError(RuntimeError):
    """A model cannot be fetched from MLflow; the message is one line for an operator.

    ``permanent`` is True when asking again cannot help (the run, version or artifact does not
    exist, the file is over MAX_MODEL_FILE_SIZE), False when it may (a server down, a transfer cut
    off). ``version`` is the registered version it was fetched as, when it was fetched through one.
    """

    permanent = False
    version = None

    def __init__(self, message, permanent=None):
        super().__init__(message)
        if permanent is not None:
            self.permanent = permanent


class ModelRefused(FetchError):
    """A model was found (and perhaps fetched whole) but cannot be served: not a model file, a
    refused format, missing from its run, or over MAX_MODEL_FILE_SIZE."""

    permanent = True


@dataclass(frozen=True)
class FetchedModel:
    """A model file on local disk and the MLflow run (and registered version) it came from.

    ``run_id`` is the run that logged it; for a model with no run (a logged model without one, a
    version registered from a storage path) the id of the folder it was saved in. ``source`` is
    where it was fetched from (``runs:/...``, ``models:/m-...``, ``s3://...``), as shown to people.
    """

    path: Path
    run_id: str
    model_name: str | None = None
    model_version: str | None = None
    source: str | None = None


@dataclass(frozen=True)
class Tracking:
    """A client for one tracking server, and the URI it is shown as (credentials removed)."""

    client: MlflowClient
    uri: str

    @property
    def shown(self):
        """The server's URI as messages show it."""
        return shown_uri(self.uri)


def shown_uri(uri):
    """``uri`` with any ``user:password@`` and signed query removed, fit for messages and logs."""
    return _SIGNED_QUERY.sub("", _URI_CREDENTIALS.sub("", str(uri)))


def _without_secrets(text):
    """``text`` with the MLflow password and the object stores' secret keys replaced by ``***``."""
    for secret in (read_mlflow_creds().password, *(os.environ.get(name) for name in _SECRET_VARIABLES)):
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def first_line(exc):
    """The gist of an (MLflow) error in one line, without credentials or MLflow's error-code prefix."""
    text = str(getattr(exc, "message", None) or exc)
    lines = [line.strip(" #") for line in text.splitlines() if line.strip(" #")]
    line = lines[0] if lines else exc.__class__.__name__
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {' '.join(lines[1:3])}"  # e.g. "failures occurred ...:" then the file and its error
    line = re.sub(r"^[A-Z_]+: ", "", line)
    line = shown_uri(_without_secrets(line))
    if len(line) > 300:
        # Whole sentences, else whole words: a line cut mid-URL or mid-word reads as a different error.
        cut = line[:300]
        end = cut.rfind(". ")
        line = cut[: end + 1] if end > 60 else f"{cut.rsplit(' ', 1)[0]}..."
    return line


def _connection_problem(exc):
    """Why a request never got an HTTP answer, in a few words."""
    cause = exc
    while cause.__context__ is not None and cause.__context__ is not cause:
        cause = cause.__context__
    text = str(cause)
    for words in ("Connection refused", "Name or service not known", "No route to host", "timed out"):
        if words.lower() in text.lower():
            return words.lower()
    return first_line(cause)


def _causes(exc):
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _s3_endpoint():
    return shown_uri(MLFLOW_S3_ENDPOINT_URL.get() or "AWS S3 (no MLFLOW_S3_ENDPOINT_URL)")


def _store_problem(exc):
    """One line naming the variable to check, for an error from an object store's client (S3 with
    botocore, GCS with google-cloud-storage); None for any other error."""
    s3 = "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    for cause in _causes(exc):
        kind, module = type(cause).__name__, type(cause).__module__
        if isinstance(cause, ModuleNotFoundError) and (cause.name or "").split(".")[0] in ("boto3", "botocore", "google"):
            needed = "google-cloud-storage (gs://)" if cause.name.startswith("google") else "boto3 (s3://)"
            return f"reading this artifact store needs {needed}: pip install -r requirements.txt"
        if module.startswith("botocore"):
            if kind in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
                return f"no credentials for the S3 store at {_s3_endpoint()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            if kind == "ClientError":
                error = getattr(cause, "response", {}).get("Error", {})
                code = str(error.get("Code", ""))
                if code in _S3_CREDENTIAL_CODES:
                    return f"the S3 store at {_s3_endpoint()} refused the credentials ({code}): {s3}"
                if code == "NoSuchBucket":
                    bucket = error.get("BucketName") or "named in the artifact location"
                    return f"the S3 store at {_s3_endpoint()} has no bucket {bucket}: check MLFLOW_S3_ENDPOINT_URL"
            if kind == "SSLError":
                return (
                    f"TLS with the S3 store at {_s3_endpoint()} failed: for a private endpoint set "
                    "MLFLOW_S3_IGNORE_TLS=true or AWS_CA_BUNDLE"
                )
            if kind in _S3_CONNECTION_ERRORS:
                return f"cannot reach the S3 store at {_s3_endpoint()}: {_connection_problem(cause)} (check MLFLOW_S3_ENDPOINT_URL)"
        if module.startswith("google"):
            gcs = "check GOOGLE_APPLICATION_CREDENTIALS"
            if "Anonymous credentials" in str(cause):  # no key found: Google's client went on without one
                return "GCS refused access without credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service account key"
            if kind in ("DefaultCredentialsError", "RefreshError", "Unauthorized"):
                return f"GCS refused the credentials ({kind}): {gcs}"
            if kind == "Forbidden":
                return f"GCS denied access (Forbidden): {gcs} and the account's permissions on the bucket"
    # MLflow's parallel downloads report their workers' errors as text only.
    text = str(exc)
    if match := re.search(r"\((InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|ExpiredToken|InvalidToken|403)\)", text):
        return f"the S3 store at {_s3_endpoint()} refused the credentials ({match.group(1)}): {s3}"
    if "Unable to locate credentials" in text:
        return f"no credentials for the S3 store at {_s3_endpoint()}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    if re.search(r"(Could not connect to|Connect timeout on|Read timeout on) (the )?endpoint URL", text):
        return f"cannot reach the S3 store at {_s3_endpoint()} (check MLFLOW_S3_ENDPOINT_URL)"
    return None


def _store_shown(location, tracking):
    """Where files at ``location`` come from, for the log: an object store, else the tracking server."""
    parts = urlsplit(location)
    if parts.scheme in ("s3", "gs"):
        endpoint = MLFLOW_S3_ENDPOINT_URL.get() if parts.scheme == "s3" else os.environ.get("STORAGE_EMULATOR_HOST")
        return f"{parts.scheme}://{parts.netloc}" + (f" at {shown_uri(endpoint)}" if endpoint else "")
    return tracking.shown


def _prepare_store(location):
    """Before files at ``location`` are listed or fetched: bound the object store's waits, and
    check that a GCS key file named by GOOGLE_APPLICATION_CREDENTIALS is there (else Google's
    client quietly falls back to anonymous access, and a private bucket answers 401)."""
    scheme = urlsplit(location).scheme
    if scheme == "s3":
        _bound_s3_waits()
    key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if scheme == "gs" and key_file and not (os.path.isfile(key_file) and os.access(key_file, os.R_OK)):
        raise FetchError(
            f"GOOGLE_APPLICATION_CREDENTIALS names {key_file}, which is not a readable file: point it at the "
            "service account's JSON key (in Kubernetes, where the secret is mounted)"
        )


@functools.cache
def _bound_s3_waits():
    """Make every S3 client MLflow creates give up on a silent endpoint: ``connect_timeout``,
    ``read_timeout`` and attempts, set once on boto3's default session (which MLflow's clients
    come from) and merged under MLflow's own client options.

    The read timeout is MLflow's MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT (its GCS client already
    obeys it), else OBJECT_STORE_TIMEOUT_S; -1 leaves botocore's defaults. Two attempts, unless
    AWS_MAX_ATTEMPTS says otherwise. Without boto3 there is nothing to bound: the fetch itself
    then says what to install.
    """
    try:
        import boto3
        import botocore.session
        from botocore.config import Config
    except ImportError:
        return
    timeout = MLFLOW_ARTIFACT_UPLOAD_DOWNLOAD_TIMEOUT.get() or OBJECT_STORE_TIMEOUT_S
    if timeout == -1:
        return
    options = {"connect_timeout": min(OBJECT_STORE_CONNECT_TIMEOUT_S, timeout), "read_timeout": timeout}
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        options["retries"] = {"total_max_attempts": 2}
    session = botocore.session.get_session()
    session.set_default_client_config(Config(**options))
    boto3.setup_default_session(botocore_session=session)


def _probe(uri, create=False):
    """Fail in seconds, with one line, when an HTTP tracking server is down or refuses our credentials.

    A local store (``sqlite:`` file, folder) that does not exist fails too, unless ``create``:
    MLflow would make an empty one, where any lookup can only fail, and leave it behind.
    """
    if not uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        if parts.scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db, sqlite:// (in memory)
            path = parts.path[1:] if parts.path.startswith("/") else parts.path
            local = Path(path) if path and path != ":memory:" else None
        else:
            local = Path(parts.path) if parts.scheme in ("", "file") else None  # postgresql:, databricks...
        if local is not None and not create and not local.exists():
            raise FetchError(
                f"cannot open the MLflow tracking store at {shown_uri(uri)}: {local} does not exist "
                "(check MLFLOW_TRACKING_URI; a lookup never creates a store)"
            )
        return
    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=PROBE_TIMEOUT_S,
            raise_on_status=False,
        )
    except Exception as exc:  # MlflowException for a refused connection; ValueError for a bad TLS setting...
        problem = _connection_problem(exc)
        if uri.rstrip("/") == settings.LOCAL_TRACKING_URI:
            problem += ": start it with `make mlflow`, or set MLFLOW_TRACKING_URI to your tracking server"
        raise FetchError(f"cannot reach the MLflow tracking server at {shown_uri(uri)}: {problem}") from None
    if response.status_code == 401:
        raise FetchError(
            f"the MLflow tracking server at {shown_uri(uri)} refused the credentials (HTTP 401): "
            "check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    if response.status_code == 403:
        raise FetchError(f"the MLflow tracking server at {shown_uri(uri)} denied access (HTTP 403)")


def connect(tracking_uri=None, create=False):
    """Return a :class:`Tracking` for ``tracking_uri``; by default MLFLOW_TRACKING_URI, else the local
    tracking server (``make mlflow``), so that every command looks in the same place.

    Raises FetchError when the server cannot be reached or refuses the credentials, when the URI
    has no scheme, or when a local store (``sqlite:``, a folder) cannot be opened or, unless
    ``create``, does not exist yet.
    """
    try:
        uri = settings.tracking_uri({"MLFLOW_TRACKING_URI": str(tracking_uri)} if tracking_uri else None)
    except settings.ConfigError as exc:
        raise FetchError(str(exc)) from None
    _probe(uri, create)
    try:
        # A local store is opened here: OSError, SQLAlchemy's errors and MlflowException all occur.
        client = MlflowClient(tracking_uri=uri)
    except Exception as exc:
        raise FetchError(f"cannot open the MLflow tracking store at {shown_uri(uri)}: {first_line(exc)}") from None
    return Tracking(client, uri)


def _failure(exc, tracking, subject):
    """Turn an MLflow (or artifact store) error about ``subject`` into a one-line FetchError."""
    problem = _store_problem(exc)
    if problem:
        return FetchError(f"{subject}: {problem}")
    code = getattr(exc, "error_code", None)
    if code == "RESOURCE_DOES_NOT_EXIST":
        return FetchError(f"{subject} not found on the MLflow tracking server at {tracking.shown}", permanent=True)
    if code in _AUTH_ERRORS:
        return FetchError(f"the MLflow tracking server at {tracking.shown} {_AUTH_ERRORS[code]} ({subject})")
    return FetchError(f"{subject}: {first_line(exc)}")


def check_run_id(run_id):
    """Raise FetchError unless ``run_id`` looks like an MLflow run id (it becomes a folder name)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise FetchError(f"{run_id!r} is not an MLflow run id (letters, digits, '-' and '_')", permanent=True)


def get_run(tracking, run_id):
    """Return the MLflow run ``run_id``; raise FetchError naming the problem in one line."""
    check_run_id(run_id)
    try:
        return tracking.client.get_run(run_id)
    except Exception as exc:  # not only MlflowException: a local store raises OSError and SQLAlchemy errors
        raise _failure(exc, tracking, f"run {run_id}") from None


def _list_files(list_artifacts, owner, path=None):
    """Return {artifact path: size in bytes or None} for every file under ``path``, recursively.

    ``list_artifacts`` is the client's listing for runs or for logged models, ``owner`` the run or
    model id it takes.
    """
    files = {}
    for info in list_artifacts(owner, path):
        if info.is_dir:
            files.update(_list_files(list_artifacts, owner, info.path))
        else:
            files[info.path] = info.file_size
    return files


def model_file(artifact):
    """The model file an artifact path names: itself, or ``model.pt`` inside it for a folder."""
    artifact = artifact.strip("/")
    if not artifact:
        return MODEL_ARTIFACT
    last = artifact.rsplit("/", 1)[-1]
    return artifact if "." in last else f"{artifact}/{MODEL_FILE}"


def local_model_path(models_dir, run_id, artifact=MODEL_ARTIFACT):
    """Where :func:`download_run` puts ``artifact`` of run ``run_id``: ``<models_dir>/<run_id>/<artifact>``."""
    check_run_id(run_id)
    return Path(models_dir) / run_id / artifact


@contextmanager
def _artifacts_progress_bar(enabled):
    """Turn MLflow's artifact progress bar on or off for the downloads made inside the block.

    MLflow reads this setting from the process environment at each download, so it is set
    through MLflow's own setting object and put back as it was afterwards.
    """
    was_set, previous = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.is_set(), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get_raw()
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set("true" if enabled else "false")
    try:
        yield
    finally:
        if was_set:
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(previous)
        else:
            MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.unset()


def _size(nbytes):
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def _check_inside(path, models_dir):
    """Raise FetchError when ``path`` (a symbolic link, or under one) leads outside ``models_dir``:
    what is served from MODELS_DIR must be what was downloaded there."""
    root = Path(models_dir).resolve()
    if not Path(path).resolve().is_relative_to(root):
        raise FetchError(f"{path} leads outside {models_dir} (a symbolic link to {Path(path).resolve()}): not serving it")


def _check_download(
    staging, files, artifact, allow_programs=False, max_size=settings.Settings.MAX_MODEL_FILE_SIZE, code_modules=()
):
    """Raise FetchError unless every file arrived whole and the model loads as the service loads it.

    A file short or missing is a transfer cut off (worth another try); a model that does not load
    is ModelRefused."""
    for path, size in files.items():
        local = staging / path
        if local.is_symlink():
            raise FetchError(f"{path} arrived as a symbolic link, not a file")
        if not local.is_file():
            raise FetchError(f"{path} is missing after the download")
        if size is not None and local.stat().st_size != size:
            raise FetchError(f"{path} is {local.stat().st_size} bytes after the download, expected {size}")
    try:
        model = read_model_file(staging / artifact, allow_programs, max_size, code_modules)
        classifier, metadata = model.classifier, model.metadata
    except Exception as exc:  # read_model_file's ValueErrors, and whatever else torch raises for a broken file
        raise ModelRefused(f"{artifact} cannot be served: {first_line(exc)}") from None
    return classifier, metadata


@contextmanager
def _staging(models_dir, name):
    """A new hidden ``.<name>.*.partial`` folder in ``models_dir`` for one download, removed on the
    way out whatever happens (once moved into place, nothing is left of it to remove)."""
    try:
        Path(models_dir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=models_dir))
    except OSError as exc:
        raise FetchError(f"cannot write to {models_dir} (MODELS_DIR): {exc.strerror}") from None
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server running as another user
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(staging, target, artifact):
    """Move a checked download into place in one rename; a finished copy already there wins."""
    try:
        os.rename(staging, target)
        return
    except OSError:
        if (target / artifact).is_file():
            return  # another process finished the same download first
    # An incomplete folder is in the way (not one this code made): swap it out.
    aside = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
    os.rename(target, aside)
    os.rename(staging, target)
    shutil.rmtree(aside, ignore_errors=True)


def _own_files(files, artifact, folder):
    """The files that make the model: ``artifact`` alone, or the MLflow model directory ``folder``
    (with its ``MLmodel``); None when the run has neither."""
    if artifact in files:
        return {artifact: files[artifact]}
    if f"{folder}/{MLMODEL}" in files:
        return {path: size for path, size in files.items() if path.startswith(f"{folder}/")}
    return None


def _check_size(files, max_size, subject):
    """Raise ModelRefused, before anything is downloaded, when the model's files are over ``max_size``."""
    total = sum(size or 0 for size in files.values())
    if total > max_size:
        raise ModelRefused(
            f"{subject} is {total} bytes, over the limit of {max_size} (MAX_MODEL_FILE_SIZE): not downloading it"
        )
    return total


def _fetch_into(
    models_dir, key, subject, files, *, check, installed, download, origin, max_size, allow_programs, code_modules,
    progress=False,
):
    """Download ``files`` (listed as {path: size}) of ``subject`` into ``<models_dir>/<key>/``: into a
    hidden staging folder first, checked (every file whole, the model at ``check`` loads as the
    service would load it), then moved into place in one rename (``installed`` names the file whose
    presence means a finished copy). ``download(staging)`` makes the transfer and returns the
    folder it filled; ``progress`` shows MLflow's progress bar meanwhile. Returns the folder."""
    target = Path(models_dir) / key
    total = _check_size(files, max_size, subject)
    with _staging(models_dir, key) as staging:
        log.info("downloading %s from %s: %d file(s), %s, into %s", subject, origin, len(files), _size(total), target)
        try:
            with _artifacts_progress_bar(progress):
                downloaded = Path(download(staging))
        except Exception as exc:  # MlflowException, OSError, and whatever the artifact store's client raises
            raise FetchError(f"downloading {subject} failed: {_store_problem(exc) or first_line(exc)}") from None
        try:
            classifier, metadata = _check_download(downloaded, files, check, allow_programs, max_size, code_modules)
        except FetchError as exc:
            raise type(exc)(f"{subject}: {exc}") from None
        try:
            downloaded.chmod(0o755)  # what MLflow made is private; the server may run as another user
            _install(downloaded, target, installed)
        except OSError as exc:
            raise FetchError(f"cannot move {subject} into {target}: {exc.strerror}") from None
    log.info("checked and saved %s (%s, %d labels)", target, metadata["architecture"], len(classifier.labels))
    return target


def _already_there(models_dir, key, *names):
    """The first of ``names`` (paths inside ``<models_dir>/<key>``) that a finished download left, or None."""
    for name in names:
        found = Path(models_dir) / key / name
        if found.is_file():
            _check_inside(found, models_dir)
            return found
    return None


def download_run(
    run_id, models_dir, artifact=MODEL_ARTIFACT, tracking=None, tracking_uri=None, progress=True, allow_programs=False,
    max_size=settings.Settings.MAX_MODEL_FILE_SIZE, code_modules=(),
):
    """Download the model of run ``run_id`` (``artifact``, or the MLflow model folder it is in) into
    ``<models_dir>/<run_id>/`` and return the model file's path; the run's other artifacts stay on the server.

    A no-op (no server contact) when the model file is already there: only checked, complete
    downloads are ever renamed into place. Otherwise it uses ``tracking``, or connects to
    ``tracking_uri`` (default: MLflow's own). ``progress=False`` hides MLflow's progress bar, which
    is raw terminal output (for a server's log). A program (TorchScript) passes the check only with
    ``allow_programs`` (ALLOW_MODEL_PROGRAMS), an own network with ``code_modules`` (MODEL_CODE_MODULES).
    Raises FetchError, one line, for an unknown run,
    an unreachable server, refused credentials, a run without ``artifact``, or a failed transfer;
    ModelRefused (a FetchError) when the model is missing, over ``max_size`` (MAX_MODEL_FILE_SIZE,
    checked on the listed sizes before the transfer) or does not load.
    """
    check_run_id(run_id)
    folder = _model_folder(artifact)
    found = _already_there(models_dir, run_id, artifact, f"{folder}/{MLMODEL}")
    if found is not None:
        found = found if found.name != MLMODEL else found.parent
        log.info("run %s is already downloaded: %s", run_id, found)
        return found
    tracking = tracking or connect(tracking_uri)
    run = get_run(tracking, run_id)
    _prepare_store(run.info.artifact_uri)
    # Only the folder the model is in is listed: a run may hold gigabytes of other artifacts.
    parent = artifact.rpartition("/")[0] or None
    try:
        listed_files = _list_files(tracking.client.list_artifacts, run_id, parent)
    except Exception as exc:
        raise _failure(exc, tracking, f"artifacts of run {run_id}") from None
    files = _own_files(listed_files, artifact, folder)
    if files is None:
        if not listed_files and parent:  # say what the run has instead: its top level is enough
            try:
                listed_files = {info.path: None for info in tracking.client.list_artifacts(run_id)}
            except Exception as exc:
                raise _failure(exc, tracking, f"artifacts of run {run_id}") from None
        listed = ", ".join(sorted(listed_files)[:8]) or "no artifacts at all"
        raise ModelRefused(f"run {run_id} has no {artifact} artifact (it has {listed})")
    model, installed = (artifact, artifact) if artifact in files else (folder, f"{folder}/{MLMODEL}")

    def download(staging):
        # MLflow puts the last part of the path in dst_path: the file, or the model's folder.
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=model, dst_path=str(staging / model.rpartition("/")[0]),
            tracking_uri=tracking.uri,
        )
        return staging

    target = _fetch_into(
        models_dir, run_id, f"run {run_id} ({model})", files, check=model, installed=installed, download=download,
        origin=_store_shown(run.info.artifact_uri, tracking), max_size=max_size, allow_programs=allow_programs,
        code_modules=code_modules, progress=progress,
    )
    return target / model


def _model_folder(artifact):
    """The folder an artifact path names when it is an MLflow model: ``x`` for ``x`` or ``x/model.pt``."""
    suffix = f"/{MODEL_FILE}"
    return artifact[: -len(suffix)] if artifact.endswith(suffix) else artifact


def _parse_uri(uri):
    """Split a model URI into ("runs", run_id, artifact), ("models", name, (alias, version)) or
    ("logged", model_id, None)."""
    if uri.startswith("runs:/"):
        run_id, _, artifact = uri[len("runs:/"):].strip("/").partition("/")
        if not run_id:
            raise FetchError(f"{uri!r}: expected runs:/<run_id>/<artifact path>")
        return "runs", run_id, model_file(artifact)
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):].strip("/")
        if _MODEL_ID.match(rest):
            return "logged", rest, None
        if "@" in rest:
            name, _, alias = rest.partition("@")
            if name and alias and "/" not in alias:
                return "models", name, (alias, None)
        else:
            name, _, version = rest.rpartition("/")
            if name and version.isdigit():
                return "models", name, (None, version)
        raise FetchError(f"{uri!r}: expected models:/<name>@<alias>, models:/<name>/<version> or models:/<model id>")
    raise FetchError(f"{uri!r}: expected a runs:/ or models:/ URI")


def _artifact_of_version(tracking, version):
    """The model file inside its run that a registered model version points at."""
    source = version.source or ""
    if source.startswith("runs:/"):
        return model_file(source[len("runs:/"):].partition("/")[2])
    root = get_run(tracking, version.run_id).info.artifact_uri.rstrip("/")
    if source.startswith(root + "/"):
        return model_file(source[len(root) + 1:])
    return MODEL_ARTIFACT


def _registered_version(tracking, uri, name, alias, number):
    try:
        if alias:
            return tracking.client.get_model_version_by_alias(name, alias)
        return tracking.client.get_model_version(name, number)
    except Exception as exc:
        raise _failure(exc, tracking, f"registered model {uri[len('models:/'):]}") from None


def alias_version(uri, tracking_uri=None):
    """The version ``models:/<name>@<alias>`` points at now, as a string (one request, no download)."""
    kind, name, (alias, number) = _parse_uri(uri)
    if kind != "models" or not alias:
        raise FetchError(f"{uri!r} follows no alias")
    tracking = connect(tracking_uri)
    return str(_registered_version(tracking, uri, name, alias, number).version)


def fetch_model_uri(
    uri, models_dir, tracking_uri=None, allow_programs=False, max_size=settings.Settings.MAX_MODEL_FILE_SIZE,
    code_modules=(),
):
    """Fetch the model a ``runs:/`` or ``models:/`` URI names into ``<models_dir>/<key>/`` (once).

    ``models:/<name>@<alias>`` and ``models:/<name>/<version>`` are resolved on the tracking server
    to what the version was registered from: a run's artifact, an MLflow 3 logged model, or a
    storage path with no run (``s3://...``, ``gs://...``: the version's download URI). A ``runs:/``
    URI already on disk needs no server at all. This is the start-up and rollout path (the
    gunicorn master): MLflow's progress bar stays off, as it is not log output.
    """
    options = {"allow_programs": allow_programs, "max_size": max_size, "code_modules": code_modules}
    kind, name, detail = _parse_uri(uri)
    if kind == "runs":
        path = download_run(name, models_dir, detail, tracking_uri=tracking_uri, progress=False, **options)
        return FetchedModel(path, name, source=uri)
    if kind == "logged":
        return download_logged_model(name, models_dir, tracking_uri=tracking_uri, **options)
    alias, number = detail
    tracking = connect(tracking_uri)
    version = _registered_version(tracking, uri, name, alias, number)
    source = version.source or ""
    logged_id = source[len("models:/"):] if source.startswith("models:/") else ""
    try:
        if _MODEL_ID.match(logged_id):
            # MLflow 3: the version is a logged model (mlflow.<flavor>.log_model), not a run's artifact.
            fetched = download_logged_model(logged_id, models_dir, tracking, **options)
            run_id, path, came_from = fetched.run_id, fetched.path, f"logged model {logged_id}"
        elif version.run_id:
            run_id = version.run_id
            path = download_run(
                run_id, models_dir, _artifact_of_version(tracking, version), tracking, progress=False, **options
            )
            came_from = f"run {run_id}"
        else:
            run_id, path = download_version_source(tracking, name, str(version.version), models_dir, **options)
            came_from = shown_uri(source)
    except FetchError as exc:
        exc.version = str(version.version)
        raise
    log.info("%s is version %s of %s, from %s", uri, version.version, name, came_from)
    return FetchedModel(path, run_id, name, str(version.version), shown_uri(source) or None)


def _source_key(name, version, location):
    """The folder a version with no run is saved in: readable, and different for another location."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:80] or "model"
    digest = hashlib.sha256(location.encode()).hexdigest()[:12]
    return f"{readable}-v{version}-{digest}"


def download_version_source(
    tracking, name, version, models_dir, allow_programs=False, max_size=settings.Settings.MAX_MODEL_FILE_SIZE,
    code_modules=(),
):
    """Download version ``version`` of registered model ``name`` that has no run: registered from a
    storage path (``create_model_version(name, source="s3://.../model")``, ``mlflow.register_model("gs://...")``).

    The files come from the version's download URI, as MLflow resolves it; the folder there holds
    the service's ``model.pt`` or an MLflow model directory (``MLmodel``). Saved into
    ``<models_dir>/<name>-v<version>-<digest of the location>/`` like any other download, and reused
    from there. Returns (that folder's name, the model's path).
    """
    try:
        location = tracking.client.get_model_version_download_uri(name, version)
    except Exception as exc:
        raise _failure(exc, tracking, f"the location of version {version} of {name}") from None
    key = _source_key(name, version, location)
    found = _already_there(models_dir, key, MODEL_FILE, MLMODEL)
    if found is not None:
        found = found if found.name != MLMODEL else found.parent
        log.info("version %s of %s is already downloaded: %s", version, name, found)
        return key, found
    subject = f"version {version} of {name} ({shown_uri(location)})"
    _prepare_store(location)
    try:
        repository = get_artifact_repository(location, tracking_uri=tracking.uri)
        listed = _list_files(lambda _, path: repository.list_artifacts(path), None)
    except Exception as exc:
        raise _failure(exc, tracking, subject) from None
    files = {MODEL_FILE: listed[MODEL_FILE]} if MODEL_FILE in listed else listed if MLMODEL in listed else None
    if files is None:
        shown = ", ".join(sorted(listed)[:8]) or "nothing at all"
        raise ModelRefused(f"{subject} has neither {MODEL_FILE} nor an MLflow model ({MLMODEL}): it has {shown}")
    model, installed = (MODEL_FILE, MODEL_FILE) if MODEL_FILE in files else (".", MLMODEL)

    def download(staging):
        if model == MODEL_FILE:
            repository.download_artifacts(MODEL_FILE, dst_path=str(staging))
        else:
            for path in files:  # only the listed files: what was checked against the size limit
                repository.download_artifacts(path, dst_path=str(staging))
        return staging

    target = _fetch_into(
        models_dir, key, subject, files, check=model, installed=installed, download=download,
        origin=_store_shown(location, tracking), max_size=max_size, allow_programs=allow_programs,
        code_modules=code_modules,
    )
    return key, target / model if model == MODEL_FILE else target


def download_logged_model(
    model_id, models_dir, tracking=None, tracking_uri=None, allow_programs=False,
    max_size=settings.Settings.MAX_MODEL_FILE_SIZE, code_modules=(),
):
    """Download MLflow 3 logged model ``model_id`` (``models:/m-...``) into ``<models_dir>/<model_id>/``.

    The folder is the MLflow model directory itself (``MLmodel``, ``data/``...); like
    :func:`download_run`, only a complete, checked download is moved into place, and a finished
    one is reused without contacting the server. Returns a :class:`FetchedModel` whose ``run_id``
    is the run that logged the model (or the model id when there is none).
    """
    check_run_id(model_id)
    tracking = tracking or connect(tracking_uri)
    try:
        logged = tracking.client.get_logged_model(model_id)
    except Exception as exc:
        raise _failure(exc, tracking, f"logged model {model_id}") from None
    run_id, source = logged.source_run_id or model_id, f"models:/{model_id}"
    found = _already_there(models_dir, model_id, MLMODEL)
    if found is not None:
        log.info("logged model %s is already downloaded: %s", model_id, found.parent)
        return FetchedModel(found.parent, run_id, source=source)
    _prepare_store(logged.artifact_location)
    try:
        files = _list_files(tracking.client.list_logged_model_artifacts, model_id)
    except Exception as exc:
        raise _failure(exc, tracking, f"artifacts of logged model {model_id}") from None
    if MLMODEL not in files:
        listed = ", ".join(sorted(files)[:8]) or "no artifacts at all"
        raise ModelRefused(f"logged model {model_id} has no {MLMODEL} (it has {listed})")

    def download(staging):
        # The model's files land in a folder named after the last part of its location.
        return mlflow.artifacts.download_artifacts(
            artifact_uri=logged.artifact_location, dst_path=str(staging), tracking_uri=tracking.uri
        )

    target = _fetch_into(
        models_dir, model_id, f"logged model {model_id}", files, check=".", installed=MLMODEL, download=download,
        origin=_store_shown(logged.artifact_location, tracking), max_size=max_size, allow_programs=allow_programs,
        code_modules=code_modules,
    )
    return FetchedModel(target, run_id, source=source)
