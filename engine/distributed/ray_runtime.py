"""Starting or joining Ray, shared by the replicas (replicas.py) and the pipeline (pipeline.py).

A Ray started here runs on this machine alone with every Ray process on the loopback address: by
default Ray binds its processes to the machine's network address so that other nodes can reach
them, which a one-machine instance does not need (and tests must not do). To span machines, start
Ray with ``ray start --head`` / ``ray start --address HEAD:6379`` on each and give its address.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from engine.errors import HalfbyteError

NAMESPACE = "halfbyte"
RAY_HINT = "pip install 'halfbyte[ray]'"


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def import_ray(hint: str = f"running on Ray needs Ray: {RAY_HINT}") -> Any:
    """``ray``, or the one-line error ``hint`` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise HalfbyteError(hint) from None
    return ray


@contextlib.contextmanager
def loopback_ray() -> Iterator[None]:
    """Ray on the loopback address: read by this process (``ray_constants``, already imported) and
    inherited by the Ray processes it starts, through the environment."""
    from ray._private import ray_constants

    saved = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved[0] is None:
            del os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"]
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved[0]
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if address.count(":") == 1 or "]" in address else address
    return host == "localhost" or host.startswith("127.") or host == "::1"


def init_local_ray(num_cpus: float | None = None, **kwargs: Any) -> None:
    """Start a Ray instance on this machine alone, every Ray process on the loopback address."""
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with loopback_ray():
        # address="local": always a new instance (a bare init attaches to a cluster that `ray start` left
        # running on this machine, which then refuses num_cpus).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **{"namespace": NAMESPACE, **kwargs})


def join_ray(address: str, **kwargs: Any) -> None:
    """Join the Ray cluster at ``address`` (a cluster started on 127.0.0.1 is joined there)."""
    ray = import_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        with loopback_ray() if is_loopback(address) else contextlib.nullcontext():
            ray.init(address=address, **{"namespace": NAMESPACE, **kwargs})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise HalfbyteError(f"cannot join the Ray cluster at {address}: {first_line(exc)}") from None
