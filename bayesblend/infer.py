"""Inference on a blend: preparation, the amortised start and MAP.

:func:`prepare_blend` turns a :class:`~bayesblend.scene.Scene` and source
positions into the static :class:`~bayesblend.model.SceneSpec` and the arrays
of :func:`~bayesblend.model.scene_model`, padding the sources to a few fixed
counts (:data:`PAD_SIZES`) so that every blend of the same size and padded
count reuses one compilation. The methods build on each other:

- amortised (:func:`amortised_init`): the deblender encoder on a stamp around
  each source gives z; the fluxes are the joint linear least-squares
  amplitudes of all templates; positions at the detections.
- MAP (:func:`map_fit`): Adam on the joint log density (all parameters are
  unconstrained reals), started from the amortised solution.

SVI and NUTS, started at MAP, and the ``Posterior`` result type come next
(issue 4).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesblend.errors import BayesblendError
from bayesblend.forward import anchor_and_offset, difference_kernel, fft_size, render_scene
from bayesblend.model import SceneSpec, scene_model
from bayesblend.prior.bundle import PriorBundle
from bayesblend.scene import Scene
from bayesblend.survey import get_survey

#: Padded source counts: a blend of k sources is padded to the smallest size >= k.
PAD_SIZES = (1, 2, 4, 8, 16)


def padded_count(k: int) -> int:
    """The padded source count for ``k`` sources."""
    for p in PAD_SIZES:
        if k <= p:
            return p
    raise BayesblendError(f"blends of more than {PAD_SIZES[-1]} sources are not supported (got {k})")


@dataclass
class PreparedBlend:
    """A blend ready for the scene model: static spec, arrays, and what is needed to report.

    Attributes
    ----------
    spec : SceneSpec
    data : dict of jax.Array
        The arrays of :func:`bayesblend.model.scene_model`.
    n_real : int
        Number of real (unpadded) sources.
    x, y : numpy.ndarray
        Detected positions of the real sources, pixels.
    bands : tuple of str
    magzero : numpy.ndarray
    """

    spec: SceneSpec
    data: dict
    n_real: int
    x: np.ndarray
    y: np.ndarray
    bands: tuple[str, ...]
    magzero: np.ndarray


def prepare_blend(
    scene: Scene,
    x: Sequence[float],
    y: Sequence[float],
    bundle: PriorBundle,
    log_flux_sigma: float = 2.0,
    position_sigma: float = 0.5,
) -> PreparedBlend:
    """Arrays of the scene model for sources at ``(x, y)`` in ``scene`` (bands in the bundle's order).

    Bad pixels (non-finite values) are masked with a warning; a missing PSF is
    replaced by the survey's default PSF with a warning; missing bands are an error.
    """
    missing = [b for b in bundle.bands if b not in scene.bands]
    if missing:
        raise BayesblendError(f"scene lacks band(s) {', '.join(missing)} that the prior needs")
    sc = scene.select_bands(bundle.bands)
    survey = get_survey(bundle.survey)
    image = np.asarray(sc.image, dtype=np.float32)
    valid = np.isfinite(image)
    if sc.mask is not None:
        valid &= ~sc.mask
    if not np.isfinite(image).all():
        warnings.warn(f"{np.sum(~np.isfinite(image))} non-finite pixels masked", stacklevel=2)
    if not valid.any():
        raise BayesblendError("every pixel of the blend is masked")
    image = np.where(valid, image, 0.0).astype(np.float32)
    psf = sc.psf
    if psf is None:
        warnings.warn("scene has no PSF: using the survey's default PSF per band", stacklevel=2)
        psf = survey.psf_images(bundle.bands)
    kernel = difference_kernel(psf, survey.model_psf_image(psf.shape[-1]), fft_size(bundle.stamp))
    sky = np.array([survey.sky_counts(b) for b in bundle.bands], dtype=np.float32)
    x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
    k = len(x)
    if k == 0:
        raise BayesblendError("no sources to deblend")
    n = padded_count(k)
    anchor, offset0 = anchor_and_offset(x, y, bundle.stamp)
    # detection flux estimate: a 5x5 box sum over the PSF's fraction in the box, floored at 3 sigma
    c = psf.shape[-1] // 2
    frac = psf[:, c - 2 : c + 3, c - 2 : c + 3].sum(axis=(1, 2))
    flux0 = np.zeros((k, len(bundle.bands)))
    ny, nx = image.shape[1:]
    for i in range(k):
        xi, yi = int(round(x[i])), int(round(y[i]))
        box = image[:, max(yi - 2, 0) : yi + 3, max(xi - 2, 0) : xi + 3]
        flux0[i] = box.sum(axis=(1, 2)) / frac
    floor = 3 * np.sqrt(sky * 25) / frac
    log_flux0 = np.log(np.maximum(flux0, floor))
    pad = n - k

    def padded(a, fill):
        return np.concatenate([a, np.repeat(fill[None], pad, 0)]) if pad else a

    data = {
        "image": jnp.asarray(image),
        "variance": jnp.asarray(sc.variance if sc.variance is not None else np.ones_like(image)),
        "valid": jnp.asarray(valid),
        "sky": jnp.asarray(sky),
        "kernel": kernel,
        "anchor": jnp.asarray(padded(anchor, np.array([-bundle.stamp, -bundle.stamp], np.int32))),
        "offset0": jnp.asarray(padded(offset0, np.zeros(2, np.float32))),
        "log_flux0": jnp.asarray(padded(log_flux0, np.zeros(len(bundle.bands))), dtype=jnp.float32),
        "source_valid": jnp.asarray(np.arange(n) < k),
    }
    spec = SceneSpec(
        shape=(ny, nx),
        n_sources=n,
        latent_dim=bundle.latent_dim,
        log_flux_sigma=log_flux_sigma,
        position_sigma=position_sigma,
        has_variance=sc.variance is not None,
    )
    return PreparedBlend(spec, data, k, x, y, tuple(bundle.bands), np.asarray(sc.magzero))


def _latent_maps(bundle: PriorBundle, prior: str):
    """``(to_latent, to_base)`` for the scene model's ``u`` under ``prior`` (flow or normal)."""
    if prior == "normal":
        return None, (lambda z: z)
    from bayesblend.prior.flow import RealNVP

    flow, fp = bundle.flow, bundle.params["flow"]
    if flow is None:
        raise BayesblendError(f"{bundle.path}: no flow in this bundle; use prior='normal'")
    return (
        lambda u: flow.apply(fp, u, method=RealNVP.sample_from_base),
        lambda z: flow.apply(fp, z, method=RealNVP.to_base),
    )


def cutouts(image: jnp.ndarray, anchor: jnp.ndarray, stamp: int) -> jnp.ndarray:
    """Stamps ``(source, band, S, S)`` cut from ``image`` ``(band, H, W)`` at ``anchor`` (zero outside)."""
    nb = image.shape[0]
    padded = jnp.pad(image, ((0, 0), (stamp, stamp), (stamp, stamp)))
    h, w = image.shape[1:]

    def one(a):
        a = jnp.clip(a, -stamp, jnp.array([w, h])) + stamp
        return jax.lax.dynamic_slice(padded, (0, a[1], a[0]), (nb, stamp, stamp))

    return jax.vmap(one)(anchor)


def amortised_init(bundle: PriorBundle, prep: PreparedBlend, prior: str) -> dict[str, jnp.ndarray]:
    """The amortised solution in the scene model's parameters (``u``, ``log_flux``, ``offset``).

    The deblender encoder (the VAE encoder if the bundle has none) on a stamp
    around each source gives its mean code; the fluxes are the joint
    least-squares amplitudes of all sources' templates on the scene
    (:func:`joint_flux`), so that no source absorbs its neighbours' light.
    """
    data = prep.data
    net = "deblender" if "deblender" in bundle.params else "encoder"
    stamps = cutouts(data["image"], data["anchor"], bundle.stamp)
    mean, _ = bundle.encode(stamps, jnp.sqrt(data["sky"]), network=net)
    morph = bundle.decode(mean)
    flux = joint_flux(morph, data, prep.spec)
    floor = jnp.exp(data["log_flux0"]) * 0.05
    _, to_base = _latent_maps(bundle, prior)
    return {
        "u": to_base(mean),
        "log_flux": jnp.log(jnp.maximum(flux, floor)),
        "offset": data["offset0"],
    }


def joint_flux(morphology: jnp.ndarray, data: dict, spec: SceneSpec) -> jnp.ndarray:
    """Joint weighted least-squares fluxes ``(source, band)`` of fixed morphologies on the scene.

    Per band, solves ``(T^T W T) f = T^T W d`` with T the unit-flux templates of
    all sources rendered on the canvas, W the inverse variance (sky + data
    Poisson term, masked pixels excluded) and d the data. Padded sources get zero.
    """
    n = spec.n_sources
    nb = morphology.shape[1]
    eye = jnp.eye(n)

    def one(k):
        unit = jnp.zeros((n, nb)).at[k].set(1.0)
        return render_scene(morphology, unit, data["offset0"], data["anchor"], data["kernel"], spec.shape)

    templates = jax.vmap(one)(jnp.arange(n))  # (source, band, H, W)
    if spec.has_variance:
        var = data["variance"]
    else:
        var = data["sky"][:, None, None] + jnp.clip(data["image"], 0.0, None)
    w = jnp.where(data["valid"], 1.0 / var, 0.0)
    a = jnp.einsum("ibyx,jbyx,byx->bij", templates, templates, w)
    rhs = jnp.einsum("ibyx,byx,byx->bi", templates, w, data["image"])
    valid = data["source_valid"].astype(a.dtype)
    # padded sources: identity rows keep the system regular and give them zero flux
    a = a * valid[None, :, None] * valid[None, None, :] + eye[None] * (1 - valid)[None, :, None]
    a = a + 1e-6 * jnp.trace(a, axis1=1, axis2=2)[:, None, None] / n * eye[None]
    f = jnp.linalg.solve(a, (rhs * valid[None])[..., None])[..., 0]
    return f.T * valid[:, None]


def map_fit(
    bundle: PriorBundle,
    prep: PreparedBlend,
    init: dict[str, jnp.ndarray],
    prior: str,
    steps: int = 300,
    learning_rate: float = 0.05,
) -> tuple[dict[str, jnp.ndarray], jnp.ndarray]:
    """Maximum a posteriori parameters by Adam on the joint log density; returns (params, trace).

    All scene-model parameters are unconstrained reals, so the optimisation is
    plain gradient descent in ``(u, log_flux, offset)``. ``trace`` is the
    negative log density every step (for convergence checks).
    """
    from numpyro.infer.util import log_density

    to_latent, _ = _latent_maps(bundle, prior)
    decode = bundle.decode
    spec, data = prep.spec, prep.data

    def neg_log_post(params):
        return -log_density(scene_model, (spec, data, decode, to_latent), {}, params)[0]

    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.1))

    @jax.jit
    def run(params):
        def step(carry, _):
            p, o = carry
            loss, g = jax.value_and_grad(neg_log_post)(p)
            upd, o = tx.update(g, o, p)
            return (optax.apply_updates(p, upd), o), loss

        (p, _), trace = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return p, trace

    return run(init)
