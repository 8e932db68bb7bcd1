"""The model registry: the served model of one app, as an object with named states.

One :class:`ModelRegistry` lives in each app (``app.extensions["model_registry"]``) and is fed by a
model source (:mod:`service.sources`). Its states:

- ``empty``: nothing loaded yet;
- ``loaded``: the model is read and checked on the CPU in this process, but not warmed up here
  (under gunicorn: the master, which loads before it forks and never serves);
- ``ready``: moved to its device, warmed up and checked here: it serves;
- ``failed``: loaded, but its warm-up or parity check failed here: it does not serve.

:meth:`ModelRegistry.refresh` is a rollout: it looks at the source, and a new version (an alias
moved, a file's content changed) becomes a *candidate*, checked on the CPU (safe load, warm-up
pass, labels against the network's output, the parity check with ``VERIFY_MODEL_ON_START``)
before it replaces the served one. A candidate that fails is *refused*: the served model stays,
and :attr:`ModelRegistry.last_rollout` says which version was refused and why. Each request takes
one :class:`ServedVersion` and uses it to the end, so a swap never mixes two models in one answer.
"""

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from config.settings import Settings
from service import verify
from service.devices import select_device
from service.formats import ModelFileError, error_detail, read_model_file
from service.inference import Classifier
from service.sources import SourceError, from_config

log = logging.getLogger(__name__)

# Where an app keeps its registry: ``app.extensions[EXTENSION]``.
EXTENSION = "model_registry"


class ModelLoadError(ValueError):
    """The configured model cannot be served; the message names the setting and the problem."""


class ModelNotReady(RuntimeError):
    """The model is loaded but must not serve (it failed its warm-up or parity check here)."""


class State(str, enum.Enum):
    """Where a registry's served model stands in this process."""

    EMPTY = "empty"
    LOADED = "loaded"
    READY = "ready"
    FAILED = "failed"


class Outcome(str, enum.Enum):
    """What a look at the source did."""

    SWAPPED = "swapped"
    REFUSED = "refused"
    UNCHANGED = "unchanged"
    FAILED = "failed"  # the source could not be read (server down...): nothing changed


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ServedVersion:
    """One loaded model: the classifier and what ``/api/v1/model/version`` says of it."""

    classifier: Classifier
    info: dict

    @property
    def version(self):
        """How clients see this model (``X-Model-Version``): the registered version, else the run
        id, else the start of the file's SHA-256."""
        return self.info.get("model_version") or self.info.get("model_uuid") or f"sha256:{self.info['sha256'][:12]}"


@dataclass(frozen=True)
class Rollout:
    """The outcome of the last rollout: the version looked at, what happened, and why."""

    outcome: Outcome
    version: str | None
    reason: str | None = None
    at: str = field(default_factory=_now)

    def as_dict(self):
        """The rollout as ``/api/v1/model/version`` shows it."""
        return {"result": self.outcome.value, "version": self.version, "reason": self.reason, "at": self.at}


class ModelRegistry:
    """The served model of one app: load, prepare, serve, and swap or refuse new versions."""

    def __init__(
        self, source=None, *, use_cuda=False, use_mps=False, verify_on_start=False, allow_programs=False,
        code_modules=(), max_file_size=Settings.MAX_MODEL_FILE_SIZE, poll_seconds=0,
    ):
        self.source = source
        self.use_cuda, self.use_mps = use_cuda, use_mps
        self.verify_on_start = verify_on_start
        self.allow_programs = allow_programs
        self.code_modules = tuple(code_modules)
        self.max_file_size = max_file_size
        self.poll_seconds = poll_seconds
        self.state = State.EMPTY
        self.current = None
        self.problem = "no model loaded yet"
        self.last_rollout = None
        self.threads = None
        # A rollout in progress, and how many have finished: the alias watcher reads both, so that
        # it never asks again for a rollout that is under way.
        self.rolling_out = False
        self.rollouts_done = 0
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, config):
        """A registry for an app's settings (PRED_MODEL_PATH or PRED_MODEL_URI and the model options)."""
        return cls(
            from_config(config),
            use_cuda=bool(config.get("USE_CUDA")),
            use_mps=bool(config.get("USE_MPS")),
            verify_on_start=bool(config.get("VERIFY_MODEL_ON_START")),
            allow_programs=bool(config.get("ALLOW_MODEL_PROGRAMS")),
            code_modules=tuple(config.get("MODEL_CODE_MODULES") or ()),
            max_file_size=config.get("MAX_MODEL_FILE_SIZE") or Settings.MAX_MODEL_FILE_SIZE,
            poll_seconds=config.get("PRED_MODEL_POLL_SECONDS", Settings.PRED_MODEL_POLL_SECONDS),
        )

    # -- what a request asks ------------------------------------------------------------------

    @property
    def ready(self):
        """True once this process has loaded and warmed up the model and it passed its checks."""
        return self.state is State.READY

    @property
    def info(self):
        """What is served (empty before a model is loaded), with the last rollout's outcome."""
        return self.describe(self.current) if self.current is not None else {}

    def describe(self, served):
        """``served``'s identity with the outcome of the last rollout, as ``/api/v1/model/version`` shows it."""
        if self.last_rollout is None:
            return served.info
        return {**served.info, "rollout": self.last_rollout.as_dict()}

    def get(self):
        """Return the :class:`ServedVersion` to answer one request with, preparing it here if need be.

        Raises ModelLoadError when the model cannot be loaded, ModelNotReady when it failed a check.
        """
        current = self.current
        if self.state is State.READY and current is not None:
            return current
        self.prepare_worker()
        if self.state is not State.READY:
            raise ModelNotReady(self.problem)
        return self.current

    # -- state changes ------------------------------------------------------------------------

    def load(self):
        """empty -> loaded: read the configured model on the CPU; raise ModelLoadError naming the setting."""
        with self._lock:
            if self.current is None:
                try:
                    self.current = self._read()
                except ModelLoadError as exc:
                    self.problem = str(exc)  # what /health/ready reports
                    raise
                self.state = State.LOADED
                self.problem = "the model is loaded but this worker has not warmed it up yet"
            return self.current

    def prepare_worker(self, threads=None):
        """loaded -> ready (or failed): in a serving process, set torch threads, move the model to
        its device and warm it up, then run the parity check if asked for.

        Raises ModelLoadError when the model cannot be loaded or the warm-up fails.
        """
        with self._lock:
            if threads:
                self.threads = threads
                torch.set_num_threads(threads)
            self.load()
            if self.state is State.LOADED:
                self._prepare(self.current)
            return self.current

    def after_fork(self):
        """In a process just forked from one whose other threads may have held the lock: a fresh lock."""
        self._lock = threading.RLock()

    def refresh(self):
        """A rollout: look at the source and serve a new version if there is one and it passes its checks.

        Returns the :class:`Rollout`. In a process that serves (``ready``), the new version is
        prepared here before it is swapped in; elsewhere (the gunicorn master) it stays ``loaded``
        for the workers forked next to prepare.
        """
        with self._lock:
            self.rolling_out = True
            try:
                return self._refresh()
            finally:
                self.rolling_out = False
                self.rollouts_done += 1

    def _refresh(self):
        if self.current is None:
            self.load()
            return self._record(Rollout(Outcome.SWAPPED, self.current.version))
        try:
            located = self.source.locate()
        except SourceError as exc:
            if exc.refused:
                log.error("rollout: refused %s, still serving %s: %s", exc.version, self.current.version, exc)
                return self._record(Rollout(Outcome.REFUSED, exc.version, str(exc)))
            log.error("rollout: cannot look at the model source, still serving %s: %s", self.current.version, exc)
            return self._record(Rollout(Outcome.FAILED, None, str(exc)))
        try:
            candidate = self._read_located(located)
        except ModelFileError as exc:
            version = located.provenance.get("model_version") or located.provenance.get("model_uuid")
            log.error("rollout: refused %s, still serving %s: %s", version, self.current.version, exc)
            return self._record(Rollout(Outcome.REFUSED, version, f"{self.source.setting}: {exc}"))
        if candidate.info["sha256"] == self.current.info["sha256"] and candidate.version == self.current.version:
            log.info("rollout: %s is still the model to serve", self.current.version)
            return Rollout(Outcome.UNCHANGED, candidate.version)
        problem = self.check(candidate)
        if problem:
            log.error(
                "rollout: refused %s, still serving %s: %s", candidate.version, self.current.version, problem
            )
            return self._record(Rollout(Outcome.REFUSED, candidate.version, problem))
        return self._record(self._swap(candidate))

    def check(self, candidate):
        """Why ``candidate`` must not serve (None when it may): a warm-up pass on the CPU that also
        checks the network's output against the labels, and the parity check with VERIFY_MODEL_ON_START."""
        started = time.perf_counter()
        try:
            candidate.classifier.warm_up()
        except Exception as exc:  # a network that does not take its input shape, or an output/labels mismatch
            return (
                f"the warm-up forward pass on a {list(candidate.classifier.input_spec.shape)} input failed "
                f"({error_detail(exc)})"
            )
        log.info("rollout: %s passed its warm-up pass in %.1f ms", candidate.version, (time.perf_counter() - started) * 1000)
        return self._parity_problem(candidate)

    def pending_version(self):
        """The version the source points at when it differs from the served one and was not
        refused already; else None. Asks the source (one request for an alias), nothing more."""
        try:
            pointed = self.source.peek() if self.source is not None else None
        except SourceError as exc:
            log.warning("cannot look for a new model: %s", exc)
            return None
        current, last = self.current, self.last_rollout
        if pointed is None or current is None or pointed == current.version:
            return None
        if last is not None and last.outcome is Outcome.REFUSED and last.version == pointed:
            return None
        return pointed

    # -- internals ----------------------------------------------------------------------------

    def _read(self):
        """Locate and read the source's model on the CPU into a new :class:`ServedVersion`."""
        located = self._locate()
        try:
            return self._read_located(located)
        except ModelFileError as exc:
            raise ModelLoadError(f"{self.source.setting}: {exc}") from None

    def _locate(self):
        if self.source is None:
            raise ModelLoadError("PRED_MODEL_PATH: not set (nor PRED_MODEL_URI): no model to serve")
        try:
            return self.source.locate()
        except SourceError as exc:
            raise ModelLoadError(str(exc)) from None

    def _read_located(self, located):
        started = time.perf_counter()
        model = read_model_file(located.path, self.allow_programs, self.max_file_size, self.code_modules)
        info = {
            **located.provenance,
            "model_path": str(located.path),
            "sha256": model.sha256,
            "architecture": model.metadata["architecture"],
            "labels": list(model.classifier.labels),
            "input_shape": list(model.classifier.input_spec.shape),
            "device": "cpu",
            "loaded_at": _now(),
        }
        log.info(
            "loaded %s (%s, sha256 %s) in %.1f ms",
            located.path, info["architecture"], model.sha256[:12], (time.perf_counter() - started) * 1000,
        )
        return ServedVersion(model.classifier, info)

    def _prepare(self, served, parity=True):
        """Move ``served`` to its device, warm it up and check it; the registry becomes ready or failed."""
        device, why, fell_back = select_device(self.use_cuda, self.use_mps)
        (log.warning if fell_back else log.info)(
            "serving on %s: %s; %d torch thread(s)", device, why, torch.get_num_threads()
        )
        classifier = served.classifier
        started = time.perf_counter()
        try:
            classifier.module.to(device)
            classifier.device = device
            served.info["device"] = str(device)
            classifier.warm_up()
        except Exception as exc:
            # e.g. metadata giving an input size the network does not take, or a device out of memory
            self.state = State.FAILED
            self.problem = (
                f"{self.source.setting}: {served.info.get('model_path')}: the warm-up forward pass on a "
                f"{list(classifier.input_spec.shape)} input on {device} failed ({error_detail(exc)})"
            )
            raise ModelLoadError(self.problem) from None
        log.info("warm-up forward pass took %.1f ms", (time.perf_counter() - started) * 1000)
        problem = self._parity_problem(served) if parity else None
        self.state, self.problem = (State.FAILED, problem) if problem else (State.READY, None)

    def _parity_problem(self, served):
        """With VERIFY_MODEL_ON_START, why the model fails its parity check (None if it passes)."""
        if not self.verify_on_start:
            return None
        try:
            report = verify.verify_classifier(served.classifier, served.info.get("model_uuid"))
        except Exception as exc:  # a check that cannot run has not passed
            log.exception("parity check could not run")
            return f"parity check could not run: {error_detail(exc)}"
        if report.ok:
            log.info("parity check passed: %s", report.summary)
            return None
        log.error("parity check failed: %s", report.summary)
        return f"parity check failed: {report.summary}"

    def _swap(self, candidate):
        """Serve ``candidate`` from now on; the old version is released once no request holds it."""
        previous, serving = self.current, self.state is State.READY
        if serving:
            try:
                self._prepare(candidate, parity=False)  # check() ran it already
            except ModelLoadError as exc:
                self.state, self.problem = State.READY, None  # the served model is untouched
                return Rollout(Outcome.REFUSED, candidate.version, str(exc))
            if self.state is not State.READY:
                problem, self.state, self.problem = self.problem, State.READY, None
                return Rollout(Outcome.REFUSED, candidate.version, problem)
        self.current = candidate
        log.info("rollout: now serving %s (was %s)", candidate.version, previous.version)
        return Rollout(Outcome.SWAPPED, candidate.version)

    def _record(self, rollout):
        self.last_rollout = rollout
        return rollout


class AliasWatcher(threading.Thread):
    """Every ``interval`` seconds, ask the registry's source where its alias points; call ``notify``
    when it points at a version that is neither served nor already refused.

    Under gunicorn it runs in the master, and ``notify`` sends the master SIGHUP: the rollout
    itself (fetch, checks, swap) then happens in the master's main thread, where nothing forks
    at the same time. It only makes requests to the tracking server; it never touches torch.
    """

    def __init__(self, registry, interval, notify):
        super().__init__(name="model-alias-watcher", daemon=True)
        self.registry, self.interval, self.notify = registry, interval, notify
        self._stopped = threading.Event()

    def run(self):
        registry = self.registry
        while not self._stopped.wait(self.interval):
            done = registry.rollouts_done
            if registry.rolling_out:
                continue
            try:
                pending = registry.pending_version()
            except Exception:  # never let the watcher die: the next look may work
                log.exception("looking for a new model failed")
                continue
            if pending is None or registry.rolling_out or registry.rollouts_done != done:
                continue  # nothing new, or a rollout ran meanwhile: look again next time
            log.info("the model source now points at %s: rolling it out", pending)
            self.notify()
            # One request at a time: wait for the rollout asked for before looking again.
            while registry.rollouts_done == done and not self._stopped.wait(self.interval):
                pass

    def stop(self):
        """Stop after the current look (if any)."""
        self._stopped.set()
