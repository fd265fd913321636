"""The ``bayesblend`` command.

Every user error is printed as one line ``bayesblend: error: ...`` with exit
code 2 (as argparse does for bad arguments); nothing is left half-written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bayesblend.errors import BayesblendError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _bands(text: str) -> list[str]:
    return [b.strip() for b in text.split(",") if b.strip()]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``bayesblend`` command."""
    p = argparse.ArgumentParser(prog="bayesblend", description="Bayesian deblending of survey images.")
    sub = p.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="simulate LSST-like scenes with truth (offline)")
    sim.add_argument("kind", choices=["isolated", "blends", "field", "shear-pairs"])
    sim.add_argument("--n", type=int, required=True, help="number of stamps, blends, fields or pair sets")
    sim.add_argument("--out", required=True, help="output directory")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--survey", default="lsst")
    sim.add_argument("--bands", type=_bands, default=None, help="comma-separated subset, e.g. g,r,i")
    sim.add_argument("--shards", action="store_true", help="write training shards instead of FITS")
    sim.add_argument("--shard-size", type=int, default=500)
    sim.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    sim.add_argument("--stamp-size", type=int, default=48, help="stamp side, pixels")
    sim.add_argument("--max-shift", type=float, default=0.0, help="decentring of the target, pixels")
    sim.add_argument("--psf-jitter", type=float, default=0.0, help="log-normal scatter of PSF FWHM")
    sim.add_argument("--n-range", type=_ints, default=(1, 4), help="galaxies per blend, min,max")
    sim.add_argument("--annulus", type=_floats, default=(0.325, 2.0), help="neighbours' annulus, arcsec")
    sim.add_argument("--mag-range", type=_floats, default=None, help="r-band range, e.g. 18,27.5")
    sim.add_argument(
        "--family",
        choices=["bulge+disk", "sersic"],
        default="bulge+disk",
        help="galaxy population: bulge+disk+knots (training) or single Sersic (out of distribution)",
    )
    sim.add_argument("--size", type=int, default=256, help="field side, pixels")
    sim.add_argument("--density", type=float, default=None, help="field density, galaxies/arcmin^2")
    sim.add_argument("--shear", type=float, default=0.02, help="shear-pair amplitude")
    sim.add_argument("--of", choices=["isolated", "blends"], default="blends", help="shear pairs of...")
    sim.add_argument("--members", action="store_true", help="store blend members' images in shards")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")

    dbl = sub.add_parser("deblend", help="deblend scene-FITS files: catalogue, posterior samples, figures")
    dbl.add_argument("scenes", nargs="+", metavar="SCENE.fits")
    dbl.add_argument(
        "--sources",
        default=None,
        help="FITS/Parquet table of x, y (pixels); for several scenes a 'scene' column (file stem)",
    )
    dbl.add_argument("--method", choices=["amortised", "map", "svi", "nuts"], default="nuts")
    dbl.add_argument("--out", default="deblended", help="output directory")
    dbl.add_argument("--prior", default=None, help="model bundle name or path (default: lsst-v2)")
    dbl.add_argument("--latent-prior", choices=["flow", "normal"], default=None)
    dbl.add_argument("--seed", type=int, default=0)
    dbl.add_argument("--chains", type=int, default=None, help="NUTS chains")
    dbl.add_argument("--draws", type=int, default=None, help="draws per chain")
    dbl.add_argument("--warmup", type=int, default=None, help="NUTS warm-up steps")
    dbl.add_argument(
        "--no-redetect",
        action="store_true",
        help="skip the pilot MAP fit whose residual adds the sources detection missed",
    )
    dbl.add_argument("--truth", default=None, help="truth table to mark in the figures (simulations)")
    dbl.add_argument("--figures", type=int, default=20, help="figures of the first N blends (default 20)")
    dbl.add_argument("--no-figures", action="store_true", help="no figures (same as --figures 0)")
    dbl.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local Dask cluster's worker processes (default: one per core; 1: run in this process)",
    )
    dbl.add_argument("--scheduler", default=None, help="address of a running Dask scheduler to use instead")
    dbl.add_argument(
        "--overwrite", action="store_true", help="replace another run found in --out (default: refuse)"
    )
    dbl.add_argument("--quiet", action="store_true", help="no progress bar")

    sb = sub.add_parser("shear-bias", help="measure shear bias m, c on sheared, rotated twin simulations")
    sb.add_argument("--kind", choices=["blends", "isolated"], default="blends")
    sb.add_argument("--n", type=int, required=True, help="items (each: 10 scenes, same galaxies and noise)")
    sb.add_argument("--out", required=True, help="run directory (resumable)")
    sb.add_argument("--method", choices=["amortised", "map", "svi", "nuts"], default="map")
    sb.add_argument(
        "--seed", type=int, default=5, help="simulation seed (the test sets use 4; training 1, 3)"
    )
    sb.add_argument("--shear", type=float, default=0.02)
    sb.add_argument("--detect", action="store_true", help="detect sources instead of giving true positions")
    sb.add_argument("--draws", type=int, default=64, help="posterior draws per source")
    sb.add_argument("--prior", default=None, help="model bundle name or path (default: lsst-v2)")
    sb.add_argument("--latent-prior", choices=["flow", "normal"], default=None)
    sb.add_argument("--max-minutes", type=float, default=None, help="stop after this long (resume later)")
    sb.add_argument("--report", action="store_true", help="only summarise the items already run")
    sb.add_argument("--calibrate", action="store_true", help="store R = 1 + m (ensemble) in the model card")
    sb.add_argument("--calibrated", action="store_true", help="divide by the model card's R")
    sb.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="DIR",
        help="with --report: pool this run's items with --out's (same configuration, other seed); repeatable",
    )
    sb.add_argument(
        "--bins", type=int, default=3, help="bins of the responsivity table (--calibrate stores it)"
    )
    sb.add_argument("--json", default=None, help="write the summary as JSON here")
    sb.add_argument("--min-snr", type=float, default=0.0, help="summarise galaxies of true S/N >= this")
    sb.add_argument(
        "--min-resolution",
        type=float,
        default=None,
        help="resolution-factor cut instead of the catalogue's UNRESOLVED flag (0: none)",
    )
    sb.add_argument("--quiet", action="store_true", help="no progress bar")

    sh = sub.add_parser("shear", help="the field's shear from a posterior catalogue and its posterior draws")
    sh.add_argument("catalog", metavar="CATALOG.fits", help="posterior catalogue (bayesblend deblend's)")
    sh.add_argument(
        "--posterior",
        default=None,
        help="posterior draws for the hierarchical estimator (default: posterior.nc beside the catalogue)",
    )
    sh.add_argument(
        "--no-posterior", action="store_true", help="ensemble estimate only, even if posterior.nc exists"
    )
    sh.add_argument("--json", default=None, help="write {estimator: {g1, g2, g1_err, g2_err, n}} here")
    sh.add_argument("--prior", default=None, help="model bundle (default: the catalogue's BUNDLE)")
    sh.add_argument("--sigma-e", type=float, default=None, help="shape-noise term of the weights")
    sh.add_argument("--out", default=None, help="write the shear catalogue (FITS) here")
    sh.add_argument("--seed", type=int, default=0)

    tr = sub.add_parser("train", help="train the canonical VAE, the pose encoder or the latent flow")
    tr.add_argument("what", choices=["canonical-vae", "pose-encoder", "flow"])
    tr.add_argument("--config", required=True, help="TOML config (see configs/)")
    tr.add_argument("--max-minutes", type=float, default=None, help="stop (checkpointed) after this long")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _train(args: argparse.Namespace) -> int:
    from bayesblend.prior.train import TrainConfig, train

    cfg = TrainConfig.from_toml(args.config)
    if args.what != "flow" and cfg.kind != args.what:
        raise BayesblendError(f"{args.config} configures a {cfg.kind!r} run, not {args.what!r}")
    if args.what == "flow":
        from bayesblend.prior.flow import train_flow_from_run

        out = train_flow_from_run(cfg, progress=not args.quiet)
        print(f"flow written to {out}")
        return 0
    max_s = None if args.max_minutes is None else 60.0 * args.max_minutes
    result = train(cfg, progress=not args.quiet, max_seconds=max_s)
    print(f"{cfg.kind}: step {result['step']} of {cfg.steps}, checkpoint in {cfg.out}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from bayesblend.simulate.dataset import simulate_dataset

    sim: dict = {"bands": args.bands, "psf_jitter": args.psf_jitter}
    if args.kind != "field":
        sim["family"] = args.family
    if args.mag_range is not None:
        if len(args.mag_range) != 2:
            raise BayesblendError(f"--mag-range needs two numbers, got {args.mag_range}")
        sim["mag_range"] = args.mag_range
    stamp_kind = args.of if args.kind == "shear-pairs" else args.kind
    if stamp_kind in ("isolated", "blends"):
        sim.update(stamp_size=args.stamp_size, max_shift=args.max_shift)
    if stamp_kind == "blends":
        if len(args.n_range) != 2 or len(args.annulus) != 2:
            raise BayesblendError("--n-range and --annulus take two comma-separated values")
        sim.update(n_range=args.n_range, annulus=args.annulus)
    if args.kind == "field":
        sim.update(shape=(args.size, args.size), density=args.density)
    out = simulate_dataset(
        args.kind,
        args.n,
        args.out,
        seed=args.seed,
        survey=args.survey,
        fmt="shards" if args.shards else "fits",
        workers=args.workers,
        shard_size=args.shard_size,
        members=args.members,
        shear=args.shear,
        of=args.of,
        progress=not args.quiet,
        **sim,
    )
    print(f"wrote {args.kind} ({args.n}) to {out}")
    return 0


def _deblend(args: argparse.Namespace) -> int:
    from bayesblend.runs import deblend_files
    from bayesblend.settings import InferenceConfig

    settings = {
        k: v
        for k, v in (("num_chains", args.chains), ("num_draws", args.draws), ("num_warmup", args.warmup))
        if v is not None
    }
    run = deblend_files(
        args.scenes,
        args.out,
        method=args.method,
        prior=args.prior,
        seed=args.seed,
        latent_prior=args.latent_prior,
        config=InferenceConfig().replace(**settings),
        sources=args.sources,
        redetect=not args.no_redetect,
        workers=args.workers,
        scheduler=args.scheduler,
        progress=not args.quiet,
        overwrite=args.overwrite,
        figures=0 if args.no_figures else args.figures,
        truth=args.truth,
    )
    resumed = f", {run.n_resumed} of {run.n_batches} batches found done" if run.n_resumed else ""
    print(
        f"deblend ({args.method}): {run.n_sources} sources in {run.n_blends} blends "
        f"from {len(args.scenes)} scene(s){resumed}"
    )
    print(f"  {run.catalog}")
    print(f"  {run.out / 'catalog'}/ (Parquet dataset, {run.n_batches} parts)")
    print(f"  {run.out / 'posterior'}/ (ArviZ netCDF per part)")
    if run.figures:
        print(f"  {run.out / 'figures'}/ ({run.figures} per-blend figures)")
    return 0


def _shear_bias(args: argparse.Namespace) -> int:
    import json

    from bayesblend.prior.bundle import load_bundle
    from bayesblend.shear import ResponsivityTable, interim_prior_from_card, responsivity_from_card
    from bayesblend.shear.bias import format_summary, summarise
    from bayesblend.shear.harness import HarnessConfig, pooled_config, run

    if args.calibrate and args.calibrated:
        raise BayesblendError("--calibrate measures R; it cannot also divide by it (--calibrated)")
    if args.calibrate and (args.min_snr or args.min_resolution is not None):
        raise BayesblendError(
            "--calibrate measures R on the shear catalogue's own selection: drop --min-snr/--min-resolution"
        )
    if args.pool and not args.report:
        raise BayesblendError("--pool summarises runs already made: add --report")
    if args.bins < 1:
        raise BayesblendError(f"--bins must be at least 1, got {args.bins}")
    bundle = load_bundle(args.prior)
    latent_prior = bundle.check_latent_prior(args.latent_prior)
    cfg = HarnessConfig(
        kind=args.kind,
        seed=args.seed,
        shear=args.shear,
        method=args.method,
        detect=args.detect,
        draws=args.draws,
        latent_prior=latent_prior,
    )
    if not args.report:
        limit = None if args.max_minutes is None else 60.0 * args.max_minutes
        run(cfg, args.n, args.out, bundle, progress=not args.quiet, time_limit=limit)
    runs = [args.out, *args.pool]
    made = pooled_config(runs)
    # R belongs to the run's own method, latent prior and bundle, and the interim prior to its bundle,
    # which config.json records; with --report the command line's --method/--latent-prior may say otherwise.
    name = str(bundle.card.get("name", bundle.path))
    if made.get("bundle", name) != name:
        raise BayesblendError(
            f"{args.out} was made with bundle {made['bundle']!r}, not {name!r}: pass --prior for it"
        )
    method = str(made.get("method", args.method))
    latent_prior = made.get("latent_prior") or latent_prior
    R = 1.0
    if args.calibrated:
        R, _ = responsivity_from_card(bundle.card, method, made.get("scene_model", {}), binned=True)
    interim = interim_prior_from_card(bundle.card)  # the scene model's own prior on e
    res = summarise(
        runs,
        responsivity=R,
        interim=interim,
        min_snr=args.min_snr,
        min_resolution=args.min_resolution,
        n_bins=args.bins,
    )
    print(format_summary(res))
    if args.json:
        from bayesblend.io import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(res, indent=1))
    if args.calibrate and res["responsivity_table"] is None:
        # storing R alone would replace the card's entry and drop the table it holds
        raise BayesblendError(
            f"nothing stored: no responsivity table ({res['responsivity_table_problem']}); "
            "run more items or pass fewer --bins"
        )
    if args.calibrate:
        from bayesblend.shear import store_responsivity

        e = res["estimators"]["ensemble"]
        seed = made["seed"][0] if args.pool else made["seed"]
        pool = "".join(f" --pool {d}" for d in args.pool)
        command = (
            f"bayesblend shear-bias --kind {made['kind']} --method {method} --seed {seed} "
            f"--shear {made['shear']} --draws {made['draws']} --latent-prior {latent_prior} --n {args.n} "
            f"--out {args.out}{pool}{' --detect' if made['detect'] else ''} --bins {args.bins} --calibrate"
            f"{' --report' if args.report else ''}{f' --prior {args.prior}' if args.prior else ''}"
        )
        entry = store_responsivity(bundle.path, method, e, res, command)
        print(
            f"stored R = {entry['R']:.4f} ± {entry['R_err']:.4f} for method {method} "
            f"in {bundle.path / 'card.json'}"
        )
        if "R_table" in entry:
            print(f"  and R by posterior e dispersion: {ResponsivityTable.from_dict(entry['R_table'])}")
    return 0


def _shear(args: argparse.Namespace) -> int:
    from bayesblend.io import write_table
    from bayesblend.shear import IS_ESS_MIN, field_shear

    res = field_shear(
        args.catalog,
        posterior=args.posterior,
        bundle=args.prior,
        sigma_e=args.sigma_e,
        seed=args.seed,
        find_posterior=not args.no_posterior,
    )
    for name, est in res.estimates.items():
        d = est.details
        if name == "hierarchical":
            extra = (
                f"{res.posterior}; sigma_e = {d['sigma_e']:.3f}, "
                f"{d['n_low_ess']} sources with importance ESS < {IS_ESS_MIN:g}"
            )
        else:
            how = "uncalibrated, R = 1" if not d["calibrated"] else f"mean R = {d['responsivity']:.4f}"
            extra = f"{args.catalog}; {how}, jackknife over blends"
        print(f"{name:12s} {est}  [{extra}]")
    if args.json:
        print(f"  {res.write_json(args.json)}")
    if args.out:
        write_table(args.out, res.shear_catalog)
        print(f"  {args.out}")
    return 0


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"bayesblend: warning: {message}", file=sys.stderr if file is None else file)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesblend`` command; returns the exit code."""
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    commands = {
        "deblend": _deblend,
        "simulate": _simulate,
        "train": _train,
        "shear-bias": _shear_bias,
        "shear": _shear,
    }
    if args.command not in commands:
        parser.error(f"unknown command {args.command!r}")
    try:
        return commands[args.command](args)
    except BayesblendError as exc:
        print(f"bayesblend: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be read or written: the user's to fix
        where = f": {exc.filename}" if exc.filename else ""
        print(f"bayesblend: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bayesblend: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
