"""Accuracy, calibration and speed of bayesblend.deblend on the held-out blends (issue 4, items 6-7).

Blends: the first ``--n`` items of the project's held-out blend test set
(``bayesblend simulate blends --seed 4 --max-shift 0.5 --psf-jitter 0.05``),
regenerated from (seed, index); 1-4 galaxies each. Sources are given at their
true positions (detection off), so the numbers measure deblending, not
detection. With ``--detect`` (and its own ``--out``) the sources are
detected instead, and the rows are the true galaxies matched to a fitted
source within ``MATCH_RADIUS`` pixels; the unmatched are detection's loss,
measured by ``detection_check.py``. Per method, every source's posterior summary and truth are
appended to ``benchmarks/deblend/<method>.jsonl`` after each chunk of blends,
so an interrupted run resumes where it stopped (each chunk rewrites the file
atomically, under a lock, and each row names the commit that made it). XLA keeps
about 1.3 of the two cores busy, so a long run goes faster as two processes over
disjoint blend ranges (``--n 114`` and ``--first 114 --n 200``) sharing the file. The settings of a run
(inference configuration, detection, seeds) are recorded beside its rows in
``<method>.settings.json`` when it starts, and a resume under other settings is
refused: the rows of one file are one experiment. ``--report`` prints the
Markdown tables of RESULTS.md from those files, with the sep baseline
(FLUX_AUTO-style Kron photometry in r on the same scenes, matched to truth
within 2 pixels) measured in the same run.

Wall time per chunk (compilation excluded: the first chunk of each padded
size is timed separately and dropped) is divided by the chunk's sources.

Run::

    .venv/bin/python benchmarks/bench_deblend.py --methods map,svi,amortised --n 200
    nohup .venv/bin/python benchmarks/bench_deblend.py --methods nuts --n 200 &
    .venv/bin/python benchmarks/bench_deblend.py --report
"""

from __future__ import annotations

import argparse
import fcntl
import json
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bayesblend.catalog import ESS_MIN, R_HAT_MAX
from bayesblend.io import atomic_path

OUT = Path(__file__).parent / "deblend"  # --out changes it
SIM = dict(max_shift=0.5, psf_jitter=0.05)  # --family adds the population
SEED = 4
#: The inference seed of every fit.
FIT_SEED = 11
SNR_CUTS = (0, 10, 30)
#: With ``--detect``, fitted sources are matched to true galaxies within this many pixels.
MATCH_RADIUS = 2.0


def scenes(indices):
    from bayesblend.simulate.scenes import simulate_blend

    return [simulate_blend(SEED, int(i), **SIM) for i in indices]


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``.jsonl`` file; none when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def coverage(quantiles: np.ndarray, truth: np.ndarray) -> str:
    """``"68 / 95"``: percent of ``truth`` inside the central 68 % and 95 % intervals.

    ``quantiles`` are ``(n, 5)`` percentiles 2.5, 16, 50, 84, 97.5; a row with a
    non-finite one counts as outside.
    """
    ok = np.isfinite(quantiles).all(axis=1) & np.isfinite(truth)
    c68 = np.mean((truth >= quantiles[:, 1]) & (truth <= quantiles[:, 3]) & ok)
    c95 = np.mean((truth >= quantiles[:, 0]) & (truth <= quantiles[:, 4]) & ok)
    return f"{100 * c68:.0f} / {100 * c95:.0f}"


def commit() -> str:
    """The short git commit of this checkout ("unknown" outside git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def check_settings(method: str, settings: dict, detect: bool, redetect: bool, bundle: str) -> None:
    """Record a run's settings in ``<method>.settings.json``, or refuse to resume under others."""
    from bayesblend.infer import InferenceConfig

    want = {
        "inference": asdict(InferenceConfig().replace(**settings)),
        "detect": detect,
        "redetect": redetect,
        "fit_seed": FIT_SEED,
        "bundle": bundle,
        "simulation": {"seed": SEED, **SIM},
    }
    want = json.loads(json.dumps(want))
    path = OUT / f"{method}.settings.json"
    if path.exists():
        have = json.loads(path.read_text())
        differ = sorted(k for k in want if have.get(k) != want[k])
        if "inference" in differ:
            old, new = have.get("inference", {}), want["inference"]
            differ += sorted(f"inference.{k}" for k in new if old.get(k) != new[k])
        if differ:
            raise SystemExit(
                f"{path}: this run was made with other settings ({', '.join(differ)}); "
                "finish it with those, or use another --out"
            )
        return
    if (OUT / f"{method}.jsonl").exists():
        raise SystemExit(
            f"{OUT / method}.jsonl holds rows but no {path.name} says how they were made: "
            "write it (the settings they were made with) or use another --out"
        )
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(want | {"started_on": commit()}, indent=1))


def done(method: str) -> set[int]:
    return {r["blend"] for r in read_rows(OUT / f"{method}.jsonl")}


def run(
    method: str,
    n: int,
    chunk: int,
    settings: dict,
    detect: bool = False,
    redetect: bool = False,
    first: int = 0,
    bundle: str | None = None,
) -> None:
    """Fit blends ``first .. n-1`` not yet in ``<method>.jsonl``, a chunk at a time.

    ``bundle`` names the prior (default: the shipped default model).
    """
    import bayesblend
    from bayesblend.detect import match_sources
    from bayesblend.infer import deblend

    prior = bayesblend.load_prior(bundle)
    have = done(method)
    todo = [i for i in range(first, n) if i not in have]
    if not todo:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    check_settings(method, settings, detect, redetect, str(prior.card.get("name", bundle)))
    made_by = commit()
    compiled: set[int] = set()
    for start in range(0, len(todo), chunk):
        idx = todo[start : start + chunk]
        sims = scenes(idx)
        t0 = time.perf_counter()
        post = deblend(
            [s.scene for s in sims],
            sources=None if detect else [np.c_[s.truth["x"], s.truth["y"]] for s in sims],
            method=method,
            prior=prior,
            seed=FIT_SEED,
            redetect=redetect,
            **settings,
        )
        wall = time.perf_counter() - t0
        sizes = {b.spec.n_sources for b in post.blends}
        compiling = not sizes <= compiled  # a padded size met for the first time
        compiled |= sizes
        cat = post.catalog()
        d = post.draws
        rows = []
        scene_of = np.asarray(post.sources["scene"])
        true_of: dict[int, int] = {}  # catalogue row -> true galaxy in its scene
        for si, s in enumerate(sims):
            own = np.flatnonzero(scene_of == si)
            if detect:
                found = np.asarray(cat["x"])[own], np.asarray(cat["y"])[own]
                hit = match_sources(s.truth["x"], s.truth["y"], *found, MATCH_RADIUS)
                true_of.update({int(own[h]): k for k, h in enumerate(hit) if h >= 0})
            else:
                true_of.update({int(j): k for k, j in enumerate(own)})
        for j, row in enumerate(cat):
            si = int(row["scene"])
            t = sims[si].truth
            if j not in true_of:  # a detection no galaxy is matched to
                continue
            k = true_of[j]
            q = {}
            for name, arr in (
                ("flux_r", d["flux"][..., 2]),
                ("e1", d["e1"]),
                ("e2", d["e2"]),
                ("size", d["size"]),
            ):
                a = arr[:, :, j].ravel()
                q[name] = np.percentile(a, [2.5, 16, 50, 84, 97.5]).tolist()
            rows.append(
                {
                    "blend": int(idx[si]),
                    "source": k,
                    "n_sources": len(t),
                    "true_flux_r": float(t["flux_r"][k] * t["frac_in_image_r"][k]),
                    "true_e1": float(t["e1"][k]),
                    "true_e2": float(t["e2"][k]),
                    "true_hlr": float(t["hlr"][k]),
                    "snr": float(t["snr"][k]),
                    "mag_r": float(t["mag_r"][k]),
                    "b_tot": float(t["b_tot"][k]),
                    "q": q,
                    "r_hat": float(row["r_hat_max"]),
                    "ess": float(row["ess_bulk_min"]),
                    "n_div": int(row["n_divergent"]),
                    "wall_per_source": wall / len(cat),
                    "includes_compile": bool(compiling),
                    "n_found": int(np.sum(scene_of == si)),
                    "detected": detect,
                    "commit": made_by,
                }
            )
        path = OUT / f"{method}.jsonl"
        with open(OUT / f".{method}.lock", "w") as lock:  # runs over other blend ranges share the file
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = path.read_text() if path.exists() else ""
            with atomic_path(path) as tmp:  # never a half-written row, whenever the run is stopped
                tmp.write_text(old + "".join(json.dumps(r) + "\n" for r in rows))
        print(f"{method}: blends {idx[0]}-{idx[-1]} ({len(cat)} sources) in {wall:.1f} s", flush=True)


def sep_baseline(n: int) -> list[dict]:
    """Kron (FLUX_AUTO-like) r-band photometry with sep on the detection image's segments."""
    import sep

    from bayesblend.detect import detect_sources

    path = OUT / "sep.jsonl"
    rows = read_rows(path)
    if len({r["blend"] for r in rows}) >= n:
        return [r for r in rows if r["blend"] < n]
    rows = []
    for i in range(n):
        s = scenes([i])[0]
        sc, t = s.scene, s.truth
        det = detect_sources(sc)
        img = np.ascontiguousarray(sc.image[sc.band_index("r")].astype(np.float64))
        objs = sep.extract(
            img,
            1.5,
            err=float(np.sqrt(np.median(sc.variance[2]))) if sc.variance is not None else float(np.std(img)),
            minarea=5,
        )
        for k in range(len(t)):
            dist = np.hypot(objs["x"] - t["x"][k], objs["y"] - t["y"][k]) if len(objs) else np.array([np.inf])
            j = int(np.argmin(dist))
            flux = np.nan
            if dist[j] < 2.0:
                o = objs[j : j + 1]
                kr, _ = sep.kron_radius(img, o["x"], o["y"], o["a"], o["b"], o["theta"], 6.0)
                f, _, _ = sep.sum_ellipse(img, o["x"], o["y"], o["a"], o["b"], o["theta"], 2.5 * kr, subpix=1)
                flux = float(f[0])
            rows.append(
                {
                    "blend": i,
                    "source": k,
                    "true_flux_r": float(t["flux_r"][k] * t["frac_in_image_r"][k]),
                    "flux_r": flux,
                    "snr": float(t["snr"][k]),
                    "n_detected": len(det),
                }
            )
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def flux_by_blendedness(rows: list[dict]) -> None:
    """MAP's r-flux error by true blendedness, beside its posterior's width and the noise floor.

    ``rows``: the MAP rows of the report's blends.
    """
    snr = np.array([r["snr"] for r in rows])
    b = np.array([r["b_tot"] for r in rows])
    q = np.array([r["q"]["flux_r"] for r in rows])
    tf = np.array([r["true_flux_r"] for r in rows])
    err = np.abs(q[:, 2] / tf - 1)
    width = np.sqrt(2 / np.pi) * 0.5 * (q[:, 3] - q[:, 1]) / tf  # what an unbiased posterior predicts
    floor = np.sqrt(2 / np.pi) / snr
    print(
        "\n| S/N cut | blendedness | sources | MAP mean \\|Δf/f\\| r | median | "
        "√(2/π) σ_f/f of MAP's posterior, mean | noise floor (Cramér–Rao), mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for cut, lo, hi in ((10, 0, 0.5), (10, 0.5, 0.9), (30, 0, 0.01), (30, 0, 0.5), (30, 0.5, 0.9)):
        sel = (snr > cut) & (b >= lo) & (b < hi)
        if sel.any():
            label = f"< {hi:g}" if lo == 0 else f"{lo:g}–{hi:g}"
            print(
                f"| > {cut} | {label} | {sel.sum()} | {err[sel].mean():.3f} | {np.median(err[sel]):.3f} | "
                f"{width[sel].mean():.3f} | {floor[sel].mean():.3f} |"
            )


def accuracy_rows(label: str, every: list[dict], wall: np.ndarray) -> None:
    """The accuracy table's rows of one method (``label``) at each S/N cut."""
    for cut in SNR_CUTS:
        rows = [r for r in every if r["snr"] > cut]
        if not rows:
            continue
        tf = np.array([r["true_flux_r"] for r in rows])
        q = {k: np.array([r["q"][k] for r in rows]) for k in ("flux_r", "e1", "e2")}
        rel = q["flux_r"][:, 2] / tf - 1
        te1 = np.array([r["true_e1"] for r in rows])
        te2 = np.array([r["true_e2"] for r in rows])
        de1, de2 = q["e1"][:, 2] - te1, q["e2"][:, 2] - te2

        bad_e = int(np.sum(~np.isfinite(de1)))
        nan_txt = f" ({bad_e} NaN)" if bad_e else ""
        print(
            f"| {label} | > {cut} | {len(rows)} ({len({r['blend'] for r in rows})} blends) | "
            f"{np.mean(np.abs(rel)):.3f} | {np.median(np.abs(rel)):.3f} | "
            f"{np.nanmedian(de1):+.3f} | {np.nanmedian(de2):+.3f} | "
            f"{0.5 * (np.nanstd(de1) + np.nanstd(de2)):.3f}{nan_txt} | "
            f"{coverage(q['flux_r'], tf)} | {coverage(q['e1'], te1)} | {coverage(q['e2'], te2)} | "
            f"{np.median(wall) if wall.size else float('nan'):.2f} |"
        )


def report(n: int) -> None:
    print(f"Blends 0-{n - 1} of the held-out set (seed {SEED}).\n")
    print(
        "| method | S/N cut | sources | mean \\|Δf/f\\| r | median \\|Δf/f\\| r | median Δe1 | median Δe2 | "
        "σ(Δe) | cover 68/95 flux_r | cover 68/95 e1 | cover 68/95 e2 | s/source |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = sep_baseline(n)
    notes = ""
    map_rows: list[dict] = []
    for method in ("amortised", "map", "svi", "nuts"):
        every = [r for r in read_rows(OUT / f"{method}.jsonl") if r["blend"] < n]
        if not every:
            continue
        if method == "map":
            map_rows = every
        if any(r.get("detected") for r in every):
            notes += f"\n{method}: sources detected; rows: true galaxies matched within {MATCH_RADIUS} px."
        wall = np.array([r["wall_per_source"] for r in every if not r["includes_compile"]])
        accuracy_rows(method, every, wall)
        if method == "nuts":  # where the chains converged, by the catalogue's own flags
            good = [r for r in every if r["r_hat"] <= R_HAT_MAX and r["ess"] >= ESS_MIN]
            accuracy_rows(
                f"nuts, r̂ ≤ {R_HAT_MAX}, ESS ≥ {ESS_MIN:g} ({len(good)} of {len(every)})", good, wall
            )
            ok = {
                k: [r["r_hat"] <= R_HAT_MAX and r["ess"] >= ESS_MIN for r in every if r["n_sources"] == k]
                for k in sorted({r["n_sources"] for r in every})
            }
            by_k = ", ".join(f"{k}-source blends {np.mean(v) * 100:.0f} % of {len(v)}" for k, v in ok.items())
            notes += f"NUTS sources converged (r̂ ≤ {R_HAT_MAX}, ESS ≥ {ESS_MIN:g}) by blend size: {by_k}.\n"
            rh = np.array([r["r_hat"] for r in every])
            ess = np.array([r["ess"] for r in every])
            div = np.array([r["n_div"] for r in every])
            notes += (
                f"NUTS diagnostics: r_hat_max median {np.median(rh):.3f}, "
                f"90th pct {np.percentile(rh, 90):.3f}, "
                f"{np.mean(rh > 1.05) * 100:.0f} % above 1.05; ess_bulk_min median {np.median(ess):.0f}, "
                f"10th pct {np.percentile(ess, 10):.0f}; sources in blends with divergences "
                f"{np.mean(div > 0) * 100:.0f} %."
            )
    bf = np.array([r["flux_r"] for r in base])
    bt = np.array([r["true_flux_r"] for r in base])
    ok = np.isfinite(bf)
    snr = np.array([r["snr"] for r in base])
    for cut in SNR_CUTS:
        sel = ok & (snr > cut)
        rel = bf[sel] / bt[sel] - 1
        print(
            f"| sep Kron (baseline) | > {cut} | {sel.sum()} matched of {np.sum(snr > cut)} | "
            f"{np.mean(np.abs(rel)):.3f} | {np.median(np.abs(rel)):.3f} | – | – | – | – | – | – | – |"
        )
        # like for like: MAP on the same galaxies, those sep detected and matched (sep's selection
        # favours isolated, bright ones, so its rows are not comparable with the methods' rows above)
        matched = {(r["blend"], r["source"]) for r, m in zip(base, sel, strict=True) if m}
        same = [r for r in map_rows if (r["blend"], r["source"]) in matched]
        if same:
            rel = np.array([r["q"]["flux_r"][2] / r["true_flux_r"] - 1 for r in same])
            print(
                f"| map, on sep's matched galaxies | > {cut} | {len(same)} | "
                f"{np.mean(np.abs(rel)):.3f} | {np.median(np.abs(rel)):.3f} | – | – | – | – | – | – | – |"
            )
    # the r-band noise floor: a galaxy of known profile and position has sigma_f / f = 1 / (S/N), the
    # truth's S/N being the matched-filter one (paper eq. 7), so an unbiased flux scatters by
    # mean |df/f| = sqrt(2/pi) / (S/N) and median 0.674 / (S/N) (Gaussian), from noise alone
    # (the sep rows hold every true galaxy's S/N, matched or not)
    for cut in SNR_CUTS:
        inv = 1.0 / snr[snr > cut]
        print(
            f"| noise floor (r, known profile) | > {cut} | {inv.size} | "
            f"{np.sqrt(2 / np.pi) * inv.mean():.3f} | {0.674 * np.median(inv):.3f} | "
            "– | – | – | – | – | – | – |"
        )
    if map_rows:
        flux_by_blendedness(map_rows)
    if notes:
        print("\n" + notes)
    print(
        f"\nMachine: {platform.machine()}, {platform.processor() or 'cpu'}; command: "
        "`.venv/bin/python benchmarks/bench_deblend.py --report`"
    )


def main() -> None:
    global OUT
    p = argparse.ArgumentParser()
    p.add_argument("--methods", default="amortised,map,svi")
    p.add_argument("--n", type=int, default=200, help="blends 0 .. n-1 (with --first: first .. n-1)")
    p.add_argument(
        "--first",
        type=int,
        default=0,
        help="first blend to fit: two runs over disjoint ranges share the file and both cores",
    )
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument(
        "--bundle", default=None, help="prior bundle name or directory (default: the default model)"
    )
    p.add_argument("--report", action="store_true")
    p.add_argument("--set", action="append", default=[], help="inference setting name=value")
    p.add_argument("--out", type=Path, default=OUT, help="directory of the per-method .jsonl files")
    p.add_argument(
        "--detect",
        action="store_true",
        help="detect sources instead of giving the true positions; rows for the matched galaxies only",
    )
    p.add_argument(
        "--redetect", action="store_true", help="with --detect: refit with the residual's new sources"
    )
    p.add_argument(
        "--family",
        default="bulge+disk",
        choices=["bulge+disk", "sersic"],
        help="galaxy population of the blends (sersic: single Sersic, no knots, never trained on)",
    )
    args = p.parse_args()
    if args.family != "bulge+disk":  # recorded in <method>.settings.json; the default left out, as before
        SIM["family"] = args.family
    if args.redetect and not args.detect:
        p.error("--redetect needs --detect")
    OUT = args.out
    if args.report:
        report(args.n)
        return
    from bayesblend.infer import InferenceConfig

    settings = InferenceConfig.parse_settings(args.set)
    for m in args.methods.split(","):
        run(
            m,
            args.n,
            args.chunk,
            settings,
            detect=args.detect,
            redetect=args.redetect,
            first=args.first,
            bundle=args.bundle,
        )


if __name__ == "__main__":
    main()
