"""``flask model ...`` commands, registered on ``app.cli`` by the app factory."""

import json
import shlex
from pathlib import Path

import click
from flask import current_app
from flask.cli import AppGroup

from config.settings import ConfigError, gunicorn_binds, tracking_uri
from service import architectures, demo, engines
from service.formats import ModelFileError, read_model_file
from service.registry import ModelLoadError, ModelRegistry
from service.training import DEFAULT_EXPERIMENT, TrainConfig

model_cli = AppGroup("model", help="Inspect, fetch, train and verify models.")


@model_cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
def inspect_command(path):
    """Load a model file (or MLflow model directory) as the service would and print what it serves:
    the architecture and where its code comes from, the preprocessing, the labels and the size."""
    config = current_app.config
    try:
        model = read_model_file(
            path, config["ALLOW_MODEL_PROGRAMS"], config["MAX_MODEL_FILE_SIZE"], config["MODEL_CODE_MODULES"]
        )
    except ModelFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(describe(model), indent=2))


def describe(model):
    """What ``flask model inspect`` prints of a :class:`~service.formats.ModelFile`."""
    classifier, metadata = model.classifier, model.metadata
    spec = classifier.input_spec
    return {
        "architecture": metadata["architecture"],
        "code": code_source(metadata["architecture"], current_app.config["MODEL_CODE_MODULES"]),
        "architecture_args": metadata.get("architecture_args") or {},
        "weights": metadata.get("weights"),
        "parameters": sum(p.numel() for p in classifier.module.parameters()),
        "input_shape": list(spec.shape),
        "normalize": {"mean": spec.mean, "std": spec.std} if spec.mean else None,
        "preprocess": spec.describe(),
        "label_count": len(classifier.labels),
        "labels": list(classifier.labels),
        "engine": _engine(model),
        "file": {"size": model.size, "sha256": model.sha256},
    }


def _engine(model):
    """The engine the service would run ``model`` on, under INFERENCE_ENGINE, and why."""
    config = current_app.config
    try:
        choice = engines.choose(
            model.classifier, model.metadata["architecture"], config["INFERENCE_ENGINE"], config["MAX_FILES"]
        )
    except engines.EngineError as exc:
        return {"engine": None, "why": str(exc)}
    return {"engine": choice.engine, "why": choice.reason}


def code_source(name, code_modules):
    """Where the code of architecture ``name`` comes from, in words."""
    if name.startswith(("torchscript:", "torch.export")):
        return "the model file itself (a program, ALLOW_MODEL_PROGRAMS)"
    return architectures.resolve(name, code_modules).source


@model_cli.command("architectures")
def architectures_command():
    """List the architecture names a model file's metadata can give: built-in and torchvision
    classifiers (and say how to allow the project's own)."""
    for name in sorted(architectures.ARCHITECTURES):
        click.echo(name)
    for name in architectures.classification_models():
        click.echo(f"{architectures.TORCHVISION}:{name}")
    modules = current_app.config["MODEL_CODE_MODULES"]
    allowed = ", ".join(modules) if modules else "none"
    click.echo(
        f"<module>:<class or marked function> for modules under {architectures.CODE_MODULES_SETTING} "
        f"(now: {allowed})",
        err=True,
    )


# MLflow and plotting are imported by the commands that use them: the app (and every gunicorn
# worker) imports this module, and does not need them.


@model_cli.command("download")
@click.argument("run_id_or_uri", metavar="RUN_ID|URI")
def download_command(run_id_or_uri):
    """Download a model from MLflow into MODELS_DIR and print how to serve it.

    RUN_ID|URI is a run id (its model/model.pt, or its MLflow model folder), or a model URI as
    PRED_MODEL_URI takes it: runs:/<run id>/<path>, models:/<name>/<version>, models:/<name>@<alias>
    or models:/<model id>. The tracking server, credentials and TLS options come from MLflow's
    own variables (MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD, ...),
    an object store's from its own (AWS_*, MLFLOW_S3_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS).
    Running it again once the model is there does nothing.
    """
    from service import mlflow_store

    config = current_app.config
    options = {
        "allow_programs": config["ALLOW_MODEL_PROGRAMS"], "max_size": config["MAX_MODEL_FILE_SIZE"],
        "code_modules": config["MODEL_CODE_MODULES"],
    }
    try:
        if run_id_or_uri.startswith(("runs:/", "models:/")):
            path = mlflow_store.fetch_model_uri(run_id_or_uri, config["MODELS_DIR"], **options).path
        else:
            path = mlflow_store.download_run(run_id_or_uri, config["MODELS_DIR"], **options)
    except mlflow_store.FetchError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"export PRED_MODEL_PATH={shlex.quote(str(path))}")


@model_cli.command("train")
@click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size, show_default=True)
@click.option(
    "--learning-rate", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.learning_rate,
    show_default=True,
)
@click.option("--seed", type=int, default=TrainConfig.seed, show_default=True,
              help="Initialisation, shuffling, augmentation and dropout.")
@click.option("--split-seed", type=int, default=TrainConfig.split_seed, show_default=True,
              help="Which digits are held out.")
@click.option("--test-fraction", type=click.FloatRange(0.05, 0.5), default=TrainConfig.test_fraction,
              show_default=True)
@click.option("--train-limit", type=click.IntRange(min=1), help="Train on the first N training digits only.")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True, help="MLflow experiment name.")
@click.option("--register-name", help="Register the model under this name.")
@click.option("--alias", help="Point this alias of the registered model at the new version.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_command(experiment, register_name, alias, quiet, **options):
    """Train the digit CNN on scikit-learn's digits and log it to MLflow; print the run id.

    Logs parameters, per-epoch losses and accuracies, the checkpoint at model/model.pt, a
    confusion matrix and sample predictions to the tracking server MLflow is configured with
    (MLFLOW_TRACKING_URI).
    """
    from mlflow.exceptions import MlflowException

    from service import mlflow_store
    from service.training import train_and_log

    if alias and not register_name:
        raise click.UsageError("--alias needs --register-name")
    try:
        logged = train_and_log(
            TrainConfig(**options), experiment=experiment, register_name=register_name, alias=alias,
            progress=not quiet,
        )
    except mlflow_store.FetchError as exc:
        raise click.ClickException(str(exc)) from None
    except (MlflowException, ValueError) as exc:
        raise click.ClickException(mlflow_store.first_line(exc)) from None
    registered = f"; registered as {logged.model_name} version {logged.model_version}" if logged.model_name else ""
    click.echo(f"test accuracy {logged.test_accuracy:.2%}{registered}", err=True)
    click.echo(f"fetch it with: flask --app wsgi model download {logged.run_id}", err=True)
    click.echo(logged.run_id)


@model_cli.command("verify")
@click.argument("target", required=False)
@click.option("--run-id", help="The run whose test_accuracy to compare with (default: the model's own run).")
def verify_command(target, run_id):
    """Check a model against its MLflow run: held-out digits, sent as PNG, must score the logged accuracy.

    TARGET is a run id (downloaded first if need be) or a model file; without it, the configured
    model (PRED_MODEL_PATH or PRED_MODEL_URI) is checked. More than 1 point apart fails.
    """
    from service import mlflow_store
    from service.verify import verify_classifier

    config = dict(current_app.config)
    if target and Path(target).is_file():
        path = Path(target).absolute()
        config.update(PRED_MODEL_PATH=str(path), PRED_MODEL_URI=None, PRED_MODEL_UUID=run_id)
    elif target:
        try:
            path = mlflow_store.download_run(
                target, config["MODELS_DIR"], allow_programs=config["ALLOW_MODEL_PROGRAMS"],
                max_size=config["MAX_MODEL_FILE_SIZE"], code_modules=config["MODEL_CODE_MODULES"],
            )
        except mlflow_store.FetchError as exc:
            raise click.ClickException(str(exc)) from None
        config.update(PRED_MODEL_PATH=str(path), PRED_MODEL_URI=None, PRED_MODEL_UUID=run_id or target)
    elif run_id:
        config.update(PRED_MODEL_UUID=run_id)
    models = ModelRegistry.from_config(config)
    try:
        served = models.load()
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None
    if not served.info.get("model_uuid"):
        raise click.ClickException(
            "no MLflow run id to compare with: pass --run-id (or keep the model at models/<run_id>/model/model.pt)"
        )
    report = verify_classifier(served.classifier, served.info["model_uuid"])
    if not report.ok:
        raise click.ClickException(f"parity check failed: {report.summary}")
    click.echo(f"parity check passed: {report.summary}")


@model_cli.command("serve")
@click.option("--mlflow-host", default=demo.HOST, show_default=True, help="The demo's tracking server address.")
@click.option("--mlflow-port", type=click.IntRange(1, 65535), default=demo.PORT, show_default=True)
@click.option("--mlflow-store", "store", type=click.Path(file_okay=False, path_type=Path), default=demo.STORE,
              help="The demo's tracking store (default: var/mlflow/).")
def serve_command(mlflow_host, mlflow_port, store):
    """Serve the configured model with gunicorn; with none configured, serve the demo model.

    The demo: a local MLflow tracking server (store in var/mlflow/), the demo model trained there
    once, downloaded by run id and served. Ctrl-C stops the service and the tracking server it
    started; a tracking server that was already running is left running.
    """
    from mlflow.exceptions import MlflowException

    from service import mlflow_store

    try:
        demo.check_serving_ports(gunicorn_binds())
    except (ConfigError, demo.DemoError) as exc:
        raise click.ClickException(str(exc)) from None
    if current_app.config["PRED_MODEL_PATH"] or current_app.config["PRED_MODEL_URI"]:
        demo.exec_gunicorn()
    try:
        demo.check_tracking_uri(tracking_uri(default=None), mlflow_host, mlflow_port)
        status = demo.serve_demo(current_app.config["MODELS_DIR"], store, mlflow_host, mlflow_port)
    except (ConfigError, demo.DemoError, mlflow_store.FetchError) as exc:
        raise click.ClickException(str(exc)) from None
    except MlflowException as exc:
        raise click.ClickException(mlflow_store.first_line(exc)) from None
    except KeyboardInterrupt:
        status = 130
    raise SystemExit(status)


@model_cli.command("tracking-server")
@click.option("--host", default=demo.HOST, show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=demo.PORT, show_default=True)
def tracking_server_command(host, port):
    """Run the local MLflow tracking server (store in var/mlflow/) in the foreground."""
    click.echo(f"MLflow tracking server: UI at {demo.tracking_server_url(host, port)}, store in {demo.STORE}", err=True)
    try:
        status = demo.run_tracking_server(demo.STORE, host, port)
    except demo.DemoError as exc:
        raise click.ClickException(str(exc)) from None
    raise SystemExit(status)
