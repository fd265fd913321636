"""Levers on NUTS's geometry for one blend, against the default (one-off investigation, issue 23).

The blend and the setup are those of ``nuts_geometry.py --adapt`` (MAP + Laplace start, dense mass
matrix adapted in warm-up, 2 chains, depth 6). Options, one at a time:

- ``--space z``: sample the latent codes ``z`` with the flow's log density as their prior
  (the same model) instead of the flow's base draws ``u``;
- ``--centroid``: shift each decoded morphology so that its light centroid (mean over bands)
  sits at the canonical centre, so the offset cannot trade with the latent code;
- ``--neutra N --flow iaf|bnaf``: NeuTra (``numpyro.infer.reparam.NeuTraReparam``), a flow guide
  fitted by SVI for N steps in the Laplace-whitened coordinates, then NUTS in its base space.

Prints step size, leapfrog steps per draw, acceptance, divergences, and bulk ESS and r-hat of
every parameter. Run::

    .venv/bin/python benchmarks/nuts_levers.py [--space z | --centroid | --neutra 1500 --flow bnaf]
"""

from __future__ import annotations

import argparse
import time
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.infer.hmc import hmc
from one_blend import map_start, one_blend  # benchmarks/ is the script's directory

import bayesblend.model as M
from bayesblend.forward import canonical_spectrum
from bayesblend.methods import scene_potential
from bayesblend.prior.flow import RealNVP

warnings.filterwarnings("ignore")
p = argparse.ArgumentParser()
p.add_argument("--sources", type=int, default=1)
p.add_argument("--mag-range", default="20,21")
p.add_argument("--space", default="u")
p.add_argument("--warmup", type=int, default=150)
p.add_argument("--draws", type=int, default=150)
p.add_argument("--seed", type=int, default=31)
p.add_argument("--centroid", action="store_true")
p.add_argument("--neutra", type=int, default=0)
p.add_argument("--flow", default="iaf")
args = p.parse_args()


k = args.sources


def centred_spectra(decode, to_latent, u):
    z = u if to_latent is None else to_latent(u)
    C = decode(z)
    N = C.shape[-1]
    x = jnp.arange(N) - (N - 1) / 2
    tot = C.sum((-2, -1))
    cx = (jnp.einsum("...byx,x->...b", C, x) / tot).mean(-1)
    cy = (jnp.einsum("...byx,y->...b", C, x) / tot).mean(-1)
    S = canonical_spectrum(C)
    P = S.shape[-1]
    f = jnp.fft.fftfreq(P)
    phase = 2 * jnp.pi * (f[None, :] * cx[..., None, None] + f[:, None] * cy[..., None, None])
    return S * jnp.exp(1j * phase)[..., None, :, :]


if args.centroid:
    M.source_spectra = centred_spectra
    import bayesblend.methods as Me

    Me.source_spectra = centred_spectra
lo, hi = (float(v) for v in args.mag_range.split(","))
b = one_blend(args.seed, k, (lo, hi))
prior, sim, spec, nets, w = b.prior, b.sim, b.spec, b.nets, b.w
data, flat, cov, root, point = map_start(b)
_, unravel = ravel_pytree(point)
pot_u = scene_potential(nets, w, spec, data)
flow = prior.flow
D = spec.latent_dim


def to_z(f):
    p = unravel(f)
    return ravel_pytree(dict(p, u=nets.latent(w, p["u"])))[0]


def from_z(f):
    p = unravel(f)
    return dict(p, u=nets.to_base(w, p["u"]))


def pot_z(f):
    z = unravel(f)["u"]
    u = nets.to_base(w, z)
    lp = flow.apply(w["flow"], z, method=RealNVP.log_prob)
    logdet = lp + 0.5 * jnp.sum(u**2, -1) + 0.5 * D * jnp.log(2 * jnp.pi)
    return pot_u(from_z(f)) - jnp.sum(logdet)


if args.space == "z":
    J = jax.jacfwd(to_z)(flat)
    cov = J @ cov @ J.T
    root = jnp.linalg.cholesky(cov + 1e-9 * jnp.eye(cov.shape[0]))
    flat = to_z(flat)
    potential = pot_z
else:

    def potential(f):
        return pot_u(unravel(f))


dim = flat.shape[0]
if args.neutra:
    import numpyro
    import numpyro.distributions as dist
    import optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal
    from numpyro.infer.reparam import NeuTraReparam

    flat0, root0, pot0 = flat, root, potential

    def wmodel():
        wv = numpyro.sample("w", dist.Normal(jnp.zeros(dim), 10.0).to_event(1))
        with numpyro.handlers.block():
            pv = pot0(flat0 + root0 @ wv)
        numpyro.factor("pot", -pv + 0.5 * jnp.sum(wv**2) / 100.0)

    from numpyro.infer.initialization import init_to_value

    if args.flow == "iaf":
        guide = AutoIAFNormal(
            wmodel,
            num_flows=2,
            hidden_dims=[2 * dim, 2 * dim],
            init_loc_fn=init_to_value(values={"w": jnp.zeros(dim)}),
        )
    else:
        guide = AutoBNAFNormal(
            wmodel,
            num_flows=1,
            hidden_factors=[8, 8],
            init_loc_fn=init_to_value(values={"w": jnp.zeros(dim)}),
        )
    svi = SVI(
        wmodel, guide, optax.adam(optax.cosine_decay_schedule(3e-3, args.neutra)), Trace_ELBO(num_particles=4)
    )
    t0 = time.perf_counter()
    res = svi.run(jax.random.PRNGKey(3), args.neutra, progress_bar=False)
    print(
        f"neutra {args.flow} SVI {args.neutra} steps: {time.perf_counter() - t0:.0f} s, "
        f"loss first/last {float(res.losses[0]):.1f} {float(res.losses[-200:].mean()):.1f}"
    )
    neutra = NeuTraReparam(guide, res.params)
    from numpyro.infer.util import initialize_model

    rmodel = neutra.reparam(wmodel)
    info = initialize_model(jax.random.PRNGKey(4), rmodel, dynamic_args=False)
    pfn = info.potential_fn
    base_name = list(info.param_info.z.keys())[0]

    def potential(v):
        return pfn({base_name: v})

    flat = jnp.zeros(dim)
    cov = jnp.eye(dim)
    root = jnp.eye(dim)
init_kernel, sample_kernel = hmc(potential_fn=potential, algo="NUTS")
total = args.warmup + args.draws


def chain(start, key):
    state = init_kernel(
        start,
        num_warmup=args.warmup,
        inverse_mass_matrix=cov,
        dense_mass=True,
        adapt_mass_matrix=True,
        target_accept_prob=0.8,
        max_tree_depth=6,
        find_heuristic_step_size=True,
        rng_key=key,
    )

    def step(s, _):
        s = sample_kernel(s)
        return s, (s.z, s.num_steps, s.accept_prob, s.adapt_state.step_size, s.diverging)

    return jax.lax.scan(step, state, None, length=total)[1]


key = jax.random.PRNGKey(1)
starts = flat + 0.5 * jax.random.normal(key, (2, flat.shape[0])) @ root.T
t0 = time.perf_counter()
z, steps, acc, size, div = jax.block_until_ready(jax.jit(jax.vmap(chain))(starts, jax.random.split(key, 2)))
wall = time.perf_counter() - t0
keep = slice(args.warmup, total)
z = np.asarray(z)[:, keep]
if args.neutra:
    tr = jax.vmap(jax.vmap(lambda v: flat0 + root0 @ neutra.transform_sample(v)["w"]))
    z = np.asarray(tr(jnp.asarray(z)))
print(
    f"space {args.space}, r {np.round(np.asarray(sim.truth['mag_r']), 2).tolist()}: {wall:.0f} s; "
    f"step {np.asarray(size)[:, -1].round(3).tolist()}, "
    f"steps/draw {np.asarray(steps)[:, keep].mean(1).round(1).tolist()}, "
    f"acc {np.asarray(acc)[:, keep].mean(1).round(2).tolist()}, div {int(np.asarray(div)[:, keep].sum())}"
)
names = [f"{n}{i}" for n, v in sorted(point.items()) for i in range(int(np.prod(v.shape)))]
ds = az.convert_to_dataset(z)
ess = np.asarray(next(iter(az.ess(ds, method="bulk").data_vars.values())))
rh = np.asarray(next(iter(az.rhat(ds).data_vars.values())))
for n, e, r in zip(names, ess, rh, strict=False):
    print(f"  {n:12s} ess {e:6.0f} rhat {r:.3f}")
