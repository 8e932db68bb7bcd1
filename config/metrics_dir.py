"""The directory prometheus_client's multiprocess mode shares between gunicorn's master and workers."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# Set once per master: gunicorn reads its config file again on every SIGHUP, in the same process,
# and a reload must neither wipe the live metric files nor make a second directory.
_PREPARED_BY = "PREDICTION_SERVICE_METRICS_PREPARED_BY"


def prepare(configured, environ=None, pid=None):
    """Return the metrics directory for this master, made ready once; set PROMETHEUS_MULTIPROC_DIR.

    ``configured`` (PROMETHEUS_MULTIPROC_DIR as the operator set it) is used as it is, less the
    metric files of an earlier run (only those: it may hold other files); without it a temporary
    directory is made and removed when the master exits. prometheus_client picks multiprocess
    mode when it is imported, so this runs before the app is.
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    if environ.get(_PREPARED_BY) == str(pid) and environ.get(VARIABLE):
        return environ[VARIABLE]  # a reload of this master: its workers' files are live
    directory = configured or tempfile.mkdtemp(prefix="prediction-service-metrics-")
    os.makedirs(directory, exist_ok=True)
    for stale in Path(directory).glob("*.db"):
        stale.unlink(missing_ok=True)
    environ[VARIABLE] = directory
    environ[_PREPARED_BY] = str(pid)
    if not configured:
        # atexit, not gunicorn's on_exit: a start that fails before gunicorn's main loop skips on_exit.
        atexit.register(_remove_if_master, directory, pid)
    return directory


def _remove_if_master(directory, master_pid):
    # Workers run exit handlers too: only the master, on its way out, removes the directory.
    if os.getpid() == master_pid:
        shutil.rmtree(directory, ignore_errors=True)
