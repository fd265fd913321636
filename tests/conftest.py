"""Shared fixtures: a small hand-made layout, the LSST survey and the shipped prior."""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
from astropy.table import Table

from bayesblend.survey import get_survey


def pytest_configure(config):
    """One persistent JAX compilation cache for the whole run, made empty at its start.

    Many modules compile the same programs (a 1-source MAP at the default settings, say), and the
    module fixture below drops them from memory after each module; the two pytest-xdist workers, the
    notebooks' kernels and the Dask workers of a run are separate processes. Each compiles a program
    once and the others read it from this directory (``JAX_COMPILATION_CACHE_DIR``, inherited by every
    child process), which is removed when the run ends.
    """
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # set already in an xdist worker
        config._bayesblend_jax_cache = tempfile.mkdtemp(prefix="bayesblend-tests-jax-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._bayesblend_jax_cache
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
    cache = getattr(config, "_bayesblend_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(scope="session")
def lsst():
    return get_survey("lsst")


@pytest.fixture(scope="session")
def prior():
    """The shipped prior bundle, loaded (and checksummed) once per test session."""
    import bayesblend

    return bayesblend.load_prior()


def make_layout(
    x, y, flux=None, bands=("r",), bulge_frac=0.0, disk_hlr=0.8, bulge_hlr=0.4, e1=0.0, e2=0.0, mag_r=22.0
) -> Table:
    """A layout of galaxies with chosen properties (explicit fluxes when ``flux`` is given)."""
    x = np.atleast_1d(np.asarray(x, float))
    n = x.size

    def col(v):
        return np.broadcast_to(np.asarray(v, float), (n,)).copy()

    t = Table()
    t["mag_r_ref"] = col(mag_r)
    t["redshift"] = col(0.5)
    t["bulge_frac"] = col(bulge_frac)
    t["disk_hlr"] = col(disk_hlr)
    t["bulge_hlr"] = col(bulge_hlr)
    t["e1_int"] = col(e1)
    t["e2_int"] = col(e2)
    t["sed_bulge"] = np.zeros(n, dtype=np.int16)
    t["sed_disk"] = np.ones(n, dtype=np.int16)
    t["x"] = x
    t["y"] = col(y)
    if flux is not None:
        for b in bands:
            t[f"flux_{b}"] = col(flux)
    return t


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilations():
    """Drop each test module's compiled programs after it: one long process of every module's programs
    once crashed inside XLA's compiler (a segfault in test_shipped_model after test_runs, 2026-12-07),
    where the module alone passed."""
    yield
    import jax

    from bayesblend import methods

    methods._COMPILED.clear()
    jax.clear_caches()
