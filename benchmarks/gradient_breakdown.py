"""Where one gradient of the scene potential goes, for one galaxy (one-off investigation, issue 23).

Gradients per second inside a ``fori_loop`` of: the whole potential; the same with an
optimisation barrier between the morphology (decoder, flow, FFT) and the renderer; the
morphology alone; the renderer alone (fixed spectrum); the decoder alone; and the whole potential
for 2, 4 and 8 chains under ``vmap``. Run::

    taskset -c 0 .venv/bin/python benchmarks/gradient_breakdown.py [n_sources]
"""

from __future__ import annotations

import sys
import time
import warnings
from functools import partial

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from one_blend import amortised, one_blend  # benchmarks/ is the script's directory

import bayesblend.model as M
from bayesblend.methods import scene_potential

warnings.filterwarnings("ignore")


k = int(sys.argv[1]) if len(sys.argv) > 1 else 1
b = one_blend(31, k, (20, 24.5))
spec, nets, w = b.spec, b.nets, b.w
data, start = amortised(b)

flat, unravel = ravel_pytree(start)


def timeit(name, f, n=200, chains=1):
    g = jax.value_and_grad(f)
    if chains == 1:

        def body(i, c):
            v, gr = g(c + 1e-6 * gr_dummy)
            return c + 1e-9 * gr
    else:
        gv = jax.vmap(g)

        def body(i, c):
            v, gr = gv(c)
            return c + 1e-9 * gr

    global gr_dummy
    gr_dummy = jnp.zeros_like(flat)
    x0 = flat if chains == 1 else jnp.tile(flat, (chains, 1))
    run = jax.jit(lambda x: jax.lax.fori_loop(0, n, body, x))
    jax.block_until_ready(run(x0))
    t = time.perf_counter()
    jax.block_until_ready(run(x0))
    dt = time.perf_counter() - t
    print(
        f"{name:40s} chains={chains}: {n * chains / dt:7.1f} grads/s ({1e3 * dt / n:.2f} ms per step)",
        flush=True,
    )


pot = scene_potential(nets, w, spec, data)
timeit("potential (as now)", lambda f: pot(unravel(f)))

# with an optimization barrier between decoder and renderer
orig = M.source_spectra


def barrier_spectra(decode, to_latent, u):
    return jax.lax.optimization_barrier(orig(decode, to_latent, u))


M.source_spectra = barrier_spectra
pot2 = scene_potential(nets, w, spec, data)
timeit("potential, barrier after spectra", lambda f: pot2(unravel(f)))
M.source_spectra = orig

# components
decode = partial(nets.decode, w)
tl = nets.to_latent(w)
u0 = start["u"]
timeit(
    "decoder+flow+fft only", lambda f: jnp.sum(jnp.abs(M.source_spectra(decode, tl, unravel(f)["u"])) ** 2)
)
spec0 = M.source_spectra(decode, tl, u0)
timeit(
    "render only (fixed spectrum)", lambda f: jnp.sum(M.render_sources(spec, data, spec0, unravel(f)) ** 2)
)
timeit(
    "decoder only (no fft)",
    lambda f: jnp.sum((decode(tl(unravel(f)["u"])) if tl else decode(unravel(f)["u"])) ** 2),
)
for c in (2, 4, 8):
    timeit("potential (as now)", lambda f: pot(unravel(f)), n=100, chains=c)
