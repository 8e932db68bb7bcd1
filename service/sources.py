"""Model sources: where the served model comes from, resolved to a local file and its provenance.

- :class:`PathSource` is ``PRED_MODEL_PATH``: a file on this host.
- :class:`MlflowSource` is ``PRED_MODEL_URI``: ``runs:/<run id>/<path>``, ``models:/<name>/<version>``,
  ``models:/<name>@<alias>`` or ``models:/<model id>`` (an MLflow 3 logged model), fetched from the
  tracking server into ``MODELS_DIR`` (once per host) as a model file or an MLflow model directory;
  only the alias form changes its model over time, which :meth:`MlflowSource.peek` sees.
"""

from dataclasses import dataclass, field
from pathlib import Path

from config.settings import Settings
from service.formats import model_uuid_from_path


class SourceError(RuntimeError):
    """A source cannot give its model; the message names the setting and the problem in one line.

    ``refused`` is True when asking again cannot help: the model is missing from its version, or
    is there but is not one the service can serve (as opposed to a source that could not be
    reached, or a transfer cut off, which may work next time); ``version`` names it when known.
    """

    def __init__(self, message, refused=False, version=None):
        super().__init__(message)
        self.refused, self.version = refused, version


@dataclass(frozen=True)
class Located:
    """A model file on this host and where it came from (``model_uuid``, ``model_uri``...)."""

    path: Path
    provenance: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PathSource:
    """``PRED_MODEL_PATH``: a model file on this host (re-read on demand when its content changes)."""

    path: str
    uuid: str | None = None
    setting = "PRED_MODEL_PATH"
    follows = False

    def locate(self):
        """The file and its provenance; reading it is the caller's job."""
        return Located(Path(self.path), {"model_uuid": self.uuid})

    def peek(self):
        """A file has no pointer to look at: None (its content is compared on reload instead)."""
        return None


@dataclass(frozen=True)
class MlflowSource:
    """``PRED_MODEL_URI``: a model on an MLflow tracking server, fetched into ``models_dir``."""

    uri: str
    models_dir: str
    uuid: str | None = None
    allow_programs: bool = False
    max_file_size: int = Settings.MAX_MODEL_FILE_SIZE
    code_modules: tuple[str, ...] = ()
    setting = "PRED_MODEL_URI"

    @property
    def follows(self):
        """True for ``models:/<name>@<alias>``: moving the alias changes the model served."""
        return self.uri.startswith("models:/") and "@" in self.uri

    def peek(self):
        """The registered version the alias points at now (one request, nothing downloaded); None
        for a URI that names a fixed model. Raises SourceError when the server cannot say."""
        if not self.follows:
            return None
        from service import mlflow_store  # here, not at the top: mlflow takes seconds to import

        try:
            return mlflow_store.alias_version(self.uri)
        except mlflow_store.FetchError as exc:
            raise SourceError(f"{self.setting}: {exc}") from None

    def locate(self):
        """Fetch the model into ``models_dir`` (a no-op once there) and return it with its provenance."""
        from service import mlflow_store  # here, not at the top: mlflow takes seconds to import

        try:
            fetched = mlflow_store.fetch_model_uri(
                self.uri, self.models_dir, allow_programs=self.allow_programs, max_size=self.max_file_size,
                code_modules=self.code_modules,
            )
        except mlflow_store.FetchError as exc:
            raise SourceError(f"{self.setting}: {exc}", refused=exc.permanent, version=exc.version) from None
        return Located(
            Path(fetched.path),
            {
                "model_uuid": self.uuid or fetched.run_id,
                "model_uri": self.uri,
                "model_name": fetched.model_name,
                "model_version": fetched.model_version,
                "model_source": fetched.source,
            },
        )


def from_config(config):
    """The source an app's settings name, or None when neither PRED_MODEL_PATH nor PRED_MODEL_URI is set."""
    path = config.get("PRED_MODEL_PATH")
    if path:
        return PathSource(path, config.get("PRED_MODEL_UUID") or model_uuid_from_path(path))
    if config.get("PRED_MODEL_URI"):
        return MlflowSource(
            config["PRED_MODEL_URI"],
            config.get("MODELS_DIR", "models"),
            config.get("PRED_MODEL_UUID"),
            bool(config.get("ALLOW_MODEL_PROGRAMS")),
            config.get("MAX_MODEL_FILE_SIZE") or Settings.MAX_MODEL_FILE_SIZE,
            tuple(config.get("MODEL_CODE_MODULES") or ()),
        )
    return None
