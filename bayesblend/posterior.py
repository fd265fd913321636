"""The Posterior: draws per source, derived quantities, diagnostics, ArviZ and the catalogue.

Every method of :mod:`bayesblend.infer` returns one. It holds, per real source
(padded sources are dropped), the draws ``(chain, draw, source, ...)`` of the
scene model's parameters (:data:`SAMPLED`: ``u``, the latent code in the
flow's base space; ``eta``, the ellipticity's unconstrained form; ``log_hlr``;
``log_flux`` per band; ``offset`` in pixels) and of the derived quantities:

- ``z``: latent code; ``flux`` (electrons) and ``mag`` (AB) per band;
- ``x``, ``y``: position of the profile centre in the scene, pixels, 0-based;
- ``e1``, ``e2``: the ellipticity parameter itself, shear-type
  (``e = tanh|eta| eta / |eta|``), intrinsic (before the PSF);
- ``size``: the half-light radius, arcsec (``exp(log_hlr)``).

Nothing is measured on decoded images: shapes and sizes are parameters, so
their draws are the posterior.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from astropy.table import Table

from bayesblend import catalog as cat
from bayesblend.ellipticity import to_ellipticity
from bayesblend.forward import paste_stamps
from bayesblend.io import atomic_path, write_table
from bayesblend.measure import blendedness, resolution
from bayesblend.model import scene_mean, source_stamps
from bayesblend.prior.bundle import Networks, PriorBundle
from bayesblend.scene import add_cutout
from bayesblend.settings import InferenceConfig
from bayesblend.survey import flux_to_mag, get_survey

#: Half-light radius of a Gaussian in units of its sigma, ``sqrt(2 ln 2)``.
HLR_PER_SIGMA = float(np.sqrt(2.0 * np.log(2.0)))

if TYPE_CHECKING:  # types only: ArviZ is imported on first use
    import arviz

#: Sampled parameters and derived quantities kept per source.
SAMPLED = ("u", "eta", "log_hlr", "log_flux", "offset")
DERIVED = ("z", "flux", "mag", "x", "y", "e1", "e2", "size")


class Posterior:
    """Posterior draws of every source of one or more scenes.

    Build it with :func:`bayesblend.deblend`. Attributes are numpy arrays with
    axes ``(chain, draw, source, ...)``.

    Attributes
    ----------
    method : str
    seed : int
    latent_prior : str
    bands : tuple of str
    shape_band : str
        The band of ``size`` and of the catalogue's ``resolution`` and S/N: the
        card's ``size_prior.band`` (:attr:`~bayesblend.prior.bundle.PriorBundle.size_band`; r for LSST).
    shape_psf_fwhm : float
        The survey's PSF FWHM in that band, arcsec (``resolution`` compares sizes with it).
    draws : dict of numpy.ndarray
        Sampled parameters (:data:`SAMPLED`) and derived quantities (:data:`DERIVED`).
    sources : astropy.table.Table
        One row per source: ``id``, ``blend_id``, ``scene``, ``x_det``, ``y_det``, ``split``.
    stats : dict of numpy.ndarray
        NUTS sample statistics ``(chain, draw, blend)``: ``diverging``,
        ``tree_depth``, ``n_steps``, ``acceptance_rate``, ``lp``, ``energy``.
    blends : list of PreparedBlend
        The fitted cutouts (for model images and figures).
    points : list of dict
        Per blend, the point estimate the method started its draws from (MAP
        for map, svi and nuts; the encoder mean for amortised).
    traces : list of dict
        Per blend, the optimisation traces (``map_trace``: -log p per step;
        ``elbo_trace``: SVI loss per step).
    blend_ids : numpy.ndarray
        Per blend, its id in the catalogue (``blend_id``) and in the ArviZ
        ``blend`` coordinate: ``0 .. n_blends - 1`` unless a run that writes
        one catalogue in parts numbers them (``sources["blend_id"]`` is the
        blend's index in this Posterior).
    """

    def __init__(
        self,
        *,
        method: str,
        seed: int,
        latent_prior: str,
        config: InferenceConfig,
        bundle: PriorBundle,
        scenes: Sequence,
        draws: dict[str, np.ndarray],
        sources: Table,
        stats: dict[str, np.ndarray],
        blends: list,
        points: list[dict],
        traces: list[dict],
        magzero: np.ndarray,
        blend_ids: np.ndarray | None = None,
    ) -> None:
        self.method = method
        self.seed = seed
        self.latent_prior = latent_prior
        self.config = config
        self.bundle = bundle
        self.scenes = list(scenes)
        self.bands = tuple(bundle.bands)
        self.shape_band = bundle.size_band
        self.shape_psf_fwhm = float(get_survey(bundle.survey).band(self.shape_band).psf_fwhm)
        self.draws = draws
        self.sources = sources
        self.stats = stats
        self.blends = blends
        self.points = points
        self.traces = traces
        self.magzero = magzero
        self.blend_ids = np.arange(len(blends)) if blend_ids is None else np.asarray(blend_ids, np.int64)
        if self.blend_ids.shape != (len(blends),):
            raise ValueError(f"{len(blends)} blends but {self.blend_ids.size} blend ids")
        self._diagnostics: dict[str, np.ndarray] | None = None
        self._catalog: Table | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_fits(
        cls,
        bundle: PriorBundle,
        latent_prior: str,
        method: str,
        seed: int,
        config: InferenceConfig,
        scenes: Sequence,
        blends: Sequence,
        members: Sequence[dict],
        results: Sequence[dict],
        blend_ids: Sequence[int] | None = None,
        source_ids: Sequence[np.ndarray] | None = None,
    ) -> Posterior:
        """Assemble the per-blend results of :func:`bayesblend.infer.fit_blends`.

        Parameters
        ----------
        bundle : PriorBundle
            The prior the blends were fitted with.
        latent_prior : str
            ``"flow"`` or ``"normal"``.
        method : str
            Inference method (``"amortised"``, ``"map"``, ``"svi"`` or ``"nuts"``).
        seed : int
            Seed of the fit.
        config : InferenceConfig
            Settings of the fit.
        scenes : sequence of Scene
            The deblended scenes.
        blends : sequence of PreparedBlend
            The fitted blends, in the order of ``results``.
        members : sequence of dict
            Per blend, ``{"scene": scene index, "split": bool}``.
        results : sequence of dict
            Per blend, the result of :func:`~bayesblend.infer.fit_blends`
            (``draws``, ``point``, traces and, for NUTS, ``stats``).
        blend_ids : sequence of int, optional
            Catalogue id of each blend (default ``0 .. len(blends) - 1``).
        source_ids : sequence of numpy.ndarray, optional
            Catalogue ids of each blend's real sources (default: numbered in
            order from 0).

        Returns
        -------
        Posterior
            Draws per real source (positions in scene pixels, fluxes in
            electrons, sizes in arcsec).
        """
        nb = len(bundle.bands)
        chains = config.num_chains if method == "nuts" else 1
        ndraw = config.num_draws
        parts: dict[str, list[np.ndarray]] = {k: [] for k in (*SAMPLED, "x", "y")}
        rows: dict[str, list] = {
            k: [] for k in ("blend_id", "scene", "x_det", "y_det", "split", "masked", "edge")
        }
        magzero = []
        c = (bundle.stamp - 1) / 2.0
        for i, (b, m, r) in enumerate(zip(blends, members, results, strict=True)):
            k = b.n_real
            for name in SAMPLED:
                parts[name].append(r["draws"][name][:, :, :k])
            anchor = np.asarray(b.data["anchor"])[:k]
            off = r["draws"]["offset"][:, :, :k]
            parts["x"].append(anchor[:, 0] + c + off[..., 0] + b.origin[0])
            parts["y"].append(anchor[:, 1] + c + off[..., 1] + b.origin[1])
            rows["blend_id"] += [i] * k
            rows["scene"] += [m["scene"]] * k
            rows["x_det"] += list(b.x + b.origin[0])
            rows["y_det"] += list(b.y + b.origin[1])
            rows["split"] += [m["split"]] * k
            rows["masked"] += list(cat.masked_centre(np.asarray(b.data["valid"]), b.x, b.y))
            rows["edge"] += list(
                cat.near_edge(b.x + b.origin[0], b.y + b.origin[1], scenes[m["scene"]].shape)
            )
            magzero += [b.magzero] * k
        if parts["u"]:
            draws = {k: np.concatenate(v, axis=2) for k, v in parts.items()}
        else:
            ld = bundle.latent_dim
            shapes = {
                "u": (ld,),
                "eta": (2,),
                "log_hlr": (),
                "log_flux": (nb,),
                "offset": (2,),
                "x": (),
                "y": (),
            }
            draws = {k: np.zeros((chains, ndraw, 0) + s, np.float32) for k, s in shapes.items()}
        draws["flux"] = np.exp(draws["log_flux"])
        mz = np.asarray(magzero, float).reshape(-1, nb)
        draws["mag"] = flux_to_mag(draws["flux"], mz)
        nets = Networks(bundle, latent_prior)
        e = np.asarray(to_ellipticity(jnp.asarray(draws["eta"])))
        z = (
            np.asarray(_latent(nets, nets.weights(), jnp.asarray(draws["u"])))
            if draws["u"].size
            else draws["u"]
        )
        draws.update(z=z, e1=e[..., 0], e2=e[..., 1], size=np.exp(draws["log_hlr"]))
        n_src = len(rows["blend_id"])
        ids = np.arange(n_src) if source_ids is None or not n_src else np.concatenate(source_ids)
        if len(ids) != n_src:
            raise ValueError(f"{n_src} sources but {len(ids)} source ids")
        sources = Table({"id": np.asarray(ids, np.int64)})
        for k_, v in rows.items():
            sources[k_] = np.asarray(v, dtype=float if k_ in ("x_det", "y_det") else None)
        stats: dict[str, np.ndarray] = {}
        if method == "nuts" and results:
            for name in ("diverging", "tree_depth", "n_steps", "acceptance_rate", "lp", "energy"):
                stats[name] = np.stack([r["stats"][name] for r in results], axis=-1)
        points = [r["point"] for r in results]
        traces = [{k: r[k] for k in ("map_trace", "elbo_trace") if k in r} for r in results]
        return cls(
            method=method,
            seed=seed,
            latent_prior=latent_prior,
            config=config,
            bundle=bundle,
            scenes=scenes,
            draws=draws,
            sources=sources,
            stats=stats,
            blends=list(blends),
            points=points,
            traces=traces,
            magzero=mz,
            blend_ids=None if blend_ids is None else np.asarray(blend_ids, np.int64),
        )

    # ------------------------------------------------------------------ basic views
    @property
    def n_sources(self) -> int:
        """Number of (real) sources."""
        return len(self.sources)

    @property
    def n_blends(self) -> int:
        """Number of fitted blends."""
        return len(self.blends)

    def __repr__(self) -> str:
        c, d = self.draws["u"].shape[:2]
        return (
            f"Posterior(method={self.method!r}, sources={self.n_sources}, blends={self.n_blends}, "
            f"chains={c}, draws={d}, bands={','.join(self.bands)})"
        )

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, np.ndarray]:
        """Per source: ``r_hat_max``, ``ess_bulk_min`` (NUTS; NaN otherwise) and ``n_divergent``.

        Computed with ArviZ over what the catalogue reports of a galaxy:
        ``log_flux`` (every band), ``e1``, ``e2`` and ``size`` (the issue's
        convergence criterion). The latent code ``u`` is a nuisance: it
        mixes more slowly than these (on a bright galaxy its bulk ESS was a
        tenth of theirs; RESULTS "NUTS with galaxy model v2"), and what it
        changes of the galaxy shows in them. Positions are left out too:
        their spread (hundredths of a pixel) is far below any use of them.
        """
        if self._diagnostics is not None:
            return self._diagnostics
        n = self.n_sources
        out = {
            "r_hat_max": np.full(n, np.nan),
            "ess_bulk_min": np.full(n, np.nan),
            "n_divergent": np.zeros(n, int),
        }
        if self.method == "nuts" and n:
            from bayesblend.inference_data import arviz as _arviz

            az = _arviz()
            ds = self.to_inference_data().posterior[["log_flux", "e1", "e2", "size"]]
            rhat = az.rhat(ds)
            ess = az.ess(ds, method="bulk")

            def reduce(d, fn):
                per = [fn(d[v].values.reshape(n, -1), axis=1) for v in d.data_vars]
                return fn(np.stack(per, axis=1), axis=1)

            out["r_hat_max"] = reduce(rhat, np.nanmax)
            out["ess_bulk_min"] = reduce(ess, np.nanmin)
            div = self.stats["diverging"].sum(axis=(0, 1))  # per blend
            out["n_divergent"] = div[np.asarray(self.sources["blend_id"])].astype(int)
        self._diagnostics = out
        return out

    # ------------------------------------------------------------------ ArviZ
    def to_inference_data(self, observed: bool = True) -> arviz.InferenceData:
        """The draws as ``arviz.InferenceData`` (:func:`bayesblend.inference_data.to_inference_data`)."""
        from bayesblend.inference_data import to_inference_data

        return to_inference_data(self, observed)

    def to_netcdf(self, path: str | Path) -> Path:
        """Write the InferenceData as netCDF (atomically)."""
        idata = self.to_inference_data()
        with atomic_path(path) as tmp:
            idata.to_netcdf(str(tmp))
        return Path(path)

    # ------------------------------------------------------------------ catalogue
    def meta(self) -> dict:
        """Catalogue header keywords: the bundle, method, seed, draws and how shapes were made."""
        c, d = self.draws["u"].shape[:2]
        return {
            "BUNDLE": str(self.bundle.card.get("name", self.bundle.path)),
            "METHOD": self.method,
            "SEED": int(self.seed),
            "LATPRIOR": self.latent_prior,
            "NCHAIN": int(c),
            "NDRAW": int(d),
            "SHAPEBND": self.shape_band,
            "SHAPEPSF": self.shape_psf_fwhm,
        } | {cat.SCENE_HEADER[k]: v for k, v in self.config.scene_model_settings().items()}

    def catalog(self) -> Table:
        """The posterior catalogue (columns of :func:`bayesblend.catalog.columns`), a fresh copy.

        Summarised once; figures and writers that ask again get a copy of it.
        """
        if self._catalog is None:
            self._catalog = self._summarise()
        return self._catalog.copy()

    def _summarise(self) -> Table:
        if self.n_sources == 0:
            return cat.empty(self.bands, self.meta())
        d = self.draws
        axes = (0, 1)

        def flat(a):  # (chain, draw, source, ...) -> (samples, source, ...)
            return a.reshape((-1,) + a.shape[2:])

        v: dict[str, np.ndarray] = {
            "id": np.asarray(self.sources["id"]),
            "blend_id": self.blend_ids[np.asarray(self.sources["blend_id"], int)],
            "scene": np.asarray(self.sources["scene"]),
            "file": np.array([self.scenes[i].name for i in self.sources["scene"]], dtype=str),
            "x": np.median(d["x"], axis=axes),
            "y": np.median(d["y"], axis=axes),
            "x_det": np.asarray(self.sources["x_det"]),
            "y_det": np.asarray(self.sources["y_det"]),
        }
        ra = np.full(self.n_sources, np.nan)
        dec = np.full(self.n_sources, np.nan)
        for si, sc in enumerate(self.scenes):
            sel = v["scene"] == si
            if sc.wcs is not None and sel.any():
                sky = sc.wcs.pixel_to_world(v["x"][sel], v["y"][sel])
                ra[sel], dec[sel] = sky.ra.deg, sky.dec.deg
        v["ra"], v["dec"] = ra, dec
        flux, mag = flat(d["flux"]), flat(d["mag"])
        for j, b in enumerate(self.bands):
            p16, p50, p84 = np.percentile(flux[:, :, j], [16, 50, 84], axis=0)
            v[f"flux_{b}"], v[f"flux_{b}_p16"], v[f"flux_{b}_p84"] = p50, p16, p84
            v[f"flux_{b}_std"] = flux[:, :, j].std(axis=0)
            v[f"mag_{b}"] = np.median(mag[:, :, j], axis=0)
            v[f"mag_{b}_std"] = mag[:, :, j].std(axis=0)
        e1, e2, size = flat(d["e1"]), flat(d["e2"]), flat(d["size"])
        v["e1"], v["e2"] = np.median(e1, axis=0), np.median(e2, axis=0)
        v["e1_std"], v["e2_std"] = e1.std(axis=0), e2.std(axis=0)
        v["e1_e2_cov"] = np.mean((e1 - e1.mean(0)) * (e2 - e2.mean(0)), axis=0)
        v["size"], v["size_std"] = np.median(size, axis=0), size.std(axis=0)
        # size is a half-light radius: R2 takes the sigma of the Gaussian with the same half-light radius
        v["resolution"] = np.asarray(resolution(v["size"] / HLR_PER_SIGMA, self.shape_psf_fwhm))
        v["blendedness"] = self.blendedness()
        diag = self.diagnostics()
        v.update(diag)
        v["flags"] = cat.flag_sources(v, self.sources, self.shape_band)
        return cat.make_table(v, self.bands, self.meta())

    def write_catalog(self, path: str | Path) -> Path:
        """Write the catalogue as FITS, or Parquet for a ``.parquet`` path (atomically)."""
        return write_table(path, self.catalog())

    # ------------------------------------------------------------------ images
    def model_image(self, blend_id: int, draw: tuple[int, int] | None = None) -> np.ndarray:
        """Model of blend ``blend_id``'s cutout ``(band, y, x)``, electrons.

        ``draw=(chain, draw)`` renders that posterior draw; None renders the
        point estimate (MAP, or the amortised start).
        """
        b = self.blends[blend_id]
        if draw is None:
            params = self.points[blend_id]
        else:
            sel = self.sources["blend_id"] == blend_id
            idx = np.flatnonzero(sel)
            params = {}
            for k in SAMPLED:
                real = self.draws[k][draw[0], draw[1], idx]
                pad = np.asarray(self.points[blend_id][k])[len(idx) :]
                params[k] = np.concatenate([real, pad])
        return render_blend(Networks(self.bundle, self.latent_prior), b, params)

    def scene_model(self, scene: int) -> np.ndarray:
        """Model of scene ``scene`` at the point estimates, ``(band, y, x)`` in the bundle's bands, electrons.

        The sum of its blends' models, each pasted at its cutout's origin.
        """
        ny, nx = self.scenes[scene].shape
        out = np.zeros((len(self.bands), ny, nx), np.float32)
        scene_of = np.asarray(self.sources["scene"])
        blend_of = np.asarray(self.sources["blend_id"])
        for i in np.unique(blend_of[scene_of == scene]):
            add_cutout(out, self.model_image(int(i)), self.blends[i].origin)
        return out

    def source_images(self, blend_id: int, nets: Networks | None = None) -> np.ndarray:
        """Each source of a blend rendered alone at the point estimate, ``(source, band, y, x)``."""
        b = self.blends[blend_id]
        nets = nets or Networks(self.bundle, self.latent_prior)
        return np.asarray(_source_images(nets, nets.weights(), b.spec, self.points[blend_id], b.data))[
            : b.n_real
        ]

    def blendedness(self) -> np.ndarray:
        """Each source's total blendedness in the shape band at the point estimate, ``(source,)``.

        :func:`bayesblend.measure.blendedness` of the fitted model: the share of
        a source's pixels' light that belongs to its neighbours. Near 1, its
        flux and shape are those the fit could leave to it beside a brighter
        neighbour, and are unreliable (flag ``BLENDED``).
        """
        out = np.zeros(self.n_sources)
        nets = Networks(self.bundle, self.latent_prior)
        for i in range(self.n_blends):
            images = self.source_images(i, nets)[:, self.bands.index(self.shape_band)]
            out[np.flatnonzero(self.sources["blend_id"] == i)] = np.asarray(blendedness(jnp.asarray(images)))
        return out


@partial(jax.jit, static_argnums=0)
def _latent(nets: Networks, w: dict, u: jnp.ndarray) -> jnp.ndarray:
    """Latent codes of base draws ``u`` ``(..., latent)``."""
    flat = u.reshape(-1, u.shape[-1])
    return nets.latent(w, flat).reshape(u.shape)


def _source_stamps(nets: Networks, w: dict, spec, params: dict, data: dict) -> jnp.ndarray:
    """Each (padded) source's stamp ``(source, band, S, S)`` in the blend's model (zero if padded)."""
    return source_stamps(spec, data, partial(nets.decode, w), nets.to_latent(w), params)


def render_blend(nets: Networks, blend, params: dict) -> np.ndarray:
    """A prepared blend's model image ``(band, H, W)`` (electrons) at the parameters ``params``."""
    return np.asarray(_render(nets, nets.weights(), blend.spec, params, blend.data))


@partial(jax.jit, static_argnums=(0, 2))
def _render(nets: Networks, w: dict, spec, params: dict, data: dict) -> jnp.ndarray:
    """The blend's expected image ``(band, H, W)``: :func:`bayesblend.model.scene_mean` itself."""
    return scene_mean(spec, data, partial(nets.decode, w), nets.to_latent(w), params)


@partial(jax.jit, static_argnums=(0, 2))
def _source_images(nets: Networks, w: dict, spec, params: dict, data: dict) -> jnp.ndarray:
    """Every (padded) source rendered alone, ``(source, band, y, x)``; padded sources are zero."""
    stamps = _source_stamps(nets, w, spec, params, data)
    return jax.vmap(lambda st, a: paste_stamps(st[None], a[None], spec.shape))(stamps, data["anchor"])
