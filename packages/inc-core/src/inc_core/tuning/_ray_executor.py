"""RayExecutor: tuning trials as Ray tasks on a cluster (``pip install inc-core[ray]``).

Ray is imported when an executor is created, never when this module is imported, so inc-core keeps
working without it. The trial function (which holds the model, the calibration result, the backend
and ``eval_fn``) goes to the object store once per tuning run; each trial is a task that receives a
reference to it plus one candidate, quantizes and evaluates on a worker, and sends back the outcome.
The driver alone writes the history: results are read as they finish (``ray.wait``) but handed to
the engine in candidate order, so the search, its history file and resuming are the same as with the
sequential executor.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from inc_core.errors import BackendNotFoundError, ConfigError, IncError, TuningError

__all__ = ["RayExecutor", "import_ray", "check_address", "INSTALL_HINT"]

log = logging.getLogger("inc")

C = TypeVar("C")
R = TypeVar("R")

INSTALL_HINT = "pip install inc-core[ray]"
# How long the driver tries to open a TCP connection to a cluster's address before giving up: an
# unreachable address fails here in seconds instead of in Ray's own (much longer) connection retries.
CONNECT_TIMEOUT_S = 5.0
RAY_CLIENT_PORT = 10001


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`BackendNotFoundError` that says how to install it."""
    try:
        # Through importlib so that inc-core's type checking and import never need Ray.
        return importlib.import_module("ray")
    except ImportError as exc:
        raise BackendNotFoundError(
            "Distributed tuning (TuningConfig(executor='ray') or RayExecutor) needs Ray, which is not installed "
            f"in this environment ({exc}). Install it with `{INSTALL_HINT}`, or use executor='sequential'."
        ) from exc


def check_address(owner: str, address: Any) -> None:
    """Reject an address that cannot name a Ray cluster (``None``, ``"auto"``, ``"ray://host:port"``, ``"host:port"``)."""
    if address is None or address == "auto":
        return
    expected = "None (a local cluster), 'auto' (the cluster this machine belongs to), 'ray://host:port' or 'host:port'"
    if not isinstance(address, str) or not address.strip():
        raise ConfigError(f"{owner}: address must be {expected}; got {address!r}.")
    host, port = _host_port(address)
    if not host or port is None:
        raise ConfigError(f"{owner}: address {address!r} names no host and port; expected {expected}.")


def _host_port(address: str) -> tuple[str | None, int | None]:
    text = address if "://" in address else f"tcp://{address}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:  # a port that is not a number
        return None, None
    if parts.scheme not in ("ray", "tcp") or parts.path not in ("", "/"):
        return None, None
    if port is None and parts.scheme == "ray":
        port = RAY_CLIENT_PORT
    return parts.hostname, port


def _check_reachable(address: str) -> None:
    """Fail fast, before anything runs, when nothing listens at a cluster address."""
    host, port = _host_port(address)
    assert host is not None and port is not None  # check_address ran in __init__
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise TuningError(
            f"RayExecutor: cannot reach a Ray cluster at address {address!r} ({exc}); nothing was run. "
            "Check that the cluster is up (`ray status` on its head node) and that this machine can reach that host "
            "and port, or use address=None to start a local cluster."
        ) from exc


def _where() -> str:
    """The worker a task runs on: the host name and process id (unique across a cluster's nodes)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _run_trial(fn: Callable[[Any], Any], candidate: Any) -> tuple[Any, str, float]:
    """The Ray task: run the trial function on one candidate; report where and how long."""
    start = time.perf_counter()
    result = fn(candidate)
    where = _where()
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        if any(f.name == "worker" for f in dataclasses.fields(result)):
            result = dataclasses.replace(result, worker=where)
    return result, where, time.perf_counter() - start


class RayExecutor:
    """Runs tuning trials in parallel as Ray tasks, one CPU (by default) per trial.

    Creating the executor connects to the cluster (or starts a local one), so a bad or unreachable
    address fails before the baseline is evaluated. Pass it to ``autotune(..., executor=...)``, or
    let ``TuningConfig(executor="ray", workers=N, address=...)`` create one for the run. An executor
    you create is yours to :meth:`shutdown` (or use it as a context manager); one created from the
    config is shut down by ``autotune``. Ray is only shut down when this executor started it.

    A worker process that dies mid-trial (killed, out of memory, its node lost) costs the trial one
    retry (``max_retries``); if it dies again the trial is recorded as a failed trial and the search
    goes on. An exception from ``eval_fn`` on a worker ends the run as it would in this process.
    Interrupting the driver (Ctrl-C) cancels the tasks still running; the history file holds every
    trial that finished, and the next run with it resumes.

    What stays the same as in one process: the engine consumes results in candidate order and the
    strategies see the same scores, so for a given seed the basic, mse, exhaustive, conservative and
    random strategies try the same configs and choose the same one with any number of workers;
    bayesian asks ``workers`` configs per batch, which is reproducible for a given seed and worker
    count but is another search than the sequential one. This assumes ``eval_fn`` scores a model the
    same on every node (INT8 kernels round differently on different CPUs: use one kind of node) and
    no ``timeout_s`` (a timeout cuts a parallel run at another trial). Trials of a batch that run
    after the first passing one are cancelled or discarded; they cost worker time, not the result.

    Args:
        workers: how many trials run at once. With ``address=None`` also the CPUs of the local
            cluster; ``None``: the cluster's CPUs divided by ``cpus_per_trial``.
        address: ``None`` to start a local cluster, ``"auto"`` for the cluster this machine belongs
            to, ``"ray://host:port"`` (Ray client) or ``"host:port"`` for a cluster's head node.
            Ignored when Ray is already initialized in this process (that cluster is used).
        max_retries: how often Ray re-runs a trial whose worker died (0 or more).
        cpus_per_trial: the CPUs a trial task reserves on its node.
        runtime_env: passed to ``ray.init`` (e.g. ``{"pip": [...]}`` or ``{"py_modules": [...]}``)
            so workers can import the backend plugin and what ``eval_fn`` needs.

    Raises:
        BackendNotFoundError: Ray is not installed (``pip install inc-core[ray]``).
        ConfigError: a bad argument.
        TuningError: the cluster cannot be reached or Ray fails to start; nothing has run.
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        address: str | None = None,
        max_retries: int = 1,
        cpus_per_trial: float = 1.0,
        runtime_env: Mapping[str, Any] | None = None,
    ) -> None:
        owner = "RayExecutor"
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ConfigError(f"{owner}: workers must be a positive int or None (all the cluster's CPUs), got {workers!r}.")
        check_address(owner, address)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"{owner}: max_retries must be an int >= 0, got {max_retries!r}.")
        if isinstance(cpus_per_trial, bool) or not isinstance(cpus_per_trial, (int, float)) or not cpus_per_trial > 0:
            raise ConfigError(f"{owner}: cpus_per_trial must be a number > 0, got {cpus_per_trial!r}.")
        if runtime_env is not None and not isinstance(runtime_env, Mapping):
            raise ConfigError(f"{owner}: runtime_env must be a mapping (see ray.init), got {type(runtime_env).__name__}.")
        self._ray = import_ray()
        self.address = address
        self.max_retries = max_retries
        self.started_ray = self._connect(workers, address, dict(runtime_env) if runtime_env else None)
        if workers is None:
            cpus = float(self._ray.cluster_resources().get("CPU", 1.0))
            workers = max(1, int(cpus // cpus_per_trial))
        self.workers = workers
        self._task = self._ray.remote(num_cpus=cpus_per_trial, max_retries=max_retries, retry_exceptions=False)(_run_trial)
        self._shared: tuple[Any, Any] | None = None  # (trial function, its object ref): put once per run
        self.in_flight = 0
        self.done = 0

    @property
    def description(self) -> str:
        """One line for logs and the tuning report."""
        where = "a local cluster" if self.address is None else f"the cluster at {self.address}"
        return f"ray ({self.workers} worker{'s' if self.workers != 1 else ''}, {where})"

    def _connect(self, workers: int | None, address: str | None, runtime_env: dict[str, Any] | None) -> bool:
        """Start or join a cluster; whether this executor started Ray (and so shuts it down)."""
        ray = self._ray
        if ray.is_initialized():
            if address is not None:
                log.warning("RayExecutor: Ray is already initialized in this process; using that cluster, not address=%r", address)
            return False
        if address is not None and address != "auto":
            _check_reachable(address)
        options: dict[str, Any] = {"logging_level": logging.WARNING, "include_dashboard": False}
        if runtime_env is not None:
            options["runtime_env"] = runtime_env
        if address is None:
            options["num_cpus"] = workers  # None: all of this machine's CPUs
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            raise TuningError(
                f"RayExecutor: could not {'start a local Ray cluster' if address is None else f'connect to the Ray cluster at {address!r}'} "
                f"({type(exc).__name__}: {' '.join(str(exc).split())}); nothing was run. "
                + (
                    "With address='auto', start the cluster first (`ray start --head`) or pass address=None for a local one."
                    if address == "auto"
                    else "Check the address and that the cluster runs the same Ray and Python versions as this machine."
                )
            ) from exc
        return True

    def shutdown(self) -> None:
        """Release the trial function from the object store; stop Ray if this executor started it."""
        self._shared = None
        if self.started_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self.started_ray = False

    close = shutdown  # what autotune calls on an executor it created from the TuningConfig

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def map(self, fn: Callable[[C], R], candidates: Sequence[C]) -> Iterator[R]:
        """Run ``fn`` on every candidate as Ray tasks (``workers`` at a time); results in candidate order."""
        todo = list(candidates)
        if not todo:
            return iter(())
        return self._results(fn, self._put(fn), todo)

    def _put(self, fn: Callable[[Any], Any]) -> Any:
        # The engine hands the same trial function to every batch of a run: the model and the
        # calibration inside it are serialized and stored once, and every task reads that copy.
        if self._shared is None or self._shared[0] is not fn:
            started = time.perf_counter()
            try:
                self._shared = (fn, self._ray.put(fn))
            except Exception as exc:  # pickling fails on the first object that cannot travel
                raise TuningError(
                    "RayExecutor: the model, the calibration result or eval_fn cannot be sent to the Ray workers "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())[:500]}). Everything a trial needs must be "
                    "picklable: make eval_fn a module-level function or a class instance holding its data (not open "
                    "files, locks or sessions), or use executor='sequential'."
                ) from exc
            log.info("ray: model, calibration and eval_fn put in the object store in %.3g s", time.perf_counter() - started)
        return self._shared[1]

    def _results(self, fn: Callable[[C], R], fn_ref: Any, candidates: list[C]) -> Iterator[R]:
        ray = self._ray
        waiting = collections.deque(enumerate(candidates))
        running: dict[Any, int] = {}
        finished: dict[int, Any] = {}
        try:
            for index in range(len(candidates)):
                while index not in finished:
                    while waiting and len(running) < self.workers:
                        position, candidate = waiting.popleft()
                        running[self._task.remote(fn_ref, candidate)] = position
                    self.in_flight = len(running)
                    ready, _ = ray.wait(list(running), num_returns=1)
                    for ref in ready:
                        finished[running.pop(ref)] = ref
                        self.done += 1
                    self.in_flight = len(running)
                    log.debug("ray: %d trial(s) in flight, %d done", self.in_flight, self.done)
                yield self._get(fn, finished.pop(index), candidates[index])
        finally:
            # Reached when the engine stops reading (a passing trial, the budget), on Ctrl-C and on
            # errors: what is still queued or running is no longer wanted.
            for ref in running:
                try:
                    # force=False interrupts the task in its worker; force=True kills the worker process,
                    # which Ray 2.60's driver can trip over at shutdown (a failed internal check).
                    ray.cancel(ref, force=False)
                except Exception as exc:  # a task finishing while being cancelled; nothing to undo
                    log.debug("ray: cancelling a trial task failed: %s", exc)
            if running:
                log.info("ray: cancelled %d trial(s) still in flight", len(running))
            self.in_flight = 0

    def _get(self, fn: Callable[[C], R], ref: Any, candidate: C) -> R:
        exceptions = self._ray.exceptions
        try:
            result, where, seconds = self._ray.get(ref)
        except exceptions.RayTaskError as exc:
            # The trial function raised on the worker: eval_fn's EvaluationError is raised here as the
            # sequential executor would. Anything else (the backend plugin or eval_fn's module missing
            # on the worker, ...) is the cluster's set-up, not a property of the config.
            cause = getattr(exc, "cause", None)
            if isinstance(cause, IncError):
                raise cause from None
            what = f"{type(cause).__name__}: {' '.join(str(cause).split())[:500]}" if cause is not None else str(exc)[:500]
            raise TuningError(
                f"RayExecutor: a trial could not run on its Ray worker ({what}). Every node needs the backend "
                "plugin and the modules eval_fn uses: install them there, or pass RayExecutor(runtime_env=...)."
            ) from exc
        except (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ObjectLostError) as exc:
            return self._lost(fn, candidate, exc)
        except exceptions.RayError as exc:  # a task Ray could not run (unschedulable, runtime env failed...)
            return self._lost(fn, candidate, exc)
        log.debug("ray: trial finished on %s in %.3g s", where, seconds)
        return result

    def _lost(self, fn: Callable[[C], R], candidate: C, exc: BaseException) -> R:
        """A trial whose worker died after its retries: a failed trial when the function can say so."""
        retries = f"after {self.max_retries} retr{'y' if self.max_retries == 1 else 'ies'}"
        reason = f"the Ray worker running this trial died {retries} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        failure = getattr(fn, "failure", None)
        if callable(failure):
            log.warning("ray: %s", reason)
            return failure(candidate, reason)
        raise TuningError(f"RayExecutor: {reason}. Rerun with the same history file to resume.") from exc
