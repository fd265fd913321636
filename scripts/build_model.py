"""Assemble a model bundle from its training runs, with a model card whose numbers are measured here.

``models/lsst-v2`` (galaxy model v2): the canonical VAE (``--vae-config``, default
``configs/vae-lsst-v2-l8.toml``), its latent flow and the amortised pose encoder
(``--pose-config``). Steps:

1. fit the latent flow to q(z|C) draws of the training galaxies' canonical morphologies
   (``<vae run>/flow.msgpack``; skipped when it exists, unless ``--refit-flow``);
2. write the bundle (decoder, encoder, flow, and pose encoder when its run has a checkpoint)
   with checksums, and a card with the training stages, the flow's held-out likelihood, the
   latent-size comparison (``benchmarks/canonical_vae/*.json``) and the ellipticity and size priors;
3. measure the decoder's XLA FLOP count per forward pass;
4. decode flow and N(0, I) draws and compare half-light radius, concentration and colour gradient
   with held-out canonical morphologies (``benchmarks/figures/canonical_flow_vs_population.png``);
   rewrite the bundle with these numbers in the card.

Run: ``.venv/bin/python scripts/build_model.py`` (after the canonical VAE and pose-encoder runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bayesblend.prior.bundle import load_bundle  # noqa: E402
from bayesblend.prior.flow import sample, train_flow_from_run  # noqa: E402
from bayesblend.prior.train import CanonicalData, TrainConfig, bundle_from_runs  # noqa: E402
from bayesblend.simulate.dataset import ShardDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def decoder_flops(bundle) -> float:
    f = jax.jit(lambda z: bundle.decode(z))
    cost = f.lower(jnp.zeros((bundle.latent_dim,))).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def _stages(cfg: TrainConfig) -> list[dict]:
    """Steps, time, data and final validation of every training stage.

    A canonical VAE's stages follow ``init_from`` back; a pose encoder's follow
    ``encoder_init`` (its ``init_from`` is the VAE it encodes for, not a stage).
    """
    stages = []
    run, config = Path(cfg.out), cfg
    back = "encoder_init" if cfg.kind == "pose-encoder" else "init_from"
    while True:
        h = json.loads((run / "history.json").read_text())
        stages.insert(
            0,
            {
                "run": str(run),
                "steps": h["step"][-1],
                "seconds": h["seconds"][-1],
                "final_val_nll_per_pixel": h["val_nll"][-1],
                "learning_rate": config.learning_rate,
                "data": config.data,
            },
        )
        if not getattr(config, back):
            return stages
        run = Path(getattr(config, back))
        raw = json.loads((run / "config.json").read_text())
        config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def _dataset_command(path: str) -> str:
    """The ``bayesblend simulate`` command that wrote the shard dataset at ``path`` (from its manifest)."""
    m = json.loads(Path(path, "dataset.json").read_text())
    return (
        f"bayesblend simulate {m['kind']} --n {m['n']} --shards --shard-size 1000 --seed {m['seed']} "
        f"--max-shift {m['options']['max_shift']:g} --psf-jitter {m['options']['psf_jitter']:g} --out {path}"
    )


def light_radii(images: np.ndarray, fracs=(0.5, 0.9)) -> np.ndarray:
    """Radii (pixels from the grid centre) enclosing ``fracs`` of each image's light, ``(n, len(fracs))``."""
    n = images.shape[-1]
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(xx, yy).ravel()
    order = np.argsort(r)
    flat = images.reshape(len(images), -1)[:, order]
    cum = np.cumsum(flat, axis=1) / np.maximum(flat.sum(axis=1, keepdims=True), 1e-30)
    return np.stack([[np.interp(f, c, r[order]) for f in fracs] for c in cum])


def canonical_vs_population(bundle, cfg: TrainConfig, n: int, out: Path) -> dict:
    """Decoded flow and N(0, I) draws against held-out canonical morphologies (the prior's job).

    Compares, in the reference band, the half-light radius (the frame fixes it at
    ``hlr_pixels``), the concentration r90 / r50 (profile shape: disks about 2.3,
    de Vaucouleurs 3.5 to 4, more with larger Sersic index) and, across bands, the g / i
    half-light-radius ratio (colour gradient).
    """
    data = CanonicalData(cfg.data, cfg.validation_items)
    idx = data.val_idx[:n]
    held = data.batch(idx)["canonical"]
    z = sample(bundle.flow, bundle.params["flow"], jax.random.PRNGKey(0), len(idx))
    decode = jax.jit(bundle.decode)
    sets = (
        ("held-out canonical morphologies", held),
        ("flow + decoder draws", np.asarray(decode(z))),
        ("N(0, I) + decoder draws", np.asarray(decode(jax.random.normal(jax.random.PRNGKey(1), z.shape)))),
    )
    g, r, i = (bundle.bands.index(b) for b in "gri")
    stats = {}
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for name, imgs in sets:
        rr = light_radii(imgs[:, r])
        conc = rr[:, 1] / rr[:, 0]
        grad = light_radii(imgs[:, g])[:, 0] / light_radii(imgs[:, i])[:, 0]
        axes[0].hist(rr[:, 0], bins=30, range=(2, 6), histtype="step", density=True, label=name)
        axes[1].hist(conc, bins=30, range=(1.5, 6), histtype="step", density=True)
        axes[2].hist(grad, bins=30, range=(0.7, 1.5), histtype="step", density=True)
        stats[name] = {
            "median_hlr_r_canonical_pixels": float(np.median(rr[:, 0])),
            "concentration_r90_over_r50": [float(q) for q in np.percentile(conc, [16, 50, 84])],
            "hlr_ratio_g_over_i": [float(q) for q in np.percentile(grad, [16, 50, 84])],
        }
    axes[0].set_xlabel("r-band half-light radius [canonical px]")
    axes[1].set_xlabel("concentration r90 / r50 (r)")
    axes[2].set_xlabel("half-light radius g / i")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return stats


def size_relation(cfg: TrainConfig) -> dict:
    """The training population's size-magnitude relation, ``ln hlr = a + b (r - 23)``, and its scatter."""
    t = ShardDataset(cfg.data).truth()
    m, h = np.asarray(t["mag_r"]), np.log(np.asarray(t["hlr"]))
    design = np.c_[np.ones_like(m), m - 23.0]
    coef, *_ = np.linalg.lstsq(design, h, rcond=None)
    return {
        "relation": "ln(hlr / arcsec) = ln_hlr_at_r23 + slope_per_mag * (mag_r - 23)",
        "ln_hlr_at_r23": float(coef[0]),
        "slope_per_mag": float(coef[1]),
        "scatter": float(np.std(h - design @ coef)),
        "band": "r",
        "measured_on": f"{len(t)} training galaxies ({cfg.data})",
    }


def build(args: argparse.Namespace, cfg: TrainConfig) -> None:
    """``models/lsst-v2``: canonical VAE + flow + pose encoder, and a card measured here."""
    from bayesblend.model import LOG_HLR_SIGMA
    from bayesblend.simulate.population import SIGMA_E, ellipticity_scale

    run = Path(cfg.out)
    if args.refit_flow or not (run / "flow.msgpack").exists():
        train_flow_from_run(cfg)
    manifest = json.loads(Path(cfg.data, "dataset.json").read_text())
    pose_cfg = TrainConfig.from_toml(args.pose_config)
    pose = Path(pose_cfg.out)
    compare = {}
    for other in sorted(Path("benchmarks", "canonical_vae").glob("*.json")):
        res = json.loads(other.read_text())
        compare[other.stem] = res
    card = {
        "description": "LSST ugrizy galaxy prior, galaxy model v2 (explicit pose): a VAE of canonical "
        "morphologies (round, fixed half-light radius; bayesblend/canonical.py), a RealNVP latent flow, "
        "and an amortised pose encoder (z, ellipticity, size, fluxes, offset of a stamp's centred galaxy).",
        "training_data": {
            "command": f"bayesblend simulate isolated --n {manifest['n']} --shards --shard-size 1000 "
            f"--seed {manifest['seed']} --max-shift 0.5 --psf-jitter 0.05",
            "population": "bulge + disk with Sersic bulges, star-forming knots "
            "(bayesblend/simulate/population.py); held out: the last validation_items of each run",
            "pose_encoder_stages": [_dataset_command(st["data"]) for st in _stages(pose_cfg)],
        },
        "training": {
            "vae_stages": _stages(cfg),
            "pose_encoder_stages": _stages(pose_cfg),
            "hardware": f"{os.cpu_count()} CPU cores ({platform.machine()}), no GPU",
            "date": str(datetime.date.today()),
        },
        "latent_size_choice": compare,
        "latent_size_note": "Latent sizes 8 and 16 trained alike and compared at step 2000 of 4000 "
        "(benchmarks/bench_canonical_vae.py; entries of latent_size_choice): equal within noise in held-out "
        "likelihood and pose recovery, and both at the oracle of true canonical images; 8 chosen for the "
        "smaller parameter space per source.",
        "flow_metrics": json.loads((run / "flow_metrics.json").read_text()),
        "default_latent_prior": "flow",
        "ellipticity_prior": {
            "form": "Bernstein & Armstrong 2014 (MNRAS 438, 1880) eq. 24: "
            "p(e) ~ (1 - |e|^2)^2 exp(-|e|^2 / 2 s^2) per unit area",
            "s": ellipticity_scale(),
            "sigma_e_per_component": SIGMA_E,
        },
        "size_prior": size_relation(cfg) | {"sigma": LOG_HLR_SIGMA},
    }
    bundle_from_runs(args.out, run, pose if (pose / "checkpoint.msgpack").exists() else None, card)
    bundle = load_bundle(args.out)
    card["decoder_flops_per_forward"] = decoder_flops(bundle)
    card["flow_vs_population"] = canonical_vs_population(
        bundle, cfg, 2000, ROOT / "benchmarks" / "figures" / "canonical_flow_vs_population.png"
    )
    bundle_from_runs(args.out, run, pose if (pose / "checkpoint.msgpack").exists() else None, card)
    print(json.dumps({k: card[k] for k in ("decoder_flops_per_forward", "flow_vs_population")}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vae-config", default="configs/vae-lsst-v2-l8.toml", help="the canonical VAE run")
    p.add_argument(
        "--pose-config",
        default="configs/pose-encoder-lsst-v2-blends.toml",
        help="the pose-encoder run (last stage)",
    )
    p.add_argument("--out", default="models/lsst-v2")
    p.add_argument("--refit-flow", action="store_true")
    args = p.parse_args()
    cfg = TrainConfig.from_toml(args.vae_config)
    if cfg.kind != "canonical-vae":
        p.error(f"{args.vae_config} configures a {cfg.kind!r} run, not a canonical VAE")
    build(args, cfg)


if __name__ == "__main__":
    main()
