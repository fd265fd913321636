"""Model bundles: ``models/<name>/`` with safetensors weights and ``card.json``.

A bundle holds the networks of a galaxy model v2 prior: the canonical VAE's
``decoder`` and ``encoder`` (:mod:`bayesblend.canonical`), optionally the
latent ``flow`` and the amortised ``pose_encoder``
(:mod:`bayesblend.prior.amortised`), each as ``<net>.safetensors`` (a flat map
from parameter path to float32 array: no code is ever unpickled), and
``card.json`` with the architecture (which names the ``canonical_frame``), the
training recipe, the held-out metrics and the SHA-256 of every weight file.
Loading checks every checksum and every parameter's shape against the
architecture, and refuses a missing, tampered or incompatible bundle (a galaxy
model v1 bundle, with no canonical frame, included) with a one-line
:class:`~bayesblend.errors.BundleError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from bayesblend.canonical import CanonicalFrame
from bayesblend.errors import BundleError
from bayesblend.io import atomic_path
from bayesblend.prior.networks import Decoder, Encoder, scale_input

if TYPE_CHECKING:  # the flow module is imported where it is used: types only here
    from bayesblend.prior.flow import RealNVP

BUNDLE_FORMAT = 1
DEFAULT_MODEL = "lsst-v2"
NETWORKS = ("decoder", "encoder", "pose_encoder", "flow")


def models_dir() -> Path:
    """Where shipped bundles live: ``$BAYESBLEND_MODELS`` or the repository's ``models/``."""
    env = os.environ.get("BAYESBLEND_MODELS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "models"


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten_params(params: Any) -> dict[str, np.ndarray]:
    """A Flax parameter tree as ``{"a/b/c": float32 array}``."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        flat[key] = np.asarray(leaf, dtype=np.float32)
    return flat


def unflatten_like(template: Any, flat: dict[str, np.ndarray], name: str) -> Any:
    """Fill ``template``'s structure from ``flat``, checking names and shapes."""
    want = flatten_params(template)
    missing = sorted(set(want) - set(flat))
    extra = sorted(set(flat) - set(want))
    if missing or extra:
        raise BundleError(
            f"{name}: weights do not match the architecture (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for k, v in want.items():
        if flat[k].shape != v.shape:
            raise BundleError(
                f"{name}: parameter {k} has shape {flat[k].shape}, architecture needs {v.shape}"
            )
    leaves, treedef = jax.tree_util.tree_flatten(template)
    keys = list(want)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[k]) for k in keys])


@dataclass
class PriorBundle:
    """A loaded prior: networks, their parameters and the card.

    Attributes
    ----------
    card : dict
        The bundle's ``card.json``.
    path : pathlib.Path
        Bundle directory.
    decoder : Decoder
        The canonical VAE's decoder: latent code -> canonical morphology.
    encoder : Encoder
        The canonical VAE's encoder: canonical morphology -> q(z | morphology).
    params : dict
        Parameters per network name (``decoder``, ``encoder``, and
        ``pose_encoder`` and ``flow`` when shipped).
    """

    card: dict
    path: Path
    decoder: Decoder
    encoder: Encoder
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def bands(self) -> tuple[str, ...]:
        """Bands the decoder models, in order."""
        return tuple(self.card["architecture"]["bands"])

    @property
    def stamp(self) -> int:
        """Side of a source's stamp on the survey grid (the pose encoder's input), pixels."""
        return int(self.card["architecture"]["stamp"])

    @property
    def canonical_frame(self) -> CanonicalFrame:
        """The canonical frame of the decoder's morphologies (grid side, half-light radius)."""
        return CanonicalFrame.from_dict(self.card["architecture"]["canonical_frame"])

    @property
    def latent_dim(self) -> int:
        """Dimension of the latent code."""
        return int(self.card["architecture"]["latent_dim"])

    @property
    def survey(self) -> str:
        """Survey the prior was trained for."""
        return str(self.card["architecture"]["survey"])

    @property
    def misfit(self) -> tuple[float, ...] | None:
        """The galaxy model's measured fractional misfit per band (the card's ``misfit.alpha``), or None.

        Measured on held-out galaxies by ``scripts/measure_misfit.py``
        (:func:`bayesblend.misfit.fit_misfit`); the scene model's default
        model-error term.
        """
        alpha = (self.card.get("misfit") or {}).get("alpha")
        if not alpha:
            return None
        missing = [b for b in self.bands if b not in alpha]
        if missing:
            raise BundleError(f"{self.path}: card.json misfit lacks band(s) {', '.join(missing)}")
        return tuple(float(alpha[b]) for b in self.bands)

    @property
    def size_band(self) -> str:
        """The band the half-light radius is defined in: the card's ``size_prior.band``.

        The band of the scene model's ``log_hlr`` and its size-magnitude
        prior, and of the catalogue's ``size``, ``resolution`` and S/N. Cards
        without it get r when the bundle models r, else its middle band.
        """
        size = self.card.get("size_prior") or {}
        bands = self.bands
        return str(size.get("band", "r" if "r" in bands else bands[len(bands) // 2]))

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        """Canonical morphologies ``(..., band, N, N)``, unit sum per band, of codes ``(..., latent)``."""
        return self.decoder.apply(self.params["decoder"], z)

    @property
    def flow(self) -> RealNVP | None:
        """The latent flow module (None when the bundle has no flow)."""
        spec = self.card["architecture"].get("flow")
        if not spec or "flow" not in self.params:
            return None
        return _flow_module(spec)

    @property
    def default_latent_prior(self) -> str:
        """``"flow"`` or ``"normal"``: the latent prior the card recommends (flow when shipped)."""
        default = self.card.get("default_latent_prior", "flow")
        return default if (default == "normal" or self.flow is not None) else "normal"

    def check_latent_prior(self, prior: str | None) -> str:
        """``prior`` (or the card's default when None), checked to be usable with this bundle."""
        prior = self.default_latent_prior if prior is None else prior
        if prior not in ("flow", "normal"):
            raise BundleError(f"latent prior must be 'flow' or 'normal', got {prior!r}")
        if prior == "flow" and self.flow is None:
            raise BundleError(f"{self.path}: bundle has no flow; use the 'normal' latent prior")
        return prior

    def latent_log_prob(self, z: jnp.ndarray, prior: str | None = None) -> jnp.ndarray:
        """Log prior density of latent codes under ``prior`` (``flow``/``normal``, default: the card's)."""
        prior = self.check_latent_prior(prior)
        if prior == "normal":
            return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * z.shape[-1] * jnp.log(2 * jnp.pi)
        from bayesblend.prior.flow import log_prob

        return log_prob(self.flow, self.params["flow"], z)

    def encode(self, canonical: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``(mean, log_sigma)`` of q(z | C) from the canonical VAE's encoder.

        Parameters
        ----------
        canonical : array ``(..., band, N, N)``
            Canonical morphologies ``C`` (noiseless, unit sum per band, on the
            :attr:`canonical_frame` grid); scaled as in training,
            ``asinh(C / (3 canonical_sigma))`` with the architecture's
            ``canonical_sigma``.

        Returns
        -------
        mean, log_sigma : jax.Array
            ``(..., latent)`` each.
        """
        sigma = self.card["architecture"].get("canonical_sigma")
        if sigma is None:
            raise BundleError(f"{self.path}: card.json has no canonical_sigma, the encoder's input scale")
        scale = jnp.full((len(self.bands),), float(sigma), dtype=jnp.float32)
        return self.encoder.apply(self.params["encoder"], scale_input(canonical, scale))


@dataclass(frozen=True, eq=False)
class Networks:
    """A bundle's networks as pure functions of their weights, for one latent prior.

    Inference passes the weights (:meth:`weights`) as arguments of its jitted
    functions instead of closing over them, so they are not baked into the
    compiled program as constants. Instances compare equal (and hash alike)
    when they wrap the same bundle object and latent prior, so they can key a
    compilation cache.

    Attributes
    ----------
    bundle : PriorBundle
    latent_prior : str
        ``"flow"``: latent codes are the flow's image of standard-normal base
        draws ``u``; ``"normal"``: ``z = u``.
    """

    bundle: PriorBundle
    latent_prior: str

    def __hash__(self) -> int:
        return hash((id(self.bundle), self.latent_prior))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Networks)
            and other.bundle is self.bundle
            and other.latent_prior == self.latent_prior
        )

    @property
    def encoder_name(self) -> str:
        """The amortised encoder's network name: the pose encoder."""
        return "pose_encoder"

    def weights(self) -> dict:
        """The weights these functions use (a pytree to pass to jitted code).

        The decoder's, the pose encoder's when the bundle has one, and the
        flow's under the flow latent prior.
        """
        names = ["decoder"] + [n for n in (self.encoder_name,) if n in self.bundle.params]
        names += ["flow"] if self.latent_prior == "flow" else []
        return {k: self.bundle.params[k] for k in names}

    def decode(self, w: dict, z: jnp.ndarray, forward_mode: bool = False) -> jnp.ndarray:
        """Canonical morphologies ``(..., band, N, N)`` (unit sum per band) of latent codes ``(..., latent)``.

        ``forward_mode=True`` uses the plain convolutions, which support
        ``jax.jvp`` (the default ones have fast reverse-mode gradients only).
        """
        dec = self.bundle.decoder.clone(loop_friendly=False) if forward_mode else self.bundle.decoder
        return dec.apply(w["decoder"], z)

    def to_latent(self, w: dict) -> Callable[[jnp.ndarray], jnp.ndarray] | None:
        """The map from base draws ``u`` to latent codes, or None for the identity."""
        if self.latent_prior == "normal":
            return None
        from bayesblend.prior.flow import RealNVP

        flow = self.bundle.flow
        return lambda u: flow.apply(w["flow"], u, method=RealNVP.sample_from_base)

    def latent(self, w: dict, u: jnp.ndarray) -> jnp.ndarray:
        """Latent codes of base draws ``u``."""
        f = self.to_latent(w)
        return u if f is None else f(u)

    def to_base(self, w: dict, z: jnp.ndarray) -> jnp.ndarray:
        """Base draws ``u`` of latent codes ``z`` (the inverse of :meth:`latent`)."""
        if self.latent_prior == "normal":
            return z
        from bayesblend.prior.flow import RealNVP

        return self.bundle.flow.apply(w["flow"], z, method=RealNVP.to_base)

    def encode(
        self, w: dict, stamps: jnp.ndarray, noise_sigma: jnp.ndarray
    ) -> tuple[jnp.ndarray, jnp.ndarray]:
        """``(mean, log_sigma)`` of q(theta | stamps) from the pose encoder, theta every source parameter.

        Parameters
        ----------
        w : dict
            The weights (:meth:`weights`).
        stamps : array ``(..., band, S, S)``
            Observed stamps centred on a source, electrons (``S``: :attr:`PriorBundle.stamp`).
        noise_sigma : array ``(..., band)``
            Sky noise per band, electrons per pixel (sets the input scaling).

        Returns
        -------
        mean, log_sigma : jax.Array
            ``(..., size)`` each, in the order of
            :class:`~bayesblend.prior.amortised.PoseLayout`: latent code, eta,
            log half-light radius (arcsec), log flux per band (electrons),
            offset from the stamp centre (pixels).

        Raises
        ------
        BundleError
            The bundle has no pose encoder.
        """
        name = self.encoder_name
        if name not in w:
            raise BundleError(f"{self.bundle.path}: bundle has no pose_encoder (amortised starts need one)")
        enc = pose_encoder_network(self.bundle.card["architecture"])
        return enc.apply(w[name], scale_input(stamps, noise_sigma))


def _architecture_networks(arch: dict, side: int) -> tuple[Encoder, Decoder]:
    """The canonical VAE's encoder and decoder (on a ``side`` x ``side`` canonical grid)."""
    enc = Encoder(latent_dim=int(arch["latent_dim"]), features=tuple(arch["encoder_features"]))
    dec = Decoder(bands=len(arch["bands"]), stamp=side, features=tuple(arch["decoder_features"]))
    return enc, dec


def pose_encoder_network(arch: dict) -> Encoder:
    """The amortised pose encoder of an architecture (output: :class:`PoseLayout` of its latent size)."""
    from bayesblend.prior.amortised import PoseLayout

    layout = PoseLayout(int(arch["latent_dim"]), len(arch["bands"]))
    return Encoder(latent_dim=layout.size, features=tuple(arch["pose_encoder_features"]))


def _flow_module(spec: dict):
    """The RealNVP an architecture's ``flow`` entry (``dim``, ``layers``, ``hidden``) describes."""
    from bayesblend.prior.flow import RealNVP

    return RealNVP(dim=int(spec["dim"]), layers=int(spec["layers"]), hidden=int(spec["hidden"]))


def flow_template(arch: dict):
    """A parameter tree of the architecture's flow (the structure weights are loaded into)."""
    spec = arch.get("flow")
    if not spec:
        raise BundleError("card.json lists flow weights but no flow architecture")
    return _flow_module(spec).init(jax.random.PRNGKey(0), jnp.zeros((1, int(spec["dim"]))))


def save_bundle(path: str | Path, card: dict, params: dict[str, Any]) -> Path:
    """Write a bundle: one safetensors file per network and ``card.json`` with checksums.

    Parameters
    ----------
    path : path
        Bundle directory (created).
    card : dict
        Must hold ``architecture`` (``survey``, ``bands``, ``stamp``,
        ``latent_dim``, ``encoder_features``, ``decoder_features``,
        ``canonical_frame``; ``pose_encoder_features`` with a pose encoder,
        ``flow`` with a flow); anything else (training recipe, metrics) is
        kept as given.
    params : dict
        Network name (one of :data:`NETWORKS`) -> parameter tree.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, tree in params.items():
        if name not in NETWORKS:
            raise BundleError(f"unknown network {name!r}; bundles hold {', '.join(NETWORKS)}")
        f = path / f"{name}.safetensors"
        with atomic_path(f) as tmp:
            save_file(flatten_params(tree), str(tmp))
        files[name] = {"file": f.name, "sha256": sha256(f)}
    card = dict(card)
    card["format"] = BUNDLE_FORMAT
    card["files"] = files
    with atomic_path(path / "card.json") as tmp:
        tmp.write_text(json.dumps(card, indent=1, sort_keys=False))
    return path


def update_card(path: str | Path, key: str, value: Any) -> dict:
    """Set ``card[key] = value`` in a bundle's ``card.json`` (atomically); returns the new card.

    For measurements made *with* a bundle (calibrations, tables derived from
    its networks); the weights and their checksums are left alone. A dotted
    ``key`` (``"shear_responsivity.map"``) sets one entry of a nested table,
    keeping its other entries.
    """
    card_file = Path(path) / "card.json"
    if not card_file.exists():
        raise BundleError(f"no model bundle at {path} (no card.json)")
    card = json.loads(card_file.read_text())
    *parents, last = key.split(".")
    node = card
    for k in parents:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise BundleError(f"{card_file}: {k!r} is not a table, cannot set {key!r}")
    node[last] = value
    with atomic_path(card_file) as tmp:
        tmp.write_text(json.dumps(card, indent=1, sort_keys=False))
    return card


def _canonical_side(arch: dict, path: Path) -> int:
    """Side of the architecture's canonical grid, pixels; refuses v1 bundles and malformed frames."""
    frame = arch.get("canonical_frame")
    if frame is None:
        raise BundleError(
            f"{path}: a galaxy model v1 bundle (no canonical_frame in its architecture), which this version "
            f"of bayesblend no longer supports; use {DEFAULT_MODEL} or another galaxy model v2 bundle"
        )
    try:
        return CanonicalFrame.from_dict(frame).size
    except (KeyError, TypeError, ValueError) as exc:  # BayesblendError is a ValueError
        raise BundleError(f"{path}: card.json has an invalid canonical_frame ({exc})") from None


def load_bundle(name_or_path: str | Path | None = None) -> PriorBundle:
    """Load a bundle by name (under :func:`models_dir`) or path, checking every checksum.

    Raises
    ------
    BundleError
        Missing bundle or file, checksum mismatch (tampered), unknown format,
        a galaxy model v1 bundle (no canonical frame), or weights that do not
        fit the card's architecture.
    """
    name = DEFAULT_MODEL if name_or_path is None else name_or_path
    path = Path(name)
    if not path.exists() and not path.is_absolute():
        path = models_dir() / str(name)
    card_file = path / "card.json"
    if not card_file.exists():
        raise BundleError(f"no model bundle at {path} (no card.json)")
    try:
        card = json.loads(card_file.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{card_file}: not valid JSON ({exc.msg})") from None
    if card.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"{path}: bundle format {card.get('format')!r}, this bayesblend reads {BUNDLE_FORMAT}"
        )
    arch = card.get("architecture")
    if not isinstance(arch, dict):
        raise BundleError(f"{path}: card.json has no architecture")
    side = _canonical_side(arch, path)
    enc, dec = _architecture_networks(arch, side)
    nb, stamp = len(arch["bands"]), int(arch["stamp"])
    templates = {
        "decoder": dec.init(jax.random.PRNGKey(0), jnp.zeros((int(arch["latent_dim"]),))),
        "encoder": enc.init(jax.random.PRNGKey(0), jnp.zeros((nb, side, side))),
    }
    if "pose_encoder_features" in arch:
        templates["pose_encoder"] = pose_encoder_network(arch).init(
            jax.random.PRNGKey(0), jnp.zeros((nb, stamp, stamp))
        )
    params = {}
    for net, meta in card.get("files", {}).items():
        f = path / meta["file"]
        if not f.exists():
            raise BundleError(f"{path}: weight file {meta['file']} is missing")
        if sha256(f) != meta["sha256"]:
            raise BundleError(f"{f}: SHA-256 does not match card.json (file changed or tampered with)")
        flat = load_file(str(f))
        if net == "flow":
            params[net] = unflatten_like(flow_template(arch), flat, str(f))
        elif net in templates:
            params[net] = unflatten_like(templates[net], flat, str(f))
        else:
            raise BundleError(f"{path}: unknown network {net!r} in card.json")
    if "decoder" not in params:
        raise BundleError(f"{path}: bundle has no decoder")
    return PriorBundle(card=card, path=path, decoder=dec, encoder=enc, params=params)
