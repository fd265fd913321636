"""Fitting prepared blends in batches: here, or on a Dask cluster's workers.

Blends that share a spec (padded source count, cutout shape, settings) are
stacked into batches of up to ``batch_size`` and fitted under ``vmap`` by one
compiled program (:func:`bayesblend.methods.batch_function`); a short batch
is padded by repetition to the next power of two, so only a few batch
widths are ever compiled. :func:`iter_fits` yields each batch as it
finishes (what a run that writes its output batch by batch needs);
:func:`fit_blends` collects them; :func:`iter_posteriors` turns each
finished batch of planned blends into a Posterior numbered as the whole run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from bayesblend.blends import PreparedBlend
from bayesblend.errors import BayesblendError
from bayesblend.methods import batch_function
from bayesblend.posterior import Posterior
from bayesblend.prior.bundle import Networks, PriorBundle
from bayesblend.settings import InferenceConfig, check_method

if TYPE_CHECKING:
    from distributed import Client

    from bayesblend.plan import PlannedBlends


def plan_batches(specs: Sequence[Hashable], batch_size: int) -> list[list[int]]:
    """Blends in batches of up to ``batch_size`` that share a spec (one compiled program each).

    ``specs`` holds each blend's spec (or anything that must be the same
    across a batch, such as ``(spec, has an earlier MAP)``). Returns the
    blends' indices per batch, grouped by spec in order of first appearance:
    the same blends always give the same batches.
    """
    by_spec: dict[Hashable, list[int]] = {}
    for i, spec in enumerate(specs):
        by_spec.setdefault(spec, []).append(i)
    return [idx[j : j + batch_size] for idx in by_spec.values() for j in range(0, len(idx), batch_size)]


def _stacked(
    blends: Sequence[PreparedBlend], idx: list[int], batch_size: int, fitted: Mapping[int, dict] | None
) -> tuple[list[int], list[PreparedBlend], dict, dict | None]:
    """A batch's blends padded by repetition to the next power of two: indices, the blends (each read
    once), their arrays stacked (numpy), and their earlier MAP stacked (None: none given)."""
    width = min(1 << (len(idx) - 1).bit_length(), batch_size)  # 1, 2, 4...: few compiled widths
    full = idx + [idx[-1]] * (width - len(idx))
    items = [blends[i] for i in idx]
    padded = items + [items[-1]] * (width - len(idx))
    data = {k: np.stack([np.asarray(b.data[k]) for b in padded]) for k in items[0].data}
    known = [fitted is not None and i in fitted for i in idx]
    if not any(known):
        return full, items, data, None
    if not all(known):  # a bug, not bad input: batches are planned with the earlier MAP in their key
        raise RuntimeError(f"a batch mixes blends with and without an earlier MAP: {idx}")
    maps = jax.tree_util.tree_map(lambda *a: np.stack(a), *[fitted[i] for i in full])  # type: ignore[index]
    return full, items, data, maps


def iter_fits(
    bundle: PriorBundle,
    blends: Sequence[PreparedBlend],
    method: str,
    latent_prior: str | None = None,
    seed: int = 0,
    config: InferenceConfig | None = None,
    key_index: Sequence[int] | None = None,
    batches: Sequence[list[int]] | None = None,
    client: Client | None = None,
    fitted: Mapping[int, dict] | None = None,
) -> Iterator[tuple[list[int], list[dict], list[PreparedBlend]]]:
    """Fit blends batch by batch; yield ``(blend indices, results, blends)`` as each batch finishes.

    ``blends`` may prepare each blend as it is read (:class:`bayesblend.plan.PlannedBlends`):
    each is read once per batch, and handed back with its results.

    ``batches`` (default :func:`plan_batches`) lists the blends of each
    batch, which must share a spec. Without a ``client`` the batches run here,
    in order; with a Dask client (:mod:`bayesblend.cluster`) they are sent to
    its workers and come back in the order they finish. Blend ``i`` draws
    from the key ``fold_in(PRNGKey(seed), key_index[i])`` (default ``i``),
    so results depend neither on the batching nor on where a batch ran.

    ``fitted`` maps blends to their MAP from an earlier fit with the same
    data and settings (``point`` and ``map_trace``, as in the results): the
    methods that start from MAP take it instead of optimising again
    (:func:`bayesblend.methods.blend_fit`). A batch's blends must all have
    one or all not.
    """
    check_method(method)
    cfg = config or InferenceConfig()
    latent_prior = bundle.check_latent_prior(latent_prior)
    base = jax.random.PRNGKey(seed)
    key_index = list(range(len(blends))) if key_index is None else [int(k) for k in key_index]
    if len(key_index) != len(blends):
        raise BayesblendError(f"{len(blends)} blends but {len(key_index)} key indices")
    if batches is None:
        batches = plan_batches([b.spec for b in blends], cfg.batch_size)
    batches = [list(b) for b in batches]

    def keys(full: list[int]) -> np.ndarray:
        return np.asarray(jnp.stack([jax.random.fold_in(base, key_index[i]) for i in full]))

    def unstack(idx: list[int], out: dict) -> list[dict]:
        return [jax.tree_util.tree_map(lambda a, j=j: np.asarray(a[j]), out) for j in range(len(idx))]

    if client is None:
        nets = Networks(bundle, latent_prior)
        weights = nets.weights()
        for idx in batches:
            full, items, data, maps = _stacked(blends, idx, cfg.batch_size, fitted)
            fit = batch_function(nets, method, items[0].spec, cfg, maps is not None)
            args = (weights, {k: jnp.asarray(v) for k, v in data.items()}, keys(full))
            out = jax.device_get(fit(*args) if maps is None else fit(*args, maps))
            yield idx, unstack(idx, out), items
        return
    from distributed import as_completed

    from bayesblend.cluster import bundle_reference, fit_batch

    ref = bundle_reference(bundle)
    batch_of = {}

    def submit(idx: list[int]):
        full, items, data, maps = _stacked(blends, idx, cfg.batch_size, fitted)
        spec = items[0].spec
        fut = client.submit(
            fit_batch, ref, latent_prior, method, spec, cfg, data, keys(full), maps, pure=False
        )
        batch_of[fut.key] = (idx, items)
        return fut

    # a few batches per worker in flight: the data of the rest stay here, not on the scheduler
    window = max(4 * len(client.scheduler_info().get("workers", {})), 8)
    pending = iter(batches)
    running = as_completed([submit(idx) for idx in islice(pending, window)])
    for fut in running:
        idx, items = batch_of.pop(fut.key)
        try:
            out = fut.result()
        except BayesblendError:
            raise
        except Exception as exc:  # a worker died, the cluster went away...: one line, not Dask's traceback
            raise BayesblendError(
                f"the Dask cluster failed on a batch of {len(idx)} blends ({type(exc).__name__}: {exc})"
            ) from None
        nxt = next(pending, None)
        if nxt is not None:
            running.add(submit(nxt))
        yield idx, unstack(idx, out), items


def fit_blends(
    bundle: PriorBundle,
    blends: Sequence[PreparedBlend],
    method: str = "nuts",
    latent_prior: str | None = None,
    seed: int = 0,
    config: InferenceConfig | None = None,
    progress: bool = False,
    key_index: Sequence[int] | None = None,
    client: Client | None = None,
) -> list[dict]:
    """Fit prepared blends with ``method``; one result dict per blend (numpy arrays).

    Blends are grouped by spec and run in ``vmap`` batches of up to
    ``config.batch_size`` (:func:`iter_fits`, here or on a Dask ``client``'s
    workers); a short batch is padded by repetition to the next power of
    two, so only a few batch widths are ever compiled. Blend ``i`` draws from
    the key ``fold_in(PRNGKey(seed), key_index[i])`` (default ``i``), so
    results do not depend on the batching; blends given the same index draw
    the same random numbers.
    """
    results: list[dict | None] = [None] * len(blends)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blends), desc=f"deblend ({method})", unit="blend")
    for idx, res, _ in iter_fits(
        bundle, blends, method, latent_prior, seed, config, key_index, client=client
    ):
        for i, r in zip(idx, res, strict=True):
            results[i] = r
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]


def as_fitted(blends: Sequence[PreparedBlend], results: Sequence[dict]) -> list[PreparedBlend]:
    """The blends as fitted: the flux prior's centre the fit used (the amortised one by default).

    Pops ``log_flux0`` from each result.
    """
    return [
        dataclasses.replace(b, data=dict(b.data, log_flux0=jnp.asarray(r.pop("log_flux0"))))
        for b, r in zip(blends, results, strict=True)
    ]


@dataclass
class BatchFit:
    """One fitted batch of :func:`iter_posteriors`.

    Attributes
    ----------
    index : list of int
        The blends' indices among the planned blends (their ``blend_id``).
    posterior : Posterior
        The batch's posterior, with the run's blend and source ids.
    blends : list of PreparedBlend
        The blends as fitted.
    results : list of dict
        The fit's per-blend results.
    """

    index: list[int]
    posterior: Posterior
    blends: list[PreparedBlend]
    results: list[dict]


def iter_posteriors(
    bundle: PriorBundle,
    planned: PlannedBlends,
    method: str,
    latent_prior: str | None,
    seed: int,
    config: InferenceConfig,
    batches: Sequence[list[int]] | None = None,
    key_index: Sequence[int] | None = None,
    client: Client | None = None,
    progress: bool = False,
    desc: str | None = None,
    fitted: Mapping[int, dict] | None = None,
) -> Iterator[BatchFit]:
    """Fit planned blends batch by batch; each finished batch as a :class:`BatchFit`.

    Blends are cut out when their batch is sent (:class:`~bayesblend.plan.PlannedBlends`)
    and each batch's Posterior numbers blends and sources as the whole plan
    does (``blend_id``: the blend's index; ``id``: sources counted in blend
    order), so batches written apart form one catalogue. ``batches`` (default
    all, :func:`~bayesblend.fitting.plan_batches`) may leave some out;
    ``fitted`` is as for :func:`iter_fits`.
    """
    latent_prior = bundle.check_latent_prior(latent_prior)
    first_id = np.cumsum([0] + [len(p.members) for p in planned.plans])
    if batches is None:
        batches = plan_batches(planned.specs, config.batch_size)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done = len(planned) - sum(len(b) for b in batches)
        bar = tqdm(total=len(planned), initial=done, desc=desc or f"deblend ({method})", unit="blend")
    fits = iter_fits(bundle, planned, method, latent_prior, seed, config, key_index, batches, client, fitted)
    for idx, results, blends in fits:
        fitted = as_fitted(blends, results)
        post = Posterior.from_fits(
            bundle,
            latent_prior,
            method,
            seed,
            config,
            planned.scenes,
            fitted,
            [planned.plans[i].membership for i in idx],
            results,
            blend_ids=idx,
            source_ids=[np.arange(first_id[i], first_id[i + 1]) for i in idx],
        )
        yield BatchFit(list(idx), post, fitted, results)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()


def common_keys(scene_of: Sequence[int]) -> list[int]:
    """Common random numbers across scenes: each blend's key index is its rank among its scene's blends.

    ``scene_of`` holds each blend's scene index, in blend order.
    """
    seen: dict[int, int] = {}
    keys = []
    for si in scene_of:
        keys.append(seen.get(si, 0))
        seen[si] = keys[-1] + 1
    return keys
