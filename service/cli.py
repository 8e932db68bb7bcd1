"""``flask model ...`` commands, registered on ``app.cli`` by the app factory."""

import json
from pathlib import Path

import click
from flask.cli import AppGroup

from service.registry import read_model

model_cli = AppGroup("model", help="Inspect, fetch, train and verify models.")


@model_cli.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def inspect_command(path):
    """Load a model file as the service would and print what it serves."""
    try:
        classifier, metadata = read_model(path.read_bytes())
    except ValueError as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    summary = {
        "architecture": metadata["architecture"],
        "labels": list(classifier.labels),
        "input_shape": list(classifier.input_spec.shape),
        "normalize": {"mean": classifier.input_spec.mean, "std": classifier.input_spec.std}
        if classifier.input_spec.mean
        else None,
    }
    click.echo(json.dumps(summary, indent=2))
