"""Settings read from the environment: the one place that looks at ``os.environ``."""

import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?)?\s*$", re.IGNORECASE)
# The model's name in Open Inference Protocol URLs (/v2/models/<name>): one plain path segment.
_MODEL_NAME = re.compile(r"\A[A-Za-z0-9._:@+-]{1,128}\Z")
# A module prefix MODEL_CODE_MODULES allows: a dotted Python module name.
_MODULE_PREFIX = re.compile(r"\A[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")
_SIZE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable and the problem."""


@dataclass(frozen=True)
class Settings:
    """Validated service settings; keys match the environment variables that set them."""

    PRED_MODEL_UUID: str | None = None
    PRED_MODEL_PATH: str | None = None
    PRED_MODEL_URI: str | None = None
    PRED_MODEL_NAME: str | None = None
    MODELS_DIR: str = str(PROJECT_ROOT / "models")
    USE_CUDA: bool = False
    USE_MPS: bool = False
    MAX_CONTENT_LENGTH: int = 16 * 1024 * 1024
    MAX_FILES: int = 64
    MAX_IMAGE_PIXELS: int = 4096 * 4096
    VERIFY_MODEL_ON_START: bool = False
    PRED_MODEL_POLL_SECONDS: int = 30
    ALLOW_MODEL_PROGRAMS: bool = False
    MODEL_CODE_MODULES: tuple[str, ...] = ()
    MAX_MODEL_FILE_SIZE: int = 2 * 1024**3
    INFERENCE_ENGINE: str = "auto"
    LOG_LEVEL: str = "INFO"
    LOG_FORMAT: str = "text"
    API_KEY: str | None = field(default=None, repr=False)
    CORS_ORIGINS: tuple[str, ...] = ()
    PROMETHEUS_MULTIPROC_DIR: str | None = None

    def as_config(self):
        """Return the settings as a mapping for ``app.config.update``."""
        return asdict(self)


def _flag(environ, name, default=False):
    raw = environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}: expected a boolean (1/0, true/false, yes/no, on/off), got {raw!r}")


def _int(environ, name, default, minimum=1):
    """A whole number of at least ``minimum`` (1: a positive count; 0: a count where 0 turns a feature off)."""
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    kind = "a positive whole number" if minimum == 1 else f"a whole number ({minimum} or more)"
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected {kind}, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name}: must be at least {minimum}, got {value}")
    return value


def _positive_int(environ, name, default):
    return _int(environ, name, default, minimum=1)


def _whole_number(environ, name, default):
    return _int(environ, name, default, minimum=0)


def parse_size(raw):
    """Parse a byte count such as ``16777216``, ``16M``, ``16MiB`` or ``512k``."""
    match = _SIZE.match(raw)
    if not match:
        raise ValueError(raw)
    number, unit = match.groups()
    return int(number) * (_SIZE_UNITS[unit[0].lower()] if unit else 1)


def _size(environ, name, default):
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = parse_size(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a size in bytes such as 16777216 or 16MiB, got {raw!r}") from None
    if value < 1:
        raise ConfigError(f"{name}: must be at least 1 byte")
    return value


def _choice(environ, name, default, choices):
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip()
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")


def _text(environ, name):
    raw = environ.get(name)
    return raw.strip() if raw and raw.strip() else None


# The local tracking server that `make mlflow` and the demo run: every command's default.
LOCAL_TRACKING_URI = "http://127.0.0.1:5000"
_HOST_PORT = re.compile(r"^[\w.-]+:\d+(/\S*)?$")


def tracking_uri(environ=None, default=LOCAL_TRACKING_URI):
    """The MLflow tracking server every command uses: MLFLOW_TRACKING_URI, else ``default`` (the local one).

    Raises ConfigError for a server address without a scheme (``127.0.0.1:5000``), which MLflow
    would otherwise take for a folder name.
    """
    environ = os.environ if environ is None else environ
    uri = _text(environ, "MLFLOW_TRACKING_URI")
    if uri is None:
        return default
    if _HOST_PORT.match(uri):
        raise ConfigError(f"MLFLOW_TRACKING_URI: {uri!r} has no scheme: write http://{uri} (or https://{uri})")
    return uri


def from_env(environ=None):
    """Read and validate every setting; raise ConfigError naming the first bad variable."""
    environ = os.environ if environ is None else environ
    model_path = _text(environ, "PRED_MODEL_PATH")
    model_uuid = _text(environ, "PRED_MODEL_UUID")
    if model_path:
        model_path = str(Path(model_path).expanduser().absolute())
    model_uri = _text(environ, "PRED_MODEL_URI")
    if model_uri and not model_uri.startswith(("runs:/", "models:/")):
        raise ConfigError(
            f"PRED_MODEL_URI: expected runs:/<run_id>/<path> or models:/<name>@<alias> "
            f"or models:/<name>/<version>, got {model_uri!r}"
        )
    if model_path and model_uri:
        raise ConfigError("PRED_MODEL_URI: set either PRED_MODEL_PATH or PRED_MODEL_URI, not both")
    model_name = _text(environ, "PRED_MODEL_NAME")
    if model_name and not _MODEL_NAME.match(model_name):
        raise ConfigError(
            f"PRED_MODEL_NAME: expected letters, digits and . _ : @ + - (it is part of /v2/models/<name> URLs), "
            f"got {model_name!r}"
        )
    code_modules = tuple(m.strip() for m in environ.get("MODEL_CODE_MODULES", "").split(",") if m.strip())
    for module in code_modules:
        if not _MODULE_PREFIX.match(module):
            raise ConfigError(
                f"MODEL_CODE_MODULES: expected comma-separated module names such as mypackage.networks, got {module!r}"
            )
    origins = tuple(o.strip() for o in environ.get("CORS_ORIGINS", "").split(",") if o.strip())
    if "*" in origins:
        raise ConfigError("CORS_ORIGINS: list the allowed origins explicitly; '*' is not accepted")
    return Settings(
        PRED_MODEL_UUID=model_uuid,
        PRED_MODEL_PATH=model_path,
        PRED_MODEL_URI=model_uri,
        PRED_MODEL_NAME=model_name,
        MODELS_DIR=str(Path(environ.get("MODELS_DIR") or PROJECT_ROOT / "models").absolute()),
        USE_CUDA=_flag(environ, "USE_CUDA"),
        USE_MPS=_flag(environ, "USE_MPS"),
        MAX_CONTENT_LENGTH=_size(environ, "MAX_CONTENT_LENGTH", Settings.MAX_CONTENT_LENGTH),
        MAX_FILES=_positive_int(environ, "MAX_FILES", Settings.MAX_FILES),
        MAX_IMAGE_PIXELS=_positive_int(environ, "MAX_IMAGE_PIXELS", Settings.MAX_IMAGE_PIXELS),
        VERIFY_MODEL_ON_START=_flag(environ, "VERIFY_MODEL_ON_START"),
        PRED_MODEL_POLL_SECONDS=_whole_number(environ, "PRED_MODEL_POLL_SECONDS", Settings.PRED_MODEL_POLL_SECONDS),
        ALLOW_MODEL_PROGRAMS=_flag(environ, "ALLOW_MODEL_PROGRAMS"),
        MODEL_CODE_MODULES=code_modules,
        MAX_MODEL_FILE_SIZE=_size(environ, "MAX_MODEL_FILE_SIZE", Settings.MAX_MODEL_FILE_SIZE),
        INFERENCE_ENGINE=_choice(environ, "INFERENCE_ENGINE", "auto", ("auto", "torch", "onnxruntime")),
        LOG_LEVEL=_choice(environ, "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
        LOG_FORMAT=_choice(environ, "LOG_FORMAT", "text", ("text", "json")),
        API_KEY=_text(environ, "API_KEY"),
        CORS_ORIGINS=origins,
        PROMETHEUS_MULTIPROC_DIR=_text(environ, "PROMETHEUS_MULTIPROC_DIR"),
    )


@dataclass(frozen=True)
class ServerSettings:
    """gunicorn's settings; see config/gunicorn.conf.py."""

    port: int
    workers: int
    torch_threads: int
    timeout: int
    graceful_timeout: int
    max_requests: int
    max_requests_jitter: int
    metrics_dir: str | None


def cgroup_cpu_limit(proc_cgroup="/proc/self/cgroup", cgroup_root="/sys/fs/cgroup"):
    """The CPUs this process's cgroup v2 quota (``cpu.max``) allows, rounded up; None without one.

    A container limited to 2 CPUs on a 64-core host sees 64 in ``os.cpu_count()``: threads sized
    from that are throttled by the quota. Every cgroup on the way up to the root counts.
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None  # cgroup v1 only
    limit = None
    folder = Path(cgroup_root) / relative.strip().lstrip("/")
    root = Path(cgroup_root)
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max" and int(period) > 0:
                cpus = max(1, -(-int(quota) // int(period)))
                limit = cpus if limit is None else min(limit, cpus)
        except (OSError, ValueError):
            pass
        if folder == root or root not in folder.parents:
            return limit
        folder = folder.parent


def available_cpus():
    """The CPUs this process may really use: its CPU affinity, capped by its cgroup v2 quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


def server_from_env(environ=None, cpu_count=None, workers=None):
    """Read gunicorn's settings; torch threads default to the CPUs the process may use (its
    affinity and its cgroup's CPU quota) / workers, at least one.

    ``workers`` is the worker count gunicorn really runs, when known (a ``--workers`` flag in
    GUNICORN_CMD_ARGS wins over WEB_CONCURRENCY), so the default threads follow it.
    """
    environ = os.environ if environ is None else environ
    workers = workers or _positive_int(environ, "WEB_CONCURRENCY", 2)
    cores = cpu_count or available_cpus()
    port = _positive_int(environ, "PORT", 8080)
    if port > 65535:
        raise ConfigError(f"PORT: must be at most 65535, got {port}")
    return ServerSettings(
        port=port,
        workers=workers,
        torch_threads=_positive_int(environ, "TORCH_NUM_THREADS", max(1, cores // workers)),
        timeout=_positive_int(environ, "GUNICORN_TIMEOUT", 90),
        graceful_timeout=_positive_int(environ, "GUNICORN_GRACEFUL_TIMEOUT", 30),
        max_requests=_positive_int(environ, "GUNICORN_MAX_REQUESTS", 20000),
        max_requests_jitter=_positive_int(environ, "GUNICORN_MAX_REQUESTS_JITTER", 2000),
        metrics_dir=_text(environ, "PROMETHEUS_MULTIPROC_DIR"),
    )


def gunicorn_binds(environ=None):
    """Where gunicorn will listen: ``(host, port, setting)`` for each TCP address.

    The ``--bind``/``-b`` flags of GUNICORN_CMD_ARGS when it has any (they win), else
    ``0.0.0.0:$PORT``; ``setting`` names the variable that chose the address. Unix sockets and
    file descriptors need no port and are left out.
    """
    environ = os.environ if environ is None else environ
    words = shlex.split(environ.get("GUNICORN_CMD_ARGS", ""))
    flags = []
    for i, word in enumerate(words):
        if word in ("-b", "--bind") and i + 1 < len(words):
            flags.append(words[i + 1])
        elif word.startswith("--bind="):
            flags.append(word[len("--bind="):])
        elif word.startswith("-b") and not word.startswith("--") and len(word) > 2:
            flags.append(word[2:])
    if not flags:
        return [("0.0.0.0", server_from_env(environ, cpu_count=1, workers=1).port, "PORT")]
    binds = []
    for address in flags:
        if address.startswith(("unix:", "fd://")):
            continue
        host, colon, port = address.rpartition(":")
        if not colon or not port.isdigit():
            host, port = address, "8000"  # gunicorn's default port
        binds.append((host.strip("[]") or "0.0.0.0", int(port), "GUNICORN_CMD_ARGS"))
    return binds


def child_environment(overrides):
    """Return this process's environment for a child process, with ``overrides`` (None removes)."""
    environment = dict(os.environ)
    for name, value in overrides.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = str(value)
    return environment
