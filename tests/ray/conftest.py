"""Ray tests run only inside a network namespace that has nothing but loopback.

Ray binds the machine's interface address unless it has none; these tests
must only ever talk to 127.0.0.1. ``make test`` runs this folder as
``unshare -n`` + ``ip link set lo up`` (scripts/run_ray_tests.sh). Run outside
such a namespace, the tests fail with that instruction instead of starting Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nbsmt_onnx.runtime.executor import RayExecutor


def _interfaces() -> list[str]:
    """Interfaces of this process's network namespace (/sys may show the host's)."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)


@pytest.fixture(scope="session")
def isolated_network() -> None:
    found = _interfaces()
    if found != ["lo"]:
        pytest.fail(
            f"Ray tests need a network namespace with only loopback (found {', '.join(found)}); "
            "run them with 'bash scripts/run_ray_tests.sh'",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def ray_executor(isolated_network: None) -> Iterator[RayExecutor]:
    """Two workers of a private Ray instance, started for the module and stopped after."""
    import executor_support
    import ray

    ray.cloudpickle.register_pickle_by_value(executor_support)
    with RayExecutor(workers=2) as executor:
        yield executor
