"""Where the dedup steps run: a pool of processes on this machine, or a Ray cluster.

An engine only maps a step's task function over its tasks (``engine.map(fn, tasks)``); the task
functions (:mod:`domainlm.dedup.workflow`) are the same for both, read their inputs from the work
folder and write their outputs there, so the two engines produce the same intermediates and
byte-identical outputs. Ray runs them through Ray Data (``Dataset.map_batches``, one task per row).

Ray addresses (``dedup.ray.address``): ``null`` starts a local Ray with ``num_cpus = workers``, a capped
object store and no dashboard, its processes bound to 127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``);
``"auto"``, ``"ray://host:port"`` or a set ``RAY_ADDRESS`` join an existing cluster (then the input files
and the work folder must be on storage every node mounts).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

ENGINES = ("local", "ray")
TaskFn = Callable[[dict[str, Any]], dict[str, Any]]
_log = logging.getLogger(__name__)


def resolve_workers(workers: int | None) -> int:
    """``dedup.workers``: ``None`` = the CPU cores this process may use.

    Raises:
        ValueError: when ``workers`` is not ``None`` or a positive integer.
    """
    if workers is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"dedup.workers must be null or a positive integer, got {workers!r}")
    return workers


def _run_one(args: tuple[TaskFn, dict[str, Any]]) -> dict[str, Any]:
    fn, task = args
    result = fn(task)
    result.setdefault("node", socket.gethostname())
    return result


class LocalEngine:
    """Runs tasks in this process (``workers == 1``) or in a pool of ``workers`` processes.

    Each step gets a fresh pool, so no step's leftover heap stays resident during the next. Its
    processes come from a fork server (a fresh interpreter that has imported only the task functions'
    module; forking from it takes milliseconds), not from this process: a worker forked from here would
    inherit, and be charged in resident memory for, everything this process has imported and holds. Every task
    argument and result is small (paths, offsets and counts); the data stays in the work folder.
    """

    name = "local"

    def __init__(self, workers: int):
        self.workers = workers
        self.nodes: dict[str, int] = {}

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def map(self, fn: TaskFn, tasks: Sequence[dict[str, Any]], desc: str, inline: bool = False) -> list[dict[str, Any]]:
        """``[fn(task) for task in tasks]``, in task order, over a pool, with a tqdm bar (``desc``).

        ``inline`` runs them in this process instead: for a step too small to repay starting a pool
        (about a second on the 2-core machine measured). An exception in a task is raised here.
        """
        results: list[dict[str, Any] | None] = [None] * len(tasks)
        with tqdm(total=len(tasks), desc=desc, unit="task", leave=False) as bar:
            if self.workers > 1 and len(tasks) > 1 and not inline:
                ctx = mp.get_context("forkserver")
                ctx.set_forkserver_preload([fn.__module__])
                # fresh workers per step: no step's leftover heap stays resident during the next one
                with ctx.Pool(min(self.workers, len(tasks))) as pool:
                    for k, res in pool.imap_unordered(_indexed, [(k, fn, t) for k, t in enumerate(tasks)]):
                        results[k] = res
                        bar.update()
            else:
                for k, task in enumerate(tasks):
                    results[k] = _run_one((fn, task))
                    bar.update()
        for res in results:
            self.nodes[res["node"]] = self.nodes.get(res["node"], 0) + 1
        return results  # type: ignore[return-value]


def _indexed(args: tuple[int, TaskFn, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    k, fn, task = args
    return k, _run_one((fn, task))


def _ray_batch(batch: dict[str, Any], fn: TaskFn) -> dict[str, Any]:
    """Ray Data ``map_batches`` function: run ``fn`` on each pickled task of the batch; return the
    pickled results with the node that ran them."""
    import numpy as np
    import ray

    node = ray.get_runtime_context().get_node_id()
    out = []
    for blob in batch["task"]:
        result = fn(pickle.loads(blob))
        result["node"] = node
        out.append(pickle.dumps(result))
    return {"k": np.asarray(batch["k"]), "result": np.array(out, dtype=object)}


class RayEngine:
    """Runs tasks on Ray through Ray Data: ``from_items(tasks).map_batches(fn, batch_size=1)``.

    Args:
        address: ``None`` (start a local Ray unless ``RAY_ADDRESS`` is set), ``"auto"`` or ``"ray://host:port"``.
        workers: ``num_cpus`` of a Ray started here. object_store_mb: its object store cap (MiB).
        ship_code: when joining a cluster, ship the ``domainlm`` package to its workers
            (``runtime_env.py_modules``), so a cluster without this project installed can run the tasks.
        package_dir: the folder holding the ``domainlm`` package (the repository root).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None,
        workers: int,
        object_store_mb: int = 512,
        ship_code: bool = True,
        package_dir: str | os.PathLike | None = None,
    ):
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS") or None
        self.workers = workers
        self.object_store_mb = object_store_mb
        self.ship_code = ship_code
        self.package_dir = Path(package_dir) if package_dir else Path(__file__).resolve().parents[2]
        self.nodes: dict[str, int] = {}
        self._started_here = False
        self._saved_env: dict[str, str | None] = {}

    def __enter__(self) -> RayEngine:
        if self.address is None:
            # a Ray started here: every Ray process binds to 127.0.0.1 (read when ray is first imported,
            # so set before), and its workers inherit this environment, so they import the project from
            # PYTHONPATH (no package upload)
            self._saved_env = {k: os.environ.get(k) for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "PYTHONPATH")}
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
            os.environ["PYTHONPATH"] = os.pathsep.join(
                [str(self.package_dir)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
            )
        import ray

        if ray.is_initialized():
            _log.info("ray: using the Ray this process already joined")
        elif self.address is None:
            ray.init(
                num_cpus=self.workers,
                object_store_memory=self.object_store_mb * 1024 * 1024,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
                _node_ip_address="127.0.0.1",
            )
            self._started_here = True
            _log.info(
                "ray: started a local Ray (%d CPUs, %d MiB object store, no dashboard, 127.0.0.1)",
                self.workers,
                self.object_store_mb,
            )
        else:
            # joining a cluster: ship the domainlm package to its workers (runtime_env py_modules) unless
            # dedup.ray.ship_code is false (the nodes already have this project on their path)
            runtime_env = {"py_modules": [str(self.package_dir / "domainlm")]} if self.ship_code else None
            ray.init(
                address=self.address,
                runtime_env=runtime_env,
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
            self._started_here = True
            _log.info("ray: joined the cluster at %s (%d nodes)", self.address, len(ray.nodes()))
        import ray.data

        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self._started_here:
            ray.shutdown()
        for key, value in self._saved_env.items():  # a later join of a user's cluster must not inherit them
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env = {}

    def map(self, fn: TaskFn, tasks: Sequence[dict[str, Any]], desc: str, inline: bool = False) -> list[dict[str, Any]]:
        """``[fn(task) for task in tasks]``, in task order, each task a Ray Data row run by
        ``map_batches`` (one CPU each); ``inline`` is ignored (every step runs on the cluster). A failed
        task raises its own exception here when it can be recovered from Ray's wrapper."""
        import ray.data

        if not tasks:
            return []
        items = [{"k": k, "task": pickle.dumps(t)} for k, t in enumerate(tasks)]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        out = ds.map_batches(
            _ray_batch, fn_kwargs={"fn": fn}, batch_size=1, batch_format="numpy", num_cpus=1, zero_copy_batch=False
        )
        results: list[dict[str, Any] | None] = [None] * len(tasks)
        try:
            with tqdm(total=len(tasks), desc=desc, unit="task", leave=False) as bar:
                for row in out.iter_rows():
                    results[int(row["k"])] = pickle.loads(row["result"])
                    bar.update()
        except Exception as err:  # Ray wraps a task's exception; raise the original when there is one
            raise _task_error(err) from err
        for res in results:
            self.nodes[res["node"]] = self.nodes.get(res["node"], 0) + 1
        return results  # type: ignore[return-value]


def _task_error(err: BaseException) -> BaseException:
    """The innermost ValueError/FileNotFoundError/KeyError behind Ray's wrappers, else ``err``."""
    seen = err
    while seen is not None:
        cause = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(seen, (ValueError, FileNotFoundError, KeyError)) and type(seen).__module__ == "builtins":
            return seen
        seen = cause
    text = str(err)
    for kind in (ValueError, FileNotFoundError):
        marker = f"{kind.__name__}: "
        if marker in text:
            return kind(text.rsplit(marker, 1)[1].strip().splitlines()[0])
    return err


def make_engine(engine: str, workers: int, ray_cfg: dict[str, Any] | None = None):
    """The engine named by ``dedup.engine``.

    Raises:
        ValueError: on an unknown engine name.
    """
    if engine == "local":
        return LocalEngine(workers)
    if engine == "ray":
        cfg = ray_cfg or {}
        return RayEngine(
            cfg.get("address"), workers, int(cfg.get("object_store_mb", 512)), bool(cfg.get("ship_code", True))
        )
    raise ValueError(f"dedup.engine must be one of {ENGINES}, got {engine!r}")
