"""The model registry: the served model of one app, as an object with named states.

One :class:`ModelRegistry` lives in each app (``app.extensions["model_registry"]``) and is fed by a
model source (:mod:`service.sources`). Its states:

- ``empty``: nothing loaded yet;
- ``loaded``: the model is read and checked on the CPU in this process, but not warmed up here
  (under gunicorn: the master, which loads before it forks and never serves);
- ``ready``: moved to its device, warmed up and checked here: it serves;
- ``unchecked``: warmed up, but its parity check (``VERIFY_MODEL_ON_START``) could not run yet
  (the tracking server could not be reached): it does not serve until the check runs and passes;
- ``failed``: loaded, but its warm-up or parity check failed here: it does not serve.

A rollout looks at the source; a new version (an alias moved, a file's content changed) becomes a
*candidate*, checked on the CPU (safe load, warm-up pass, labels against the network's output, the
parity check) before it replaces the served one. Each look ends in an :class:`Outcome`:

- a version that cannot be served (no model in its run, not a model file, over
  MAX_MODEL_FILE_SIZE, a failed check, an unexpected error) is *refused* once: the served model
  stays, the version and the reason are recorded, and it is not tried again;
- a look that could not be made (tracking server down, transfer cut off, a check that could not
  run) *failed*: nothing changes and it is tried again later, with a growing delay;
- an unchanged version costs a hash of its file, not a load.

Under gunicorn, :class:`AliasWatcher` does the fetch and the checks in the master off its main
loop (:meth:`ModelRegistry.stage`) and asks for the reload only once a checked candidate is in
memory; the reload (:meth:`ModelRegistry.refresh`) then only swaps it in. Each request takes one
:class:`ServedVersion` and uses it to the end, so a swap never mixes two models in one answer.
"""

import enum
import json
import logging
import multiprocessing
import os
import threading
import time
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

from config.settings import Settings
from service import engines, verify
from service.devices import select_device
from service.formats import ModelFileError, error_detail, file_sha256, read_model_file
from service.inference import Classifier
from service.sources import SourceError, from_config

log = logging.getLogger(__name__)

# Where an app keeps its registry: ``app.extensions[EXTENSION]``.
EXTENSION = "model_registry"
# After a look that could not be made, the next one waits twice as long each time, up to this.
RETRY_MAX_SECONDS = 300
# How many refused versions are remembered (each is never tried again by the watcher).
REFUSED_KEPT = 256


class ModelLoadError(ValueError):
    """The configured model cannot be served; the message names the setting and the problem."""


class ModelNotReady(RuntimeError):
    """The model is loaded but must not serve (it failed its warm-up or parity check here)."""


class State(str, enum.Enum):
    """Where a registry's served model stands in this process."""

    EMPTY = "empty"
    LOADED = "loaded"
    READY = "ready"
    UNCHECKED = "unchecked"
    FAILED = "failed"


class Outcome(str, enum.Enum):
    """What a look at the source did."""

    SWAPPED = "swapped"
    REFUSED = "refused"
    UNCHANGED = "unchanged"
    FAILED = "failed"  # the source could not be read, or a check could not run: tried again later
    STAGED = "staged"  # checked and waiting for the reload that swaps it in


def _now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def retry_delay(failures, interval):
    """Seconds before the next look after ``failures`` looks in a row could not be made."""
    return min(RETRY_MAX_SECONDS, max(1, interval) * 2 ** min(failures, 16))


@dataclass(frozen=True)
class ServedVersion:
    """One loaded model: the classifier and what ``/api/v1/model/version`` says of it."""

    classifier: Classifier
    info: dict
    # The network exported to ONNX and checked, when ONNX Runtime is to run it (engines.choose).
    onnx: bytes | None = None

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


def _cut(value, length):
    """``value`` cut to ``length`` characters (with an ellipsis) when it is a longer string."""
    return value[:length] + "…" if isinstance(value, str) and len(value) > length else value


class SharedRecord:
    """A small JSON value the gunicorn master writes and its workers read, in shared memory made
    before the first fork: workers forked earlier see the master's later rollouts."""

    SIZE = 8192

    def __init__(self):
        self._buffer = multiprocessing.Array("c", self.SIZE)

    def set(self, value):
        """Store ``value`` (a flat JSON-able dict; its longest strings cut, never its JSON, to fit)."""
        data = json.dumps(value).encode()
        longest = max((len(v) for v in value.values() if isinstance(v, str)), default=0)
        while len(data) >= self.SIZE and longest:
            # A string's JSON may take up to 12 bytes a character (an emoji as two \u escapes).
            longest //= 2
            data = json.dumps({k: _cut(v, longest) for k, v in value.items()}).encode()
        if len(data) >= self.SIZE:
            data = b"null"
        with self._buffer.get_lock():
            self._buffer.value = data

    def get(self):
        """The stored value, or None."""
        with self._buffer.get_lock():
            data = self._buffer.value
        try:
            return json.loads(data) if data else None
        except ValueError:
            return None


# Held while the alias watcher runs torch in the master (loading and checking a candidate), and
# taken by every fork: a worker is never forked from a master in the middle of torch code.
_TORCH_IN_MASTER = threading.Lock()
_fork_guard_installed = False


def _guard_forks():
    global _fork_guard_installed
    if not _fork_guard_installed:
        os.register_at_fork(
            before=_TORCH_IN_MASTER.acquire,
            after_in_parent=_TORCH_IN_MASTER.release,
            after_in_child=_TORCH_IN_MASTER.release,
        )
        _fork_guard_installed = True


class ModelRegistry:
    """The served model of one app: load, prepare, serve, and swap or refuse new versions."""

    def __init__(
        self, source=None, *, use_cuda=False, use_mps=False, verify_on_start=False, allow_programs=False,
        code_modules=(), max_file_size=Settings.MAX_MODEL_FILE_SIZE, poll_seconds=0, engine=engines.TORCH,
        max_batch=Settings.MAX_FILES,
    ):
        self.source = source
        self.use_cuda, self.use_mps = use_cuda, use_mps
        self.verify_on_start = verify_on_start
        self.allow_programs = allow_programs
        self.code_modules = tuple(code_modules)
        self.max_file_size = max_file_size
        self.poll_seconds = poll_seconds
        self.engine, self.max_batch = engine, max_batch
        self.state = State.EMPTY
        self.current = None
        self.problem = "no model loaded yet"  # the whole story, for logs and holders of the API key
        self.reason = "no model loaded yet"  # a few words, for anyone
        self.last_rollout = None
        self.threads = None
        # A checked candidate the watcher staged, waiting for the reload that swaps it in.
        self.staged = None
        # In a master, the version the last swap replaced, kept until the new one's workers start,
        # to go back to if they cannot (:meth:`roll_back`); why the next swap is a rollback.
        self.previous = None
        self._rolling_back = None
        # Versions refused, with why: the watcher never tries them again.
        self.refused = OrderedDict()
        # The parity check's report of each version (by SHA-256), run once in the process that loads.
        self.parity = {}
        # Called with each Rollout recorded (the rollouts metric); the shared copy for workers.
        self.on_rollout = None
        self.shared = None
        self._lock = threading.RLock()
        # Set while the watcher fetches and checks a candidate (:meth:`stage`), off the main loop.
        self._staging = threading.Event()

    @classmethod
    def from_config(cls, config):
        """A registry for an app's settings (PRED_MODEL_PATH or PRED_MODEL_URI and the model options).

        The options that decide which model files may be served are read here, once, and handed to
        the source as read: a download is checked exactly as the registry then loads it.
        """
        allow_programs = bool(config.get("ALLOW_MODEL_PROGRAMS"))
        code_modules = tuple(config.get("MODEL_CODE_MODULES") or ())
        max_file_size = config.get("MAX_MODEL_FILE_SIZE") or Settings.MAX_MODEL_FILE_SIZE
        source = from_config({
            **config,
            "ALLOW_MODEL_PROGRAMS": allow_programs,
            "MODEL_CODE_MODULES": code_modules,
            "MAX_MODEL_FILE_SIZE": max_file_size,
        })
        return cls(
            source,
            use_cuda=bool(config.get("USE_CUDA")),
            use_mps=bool(config.get("USE_MPS")),
            verify_on_start=bool(config.get("VERIFY_MODEL_ON_START")),
            allow_programs=allow_programs,
            code_modules=code_modules,
            max_file_size=max_file_size,
            poll_seconds=config.get("PRED_MODEL_POLL_SECONDS", Settings.PRED_MODEL_POLL_SECONDS),
            engine=config.get("INFERENCE_ENGINE") or Settings.INFERENCE_ENGINE,
            max_batch=config.get("MAX_FILES") or Settings.MAX_FILES,
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
        rollout = self.shared.get() if self.shared is not None else None
        if rollout is None and self.last_rollout is not None:
            rollout = self.last_rollout.as_dict()
        if rollout is None:
            return served.info
        return {**served.info, "rollout": rollout}

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
        """empty -> loaded: read the configured model on the CPU, and run its parity check with
        VERIFY_MODEL_ON_START (once, here: a gunicorn master hands the result to its workers);
        raise ModelLoadError naming the setting."""
        with self._lock:
            if self.current is None:
                try:
                    current = self._read()
                except ModelLoadError as exc:
                    self.problem, self.reason = str(exc), "the configured model cannot be loaded"
                    raise
                self._check_parity(current)
                self.current = current
                self.state = State.LOADED
                self.problem = self.reason = "the model is loaded but this worker has not warmed it up yet"
            return self.current

    def prepare_worker(self, threads=None):
        """loaded -> ready (or unchecked, or failed): in a serving process, set torch threads, move
        the model to its device and warm it up; the parity check's result is the loading process's.

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
        self._staging = threading.Event()

    def share_rollouts(self):
        """In a gunicorn master, before it forks: let the workers see the rollouts recorded later."""
        self.shared = SharedRecord()
        if self.last_rollout is not None:
            self.shared.set(self.last_rollout.as_dict())

    def refresh(self):
        """A rollout on reload: swap in the candidate the watcher staged, else look at the source
        now and serve a new version if there is one and it passes its checks. Once a model is
        served it never raises: every error is an outcome.

        Returns the :class:`Rollout`. In a process that serves (``ready``), the new version is
        prepared here before it is swapped in; elsewhere (the gunicorn master) it stays ``loaded``
        for the workers forked next to prepare.
        """
        with self._lock:
            if self.current is None:
                self.load()
                return self._record(Rollout(Outcome.SWAPPED, self.current.version))
            staged, self.staged = self.staged, None
            if staged is None:
                if self._staging.is_set():
                    # An operator's SIGHUP while the watcher fetches: the watcher reloads once it is checked.
                    log.info("rollout: a new version is being fetched and checked; it is swapped in once it passed")
                    return Rollout(Outcome.UNCHANGED, self.current.version, "a new version is being fetched and checked")
                staged, rollout = self._look()
                if staged is None:
                    return rollout
            elif self._serves(staged):
                log.info("rollout: %s is served already", staged.version)
                return Rollout(Outcome.UNCHANGED, self.current.version)
            reason, self._rolling_back = self._rolling_back, None
            return self._swap(staged, reason)

    def roll_back(self, reason):
        """In a master whose workers cannot start the served version (their warm-up fails, though the
        master's own check passed: a device out of memory, a network that fails on its second run):
        refuse it, once, and stage the version it replaced for the next reload. Returns the refusal,
        or None when there is nothing to go back to (then the workers go on trying, with backoff)."""
        with self._lock:
            previous, current = self.previous, self.current
            if previous is None or current is None or self.staged is not None:
                return None
            self.previous = None
            log.error("rollout: %s cannot start in the workers (%s): going back to %s", current.version, reason,
                      previous.version)
            self._remember_refused(current.version, f"its workers cannot start: {reason}")
            rollout = self._record(Rollout(Outcome.REFUSED, current.version, f"its workers cannot start: {reason}"))
            self.staged = previous
            self._rolling_back = f"back from {current.version}, whose workers cannot start"
            return rollout

    def started(self):
        """In a master: a worker started the served version, so the one it replaced is let go."""
        self.previous = None

    def stage(self, pointed=None):
        """Fetch and check the version the source points at (``pointed``, as :meth:`pending_version`
        gave it) without swapping it in: the alias watcher's work, off the master's main loop.
        Returns a Rollout whose outcome is ``staged`` when a checked candidate waits in
        :attr:`staged` for the reload; meanwhile an operator's reload does not look at the source
        itself. Never raises."""
        self._staging.set()
        try:
            candidate, rollout = self._look(pointed, guard=True)
            if candidate is None:
                return rollout
            with self._lock:
                if self._serves(candidate):  # an operator's reload swapped it in meanwhile
                    log.info("rollout: %s is served already", candidate.version)
                    return self._count(Rollout(Outcome.UNCHANGED, self.current.version))
                self.staged = candidate
        finally:
            self._staging.clear()
        log.info("rollout: %s is fetched and checked: reloading the workers to serve it", candidate.version)
        return Rollout(Outcome.STAGED, candidate.version)

    def check(self, candidate, torch_lock=None):
        """Why ``candidate`` must not serve (None when it may): a warm-up pass on the CPU that also
        checks the network's output against the labels, and the parity check with VERIFY_MODEL_ON_START.
        ``torch_lock`` is held around the forward passes only, never while the tracking server is asked."""
        started = time.perf_counter()
        try:
            with torch_lock or nullcontext():
                candidate.classifier.warm_up()
        except Exception as exc:  # a network that does not take its input shape, or an output/labels mismatch
            return (
                f"the warm-up forward pass on a {list(candidate.classifier.input_spec.shape)} input failed "
                f"({error_detail(exc)})"
            )
        log.info("rollout: %s passed its warm-up pass in %.1f ms", candidate.version, (time.perf_counter() - started) * 1000)
        report = self._check_parity(candidate, torch_lock)
        return None if report is None or report.ok else f"parity check failed: {report.summary}"

    def pending_version(self):
        """The version the source points at when it differs from the served one and was neither
        refused nor staged already; else None. Asks the source (one request for an alias), nothing
        more; raises SourceError when the source cannot say."""
        pointed = self.source.peek() if self.source is not None else None
        current, staged = self.current, self.staged
        if pointed is None or current is None or pointed == current.version or pointed in self.refused:
            return None
        if staged is not None and staged.version == pointed:
            return None
        return pointed

    def unchecked(self):
        """True when the served version's parity check could not run and should be tried again."""
        current = self.current
        if not self.verify_on_start or current is None:
            return False
        report = self.parity.get(current.info["sha256"])
        return report is not None and not report.ran

    def recheck(self):
        """Run the served version's parity check again; True when it ran (passed or failed)."""
        current = self.current
        _guard_forks()
        report = self._check_parity(current, _TORCH_IN_MASTER)
        return report is not None and report.ran

    # -- internals ----------------------------------------------------------------------------

    def _look(self, pointed=None, guard=False):
        """Locate, hash, read and check the source's model: (candidate, None) for a new version
        that passed, else (None, Rollout) saying what happened. Every error becomes an outcome."""
        version = pointed
        try:
            located = self.source.locate()
            version = located.provenance.get("model_version") or located.provenance.get("model_uuid") or version
            sha256 = file_sha256(located.path, self.max_file_size)
            current = self.current
            if sha256 == current.info["sha256"] and (version is None or version == current.version):
                log.info("rollout: %s is still the model to serve", current.version)
                return None, self._count(Rollout(Outcome.UNCHANGED, current.version))
            if guard:
                _guard_forks()
            # Forks wait while torch runs here, not while the tracking server is asked.
            torch_lock = _TORCH_IN_MASTER if guard else nullcontext()
            with torch_lock:
                candidate = self._read_located(located)
            version = candidate.version
            problem = self.check(candidate, torch_lock)
        except SourceError as exc:
            if exc.refused:
                return None, self._refuse(exc.version or version or self._pointed(), str(exc))
            return None, self._could_not(exc.version or version or self._pointed(), str(exc))
        except ModelFileError as exc:
            return None, self._refuse(version or self._pointed(), f"{self.source.setting}: {exc}")
        except BaseException as exc:  # a bug, MemoryError, a PermissionError, a project network's CancelledError...
            if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
                raise  # Ctrl-C in a process that looks itself (the CLI); gunicorn's master never gets one
            # ...never the server's end, nor the watcher's.
            log.exception("rollout: unexpected error while looking at %s", version or "the model source")
            return None, self._refuse(version or self._pointed(), f"unexpected error: {error_detail(exc)}")
        report = self.parity.get(candidate.info["sha256"])
        if report is not None and not report.ran:
            return None, self._could_not(version, f"parity check could not run: {report.summary}")
        if problem:
            return None, self._refuse(version, problem)
        return candidate, None

    def _serves(self, candidate):
        """True when ``candidate`` is the served model already: the same file, as the same version."""
        current = self.current
        return candidate.info["sha256"] == current.info["sha256"] and candidate.version == current.version

    def _pointed(self):
        """The version the source points at, to name one that could not be located; None if unknown."""
        try:
            return self.source.peek()
        except Exception:  # naming it is a courtesy: the outcome stands without it
            return None

    def _refuse(self, version, reason):
        current = self.current.version if self.current is not None else None
        log.error("rollout: refused %s, still serving %s: %s", version, current, reason)
        self._remember_refused(version, reason)
        return self._record(Rollout(Outcome.REFUSED, version, reason))

    def _remember_refused(self, version, reason):
        if version is not None:
            self.refused[version] = reason
            while len(self.refused) > REFUSED_KEPT:
                self.refused.popitem(last=False)

    def _could_not(self, version, reason):
        current = self.current.version if self.current is not None else None
        log.warning("rollout: cannot fetch or check %s for now, still serving %s: %s", version or "a new version", current, reason)
        return self._record(Rollout(Outcome.FAILED, version, reason))

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
        choice = self._choose_engine(model)
        info = {
            **located.provenance,
            "model_path": str(located.path),
            "sha256": model.sha256,
            "architecture": model.metadata["architecture"],
            "labels": list(model.classifier.labels),
            "input_shape": list(model.classifier.input_spec.shape),
            "device": "cpu",
            "engine": choice.engine,
            "loaded_at": _now(),
        }
        log.info(
            "loaded %s (%s, sha256 %s) in %.1f ms",
            located.path, info["architecture"], model.sha256[:12], (time.perf_counter() - started) * 1000,
        )
        return ServedVersion(model.classifier, info, choice.onnx)

    def _choose_engine(self, model):
        """The engine ``model`` will run on (INFERENCE_ENGINE), exported and checked here, where it
        is loaded; raises ModelFileError when ``onnxruntime`` was asked for and cannot be had."""
        device = "cuda" if self.use_cuda else "mps" if self.use_mps else "cpu"
        started = time.perf_counter()
        try:
            choice = engines.choose(model.classifier, model.metadata["architecture"], self.engine, self.max_batch, device)
        except engines.EngineError as exc:
            raise ModelFileError(str(exc)) from None
        if choice.engine == engines.ONNXRUNTIME:
            log.info(
                "exported to ONNX and checked against PyTorch in %.1f s: %s",
                time.perf_counter() - started, choice.reason,
            )
        elif self.engine == engines.AUTO:
            log.warning("serving with PyTorch, not ONNX Runtime: %s", choice.reason)
        return choice

    def _prepare(self, served):
        """Move ``served`` to its device and warm it up; with its parity result, the registry
        becomes ready, unchecked or failed."""
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
            classifier.runner = self._runner(served, device)
            served.info["engine"] = classifier.engine
            classifier.warm_up()
        except Exception as exc:
            # e.g. metadata giving an input size the network does not take, or a device out of memory
            self.state = State.FAILED
            self.reason = f"the warm-up forward pass failed on {device.type}"
            self.problem = (
                f"{self.source.setting}: {served.info.get('model_path')}: the warm-up forward pass on a "
                f"{list(classifier.input_spec.shape)} input on {device} failed ({error_detail(exc)})"
            )
            raise ModelLoadError(self.problem) from None
        log.info(
            "warm-up forward pass took %.1f ms (%s)", (time.perf_counter() - started) * 1000, classifier.engine
        )
        report = self.parity.get(served.info["sha256"]) if self.verify_on_start else None
        if report is None or report.ok:
            self.state, self.problem, self.reason = State.READY, None, None
        elif not report.ran:
            self.state, self.reason = State.UNCHECKED, "the parity check could not run yet"
            self.problem = f"parity check could not run (it is tried again): {report.summary}"
        else:
            self.state, self.reason = State.FAILED, "the parity check failed"
            self.problem = f"parity check failed: {report.summary}"

    def _runner(self, served, device):
        """This process's ONNX Runtime session for ``served`` (built here: its thread pools do not
        survive a fork), or None for PyTorch. Under ``auto`` a session that cannot be built falls
        back to PyTorch; under ``onnxruntime`` it fails the preparation."""
        if served.onnx is None or device.type != "cpu":
            return None
        try:
            return engines.OnnxRunner(served.onnx, threads=torch.get_num_threads())
        except engines.EngineError as exc:
            if self.engine == engines.ONNXRUNTIME:
                raise
            log.warning("serving with PyTorch, not ONNX Runtime: %s", exc)
            return None

    def _check_parity(self, served, torch_lock=None):
        """With VERIFY_MODEL_ON_START, run ``served``'s parity check, keep and return its report
        (``torch_lock`` held around its forward passes only)."""
        if not self.verify_on_start:
            return None
        try:
            report = verify.verify_classifier(served.classifier, served.info.get("model_uuid"), torch_lock=torch_lock)
        except Exception as exc:  # a check that crashes has not passed
            log.exception("parity check of %s could not run", served.version)
            report = verify.VerifyReport(False, f"the check itself failed: {error_detail(exc)}")
        if report.ok:
            log.info("parity check passed: %s", report.summary)
        elif report.ran:
            log.error("parity check failed: %s", report.summary)
        else:
            log.warning("parity check could not run (it will be tried again): %s", report.summary)
        self.parity[served.info["sha256"]] = report
        return report

    def _swap(self, candidate, reason=None):
        """Serve ``candidate`` from now on (``reason``: why, when it is a rollback); in a serving
        process the old version is released once no request holds it, in a master it is kept
        until a worker started the new one."""
        previous, serving = self.current, self.state is State.READY
        if serving:
            state = (self.state, self.problem, self.reason)
            try:
                self._prepare(candidate)
            except ModelLoadError as exc:
                self.state, self.problem, self.reason = state  # the served model is untouched
                return self._refuse(candidate.version, str(exc))
            if self.state is not State.READY:
                problem = self.problem
                self.state, self.problem, self.reason = state
                return self._refuse(candidate.version, problem)
        self.current = candidate
        self.previous = None if serving else previous
        log.info("rollout: now serving %s (was %s)%s", candidate.version, previous.version, f": {reason}" if reason else "")
        return self._record(Rollout(Outcome.SWAPPED, candidate.version, reason))

    def _count(self, rollout):
        if self.on_rollout is not None:
            try:
                self.on_rollout(rollout)
            except Exception:  # a metric must never stop a rollout
                log.exception("counting a rollout failed")
        return rollout

    def _record(self, rollout):
        self.last_rollout = rollout
        if self.shared is not None:
            self.shared.set(rollout.as_dict())
        return self._count(rollout)


class AliasWatcher(threading.Thread):
    """In the gunicorn master, off its main loop: every ``interval`` seconds, ask where the model's
    alias points (``follow``); fetch and check a new version (:meth:`ModelRegistry.stage`) and call
    ``notify`` (SIGHUP to the master) only once it passed, so that the reload just swaps it in.

    A refused version is not tried again; a look that could not be made is tried again after a
    delay that doubles each time (up to RETRY_MAX_SECONDS). A parity check that could not run is
    run again in the same way, and ``notify`` called once it ran, so the workers learn its result.
    """

    def __init__(self, registry, interval, notify, follow=True):
        super().__init__(name="model-alias-watcher", daemon=True)
        self.registry, self.interval, self.notify, self.follow = registry, interval, notify, follow
        self.failures = 0
        self._stopped = threading.Event()

    def run(self):
        wait = self.interval
        while not self._stopped.wait(wait):
            try:
                done = self.look()
            except BaseException:  # never let the watcher die (even for a BaseException): the next look may work
                log.exception("looking for a new model failed")
                done = False
            self.failures = 0 if done else self.failures + 1
            wait = retry_delay(self.failures, self.interval) if self.failures else self.interval
            if self.failures:
                log.info("looking again in %d s", wait)

    def look(self):
        """One look; False when it could not be made (to be tried again later)."""
        registry = self.registry
        if registry.staged is not None:
            return True  # a checked version waits for the reload
        if registry.unchecked():
            if not registry.recheck():
                return False
            log.info("the parity check of %s ran: reloading the workers to apply it", registry.current.version)
            self.notify()
            return True
        if not self.follow:
            return True
        try:
            pointed = registry.pending_version()
        except SourceError as exc:
            log.warning("cannot look for a new model: %s", exc)
            return False
        if pointed is None:
            return True
        log.info("the model source now points at %s: fetching and checking it", pointed)
        rollout = registry.stage(pointed)
        if rollout.outcome is Outcome.STAGED:
            self.notify()
        return rollout.outcome is not Outcome.FAILED

    def stop(self):
        """Stop after the current look (if any)."""
        self._stopped.set()
