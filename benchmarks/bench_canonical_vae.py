"""Galaxy model v2's canonical VAE in the observed frame: how well its decoder lets a fit recover pose.

For held-out isolated galaxies (the validation items at the end of the training shards, never
trained on), each brightened to S/N >= 100 in r (shape, size and colour unchanged) and observed
with fresh noise, MAP fits the scene model (:func:`bayesblend.model.scene_model`: pose,
flux per band, offset and the latent code) with the run's decoder. The latent code starts at the
VAE encoder's mean for the galaxy's true canonical morphology and the pose at the truth perturbed
(round, 30 % larger, 20 % brighter, 0.3 px off): this measures what the decoder can represent,
not what the amortised encoder finds, and it is what chooses the latent size. ``--oracle`` fits
with each galaxy's true canonical image instead (the floor set by noise, PSF and the ellipticity
prior's pull on weakly measured shapes); ``--snr`` sets the brightness floor.

Reported per bin of true half-light radius (< 0.2", 0.2-0.4", > 0.4"): the slope of fitted e on
true e (both components, least squares with intercept), median |e_fit - e_true|, median
Delta mag_r (fitted total flux against the true one), and the canonical reconstruction's
residual (held-out, per pixel, in units of the training's canonical_sigma).

Run (after training; one summary JSON per run):
``.venv/bin/python benchmarks/bench_canonical_vae.py --config configs/vae-lsst-v2-l16.toml --n 192``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from numpyro.infer.util import log_density

from bayesblend import forward
from bayesblend.ellipticity import to_ellipticity
from bayesblend.io import atomic_path
from bayesblend.model import SceneSpec, scene_model
from bayesblend.prior.networks import scale_input
from bayesblend.prior.train import CanonicalData, TrainConfig, build_networks
from bayesblend.simulate.population import ellipticity_scale
from bayesblend.simulate.truth import snr as truth_snr
from bayesblend.survey import poisson_variance

ROOT = Path(__file__).resolve().parents[1]
BINS = ((0.0, 0.2), (0.2, 0.4), (0.4, np.inf))
BATCH = 16


def fit_batch(spec, decode_item, data, start, steps: int, lr: float):
    """MAP of each item of a batch (vmapped) by Adam (cosine-decayed rate); the fitted parameters.

    ``decode_item(z, d)`` gives the item's morphologies from its latent codes
    and its data. Adam, as the inference layer's MAP was when these candidates
    were compared (RESULTS "The decoder against the oracle"); the decoders
    differ, not the optimiser.
    """
    tx = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.1))

    def one(p, d):
        def potential(q):
            return -log_density(scene_model, (spec, d, lambda z: decode_item(z, d)), {}, q)[0]

        def step(carry, _):
            q, o = carry
            upd, o = tx.update(jax.grad(potential)(q), o, q)
            return (optax.apply_updates(q, upd), o), None

        return jax.lax.scan(step, (p, tx.init(p)), None, length=steps)[0][0]

    return jax.jit(jax.vmap(one))(start, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="the canonical VAE's training config")
    p.add_argument("--n", type=int, default=192, help="held-out galaxies")
    p.add_argument("--steps", type=int, default=300, help="Adam steps of MAP")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snr", type=float, default=100.0, help="galaxies fainter than this are brightened to it")
    p.add_argument(
        "--oracle",
        action="store_true",
        help="fit with each galaxy's true canonical image instead of the decoder (the noise and prior floor)",
    )
    p.add_argument("--out", default=None, help="summary JSON (default benchmarks/canonical_vae/<run>.json)")
    args = p.parse_args()
    t0 = time.time()
    cfg = TrainConfig.from_toml(args.config)
    canon = CanonicalData(cfg.data, cfg.validation_items)
    ds, frame, bands = canon.ds, canon.frame, canon.bands
    enc, dec = build_networks(cfg, len(bands), frame.size)
    state = serialization.msgpack_restore(Path(cfg.out, "checkpoint.msgpack").read_bytes())
    params = state["params"]
    idx = canon.val_idx[: args.n]
    truth = ds.target_truth()[idx]
    stamp = ds.stamp
    r = bands.index("r")
    sky = np.asarray(ds.manifest["sky"], np.float32)

    # held-out canonical reconstruction, and the encoder's code for each galaxy's true morphology
    scale = jnp.full((len(bands),), cfg.canonical_sigma, jnp.float32)
    encode = jax.jit(lambda x: enc.apply(params["encoder"], scale_input(x, scale))[0])
    decode_fn = jax.jit(lambda z: dec.apply(params["decoder"], z))
    canonical = canon.batch(idx)["canonical"]
    z0 = np.concatenate([np.asarray(encode(jnp.asarray(c))) for c in np.array_split(canonical, 8)])
    recon = np.concatenate([np.asarray(decode_fn(jnp.asarray(z))) for z in np.array_split(z0, 8)])
    resid = np.sqrt(np.mean((recon - canonical) ** 2)) / cfg.canonical_sigma

    # observations at S/N >= 100: each galaxy scaled up (shape, size, colour unchanged), fresh noise
    clean = ds.load("noiseless", idx)
    snr = truth_snr(clean[:, r], sky[r])
    gain = np.maximum(1.0, args.snr / np.maximum(snr, 1e-3)).astype(np.float32)
    bright = clean * gain[:, None, None, None]
    rng = np.random.default_rng(args.seed)
    noisy = bright + np.sqrt(poisson_variance(bright, sky)) * rng.standard_normal(clean.shape).astype(
        np.float32
    )
    psf = np.asarray(ds.psf(idx), np.float32)
    n_fft = 2 * stamp
    spec = SceneSpec(
        shape=(stamp, stamp),
        n_sources=1,
        latent_dim=cfg.latent_dim,
        stamp=stamp,
        pixel_scale=float(ds.manifest["pixel_scale"]),
        hlr_pixels=frame.hlr_pixels,
        ellipticity_scale=ellipticity_scale(),
        has_variance=False,
        model_error=0.0,
    )
    true_flux = np.stack([np.asarray(truth[f"flux_{b}"]) for b in bands], 1) * gain[:, None]
    true_e = np.stack([np.asarray(truth["e1"]), np.asarray(truth["e2"])], 1)
    true_hlr = np.asarray(truth["hlr"])
    true_off = ds.offsets(truth, stamp)
    n = len(idx)
    data = {
        "image": jnp.asarray(noisy),
        "variance": jnp.ones_like(jnp.asarray(noisy)),
        "valid": jnp.ones(noisy.shape, bool),
        "sky": jnp.broadcast_to(jnp.asarray(sky), (n, len(bands))),
        "psf_ft": forward.psf_spectrum(psf, n_fft),
        "anchor": jnp.zeros((n, 1, 2), jnp.int32),
        "offset0": jnp.asarray(true_off[:, None]),
        "log_flux0": jnp.asarray(np.log(true_flux)[:, None], jnp.float32),
        "log_hlr0": jnp.asarray(np.log(true_hlr)[:, None], jnp.float32),
        "source_valid": jnp.ones((n, 1), bool),
        "canonical_true": jnp.asarray(canonical[:, None]),
    }
    start = {
        "u": jnp.asarray(z0[:, None]),
        "eta": jnp.zeros((n, 1, 2)),
        "log_hlr": jnp.asarray(np.log(1.3 * true_hlr)[:, None], jnp.float32),
        "log_flux": jnp.asarray(np.log(1.2 * true_flux)[:, None], jnp.float32),
        "offset": jnp.asarray(true_off[:, None] + 0.3),
    }

    def decode(z, d):
        if args.oracle:
            return d["canonical_true"]
        return dec.apply(params["decoder"], z)

    fits = []
    for lo in range(0, n, BATCH):
        sl = slice(lo, lo + BATCH)
        part = jax.tree_util.tree_map(lambda a, sl=sl: a[sl], (data, start))
        fits.append(jax.device_get(fit_batch(spec, decode, part[0], part[1], args.steps, 0.02)))
    fit = jax.tree_util.tree_map(lambda *a: np.concatenate(a), *fits)
    e_fit = np.asarray(to_ellipticity(jnp.asarray(fit["eta"][:, 0])))
    dmag = -2.5 * np.log10(np.exp(fit["log_flux"][:, 0, r]) / true_flux[:, r])
    rows = {}
    for lo_b, hi_b in BINS:
        m = (true_hlr >= lo_b) & (true_hlr < hi_b)
        if m.sum() < 3:
            continue
        x, y = true_e[m].ravel(), e_fit[m].ravel()
        slope = float(np.polyfit(x, y, 1)[0])
        rows[f"hlr {lo_b}-{hi_b}"] = {
            "n": int(m.sum()),
            "slope_e": slope,
            "median_abs_de": float(np.median(np.hypot(*(e_fit[m] - true_e[m]).T))),
            "median_dmag_r": float(np.median(dmag[m])),
            "median_hlr_ratio": float(np.median(np.exp(fit["log_hlr"][m, 0]) / true_hlr[m])),
        }
    summary = {
        "run": str(cfg.out),
        "latent_dim": cfg.latent_dim,
        "trained_steps": int(state["step"]),
        "n": n,
        "snr_at_least": args.snr,
        "oracle": bool(args.oracle),
        "canonical_rms_residual_per_sigma": float(resid),
        "bins": rows,
        "command": f"benchmarks/bench_canonical_vae.py --config {args.config} --n {args.n} "
        f"--steps {args.steps} --snr {args.snr:g}" + (" --oracle" if args.oracle else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, JAX on {jax.default_backend()}",
        "seconds": time.time() - t0,
    }
    name = f"{Path(cfg.out).name}-step{int(state['step'])}-snr{args.snr:g}" + (
        "-oracle" if args.oracle else ""
    )
    out = Path(args.out or ROOT / "benchmarks" / "canonical_vae" / f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
