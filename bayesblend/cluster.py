"""Fits of blend batches on a Dask cluster (``dask.distributed``).

The unit of work is a batch: blends that share one padded spec, stacked for
``vmap`` (:func:`bayesblend.infer.plan_batches`). A worker process loads the
model bundle once (cached by its name or path) and compiles once per method,
padded size and settings, exactly as a single process does, so results do
not depend on where a batch ran. The default is a local cluster of worker
processes that needs no set-up (:func:`local_client`); ``--scheduler
ADDRESS`` connects to an existing one (:func:`connect`), whose workers need
bayesblend and the bundle installed (a shipped bundle is found by name, any
other at the same path).

On a CPU with at most one core per worker, each worker's XLA and BLAS run
one thread, so that the workers share the machine instead of each claiming
all of it; with more cores per worker, BLAS gets ``cores / workers`` threads.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from bayesblend.errors import BayesblendError

if TYPE_CHECKING:
    from distributed import Client

    from bayesblend.model import SceneSpec
    from bayesblend.prior.bundle import PriorBundle
    from bayesblend.settings import InferenceConfig


def local_client(workers: int | None = None) -> Client:
    """A client of a new local cluster of ``workers`` processes (default: one per core), one thread each."""
    from distributed import Client, LocalCluster

    cores = os.cpu_count() or 1
    n = cores if workers is None else int(workers)
    if n < 1:
        raise BayesblendError(f"--workers must be at least 1, got {workers}")
    threads = max(cores // n, 1)
    env = {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    if threads == 1:  # one core per worker: XLA's CPU thread pool would otherwise use them all
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=40,
        env=env,
    )
    return Client(cluster)


def connect(address: str) -> Client:
    """A client of the running Dask scheduler at ``address`` (e.g. ``tcp://10.0.0.5:8786``)."""
    from distributed import Client

    try:
        return Client(address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise BayesblendError(f"cannot reach the Dask scheduler at {address}: {exc}") from None


def bundle_reference(bundle: PriorBundle) -> str:
    """How a worker finds ``bundle``: its name when it is a shipped one, else its path."""
    from bayesblend.prior.bundle import models_dir

    path = bundle.path.resolve()
    return path.name if path.parent == models_dir().resolve() else str(path)


@lru_cache(maxsize=4)
def _worker_bundle(reference: str) -> PriorBundle:
    """The bundle on a worker, loaded (and its checksums checked) once per process."""
    from bayesblend.prior.bundle import load_bundle

    return load_bundle(reference)


def fit_batch(
    reference: str,
    latent_prior: str,
    method: str,
    spec: SceneSpec,
    config: InferenceConfig,
    data: dict[str, np.ndarray],
    keys: np.ndarray,
    fitted: dict | None = None,
) -> dict:
    """Fit one stacked batch on a worker; the batch's results as numpy arrays.

    ``data`` holds the scene model's arrays stacked over the batch's blends,
    ``keys`` their random keys ``(blend, 2)``: what
    :func:`bayesblend.methods.batch_function` takes, with ``fitted`` the
    blends' stacked earlier MAP.
    """
    import jax
    import jax.numpy as jnp

    from bayesblend.methods import batch_function
    from bayesblend.prior.bundle import Networks

    bundle = _worker_bundle(reference)
    nets = Networks(bundle, latent_prior)
    fit = batch_function(nets, method, spec, config, fitted is not None)
    args = (nets.weights(), {k: jnp.asarray(v) for k, v in data.items()}, jnp.asarray(keys))
    out = fit(*args) if fitted is None else fit(*args, jax.tree_util.tree_map(jnp.asarray, fitted))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(out))
