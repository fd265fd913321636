"""The explicit-pose renderer: accuracy against GalSim and cost per gradient, beside jax-galsim.

For one canonical bulge + disk (64 x 64 canonical pixels, half-light radius 6
of them) in the six LSST bands, this measures

- accuracy: the largest pixel difference, as a fraction of the peak, from
  GalSim drawing the same canonical image as an ``InterpolatedImage``, dilated,
  sheared, shifted and convolved with each band's PSF image, over half-light
  radii 0.05-1" and |e| up to 0.7 on a 48-pixel LSST stamp;
- cost per gradient of a scalar of the six-band stamp with respect to the pose
  (e1, e2, hlr, dx, dy) and the canonical image (as a fit over z needs): wall
  time (median of 30 calls after compilation) and XLA FLOPs, with the FLOP rate
  as a fraction of a 2048 x 2048 float32 matmul's measured in the same run;

for ``bayesblend.forward.render_pose`` and, when it is installed
(``pip install jax-galsim``; not a dependency of bayesblend), for jax-galsim
drawing the same objects with its FFT size pinned to the same grid.

Run: ``.venv/bin/python benchmarks/bench_renderer.py`` (prints a table; writes
``benchmarks/renderer.json``).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import galsim
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_speed import matmul_rate  # noqa: E402

from bayesblend import forward  # noqa: E402
from bayesblend.survey import get_survey  # noqa: E402

N, R0, STAMP, GRID = 64, 6.0, 48, 96
CASES = [(h, e) for h in (0.05, 0.3, 1.0) for e in ((0.0, 0.0), (0.5, -0.4), (-0.1, 0.69))]
POSE = (0.3, -0.2, 0.6, 0.3, -0.1)  # e1, e2, hlr (arcsec), dx, dy (pixels)


def canonical(nb: int) -> np.ndarray:
    out = []
    for bt in np.linspace(0.5, 0.2, nb):
        prof = bt * galsim.DeVaucouleurs(half_light_radius=0.4) + (1 - bt) * galsim.Exponential(
            half_light_radius=1.0
        )
        out.append(prof)
    scale = R0 / out[len(out) // 2].calculateHLR()
    imgs = [p.dilate(scale).drawImage(nx=N, ny=N, scale=1.0, method="auto").array for p in out]
    return np.stack([i / i.sum() for i in imgs]).astype(np.float32)


def galsim_reference(canon, psf, pose, pixel_scale):
    e1, e2, hlr, dx, dy = pose
    out = []
    for c, p in zip(canon, psf, strict=True):
        gal = galsim.InterpolatedImage(
            galsim.Image(c.astype(np.float64), scale=1.0), calculate_maxk=False, calculate_stepk=False
        )
        gal = galsim.Convolve([gal, galsim.Deconvolve(galsim.Pixel(1.0))])  # pixel-integrated canonical
        gal = gal.dilate(hlr / R0).shear(g1=e1, g2=e2).shift(dx * pixel_scale, dy * pixel_scale)
        psf_obj = galsim.InterpolatedImage(galsim.Image(p.astype(np.float64), scale=pixel_scale))
        img = galsim.Convolve([gal, psf_obj]).drawImage(
            nx=STAMP, ny=STAMP, scale=pixel_scale, method="no_pixel"
        )
        out.append(img.array)
    return np.stack(out)


def ours(psf, pixel_scale):
    psf_ft = forward.psf_spectrum(psf, GRID)

    def render(canon, pose):
        return forward.render_pose(
            forward.canonical_spectrum(canon),
            jnp.ones(canon.shape[0]),
            pose[:2],
            pose[2],
            pose[3:],
            psf_ft,
            stamp=STAMP,
            pixel_scale=pixel_scale,
            hlr_pixels=R0,
        )

    return render


def jax_galsim(psf, pixel_scale):
    import jax_galsim as jg

    gsp = jg.GSParams(minimum_fft_size=GRID, maximum_fft_size=GRID)

    def one(c, p, pose):
        gal = jg.InterpolatedImage(
            jg.Image(c, scale=1.0), calculate_stepk=False, calculate_maxk=False, gsparams=gsp
        )
        gal = jg.Convolve([gal, jg.Deconvolve(jg.Pixel(1.0))], gsparams=gsp)
        gal = gal.dilate(pose[2] / R0).shear(g1=pose[0], g2=pose[1])
        gal = gal.shift(pose[3] * pixel_scale, pose[4] * pixel_scale)
        psf_obj = jg.InterpolatedImage(
            jg.Image(p, scale=pixel_scale), calculate_stepk=False, calculate_maxk=False, gsparams=gsp
        )
        img = jg.Convolve([gal, psf_obj], gsparams=gsp).drawImage(
            nx=STAMP, ny=STAMP, scale=pixel_scale, method="no_pixel"
        )
        return img.array

    def render(canon, pose):
        return jnp.stack([one(canon[b], jnp.asarray(psf[b]), pose) for b in range(canon.shape[0])])

    return render


def measure(name, render, canon, psf, pixel_scale, ref_rate):
    fn = jax.jit(render)
    errors = []
    for hlr, e in CASES:
        pose = (e[0], e[1], hlr, 0.31, -0.27)
        ref = galsim_reference(canon, psf, pose, pixel_scale)
        img = np.asarray(fn(jnp.asarray(canon), jnp.asarray(pose, jnp.float32)))
        errors.append(float(np.max(np.abs(img - ref).max(axis=(-2, -1)) / ref.max(axis=(-2, -1)))))
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(canon.shape[0], STAMP, STAMP)), jnp.float32)
    grad = jax.jit(jax.grad(lambda c, p: jnp.sum(render(c, p) * weights), argnums=(0, 1)))
    args = (jnp.asarray(canon), jnp.asarray(POSE, jnp.float32))
    cost = grad.lower(*args).compile().cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
    jax.block_until_ready(grad(*args))
    times = []
    for _ in range(30):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(*args))
        times.append(time.perf_counter() - t0)
    wall = float(np.median(times))
    return {
        "renderer": name,
        "max_error_over_peak": max(errors),
        "grad_ms": 1e3 * wall,
        "grad_mflop": flops / 1e6,
        "matmul_fraction": flops / wall / ref_rate,
    }


def main() -> None:
    survey = get_survey("lsst")
    psf = survey.psf_images(size=41)
    canon = canonical(psf.shape[0])
    ref_rate = matmul_rate()
    rows = [
        measure("bayesblend.forward", ours(psf, survey.pixel_scale), canon, psf, survey.pixel_scale, ref_rate)
    ]
    try:
        rows.append(
            measure(
                "jax-galsim", jax_galsim(psf, survey.pixel_scale), canon, psf, survey.pixel_scale, ref_rate
            )
        )
    except ImportError:
        print("jax-galsim not installed: its row is skipped")
    print(f"matmul rate {ref_rate / 1e9:.1f} GFLOP/s; six bands, {STAMP}-pixel stamp, {GRID}-point FFT grid")
    print("| renderer | max error / peak | ms per gradient | MFLOP per gradient | fraction of matmul rate |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['renderer']} | {r['max_error_over_peak']:.1e} | {r['grad_ms']:.1f} | "
            f"{r['grad_mflop']:.0f} | {r['matmul_fraction']:.3f} |"
        )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, jax {jax.__version__}",
        "matmul_gflops": ref_rate / 1e9,
        "rows": rows,
    }
    path = Path(__file__).parent / "renderer.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
