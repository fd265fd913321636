"""Files: scene FITS and tables, written atomically.

Scene FITS (README "File formats"): primary header ``SURVEY``, ``BANDS``
(comma-separated, in order), ``PIXSCALE``; per band ``b`` the extensions
``IMAGE_b`` (WCS, ``MAGZERO``, ``FILTER = b``), optional ``VARIANCE_b``,
``MASK_b`` (non-zero = bad) and ``PSF_b``. Extension names are matched
case-insensitively. Defaults when reading: ``BANDS`` missing -> the ``FILTER``
keywords of the ``IMAGE_*`` extensions in file order; ``SURVEY`` missing ->
``lsst``; ``PIXSCALE`` missing -> from the WCS, else the survey's;
``MAGZERO`` missing -> the survey's nominal value for that band (an error if
the band is not in the survey). Every writer writes to a temporary file in the
destination directory and renames it, so a crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from bayesblend.errors import BayesblendError, SceneFormatError
from bayesblend.psf import PSFGrid
from bayesblend.scene import Scene
from bayesblend.survey import get_survey


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_scene(path: str | os.PathLike, scene: Scene) -> Path:
    """Write ``scene`` as a scene-FITS file (atomically). Returns the path."""
    primary = fits.PrimaryHDU()
    h = primary.header
    h["SURVEY"] = (scene.survey, "survey the scene was taken with")
    h["BANDS"] = (",".join(scene.bands), "band order of the scene")
    h["PIXSCALE"] = (float(scene.pixel_scale), "[arcsec/pixel]")
    h["BUNIT"] = "electron"
    for k, v in scene.meta.items():
        h[k[:8].upper()] = v
    hdus: list[fits.ImageHDU | fits.PrimaryHDU] = [primary]
    wcs_header = scene.wcs.to_header() if scene.wcs is not None else fits.Header()
    for i, b in enumerate(scene.bands):
        img = fits.ImageHDU(scene.image[i], name=f"IMAGE_{b}")
        img.header.update(wcs_header)
        img.header["FILTER"] = b
        img.header["MAGZERO"] = (float(scene.magzero[i]), "AB mag of 1 electron over the exposure")
        img.header["BUNIT"] = "electron"
        hdus.append(img)
        if scene.variance is not None:
            hdus.append(fits.ImageHDU(scene.variance[i], name=f"VARIANCE_{b}"))
        if scene.mask is not None:
            hdus.append(fits.ImageHDU(scene.mask[i].astype(np.uint8), name=f"MASK_{b}"))
        if scene.psf is not None:
            hdus.append(fits.ImageHDU(scene.psf[i], name=f"PSF_{b}"))
        if scene.psf_grid is not None:
            g = scene.psf_grid
            cols = [
                fits.Column("x", "D", unit="pix", array=g.x),
                fits.Column("y", "D", unit="pix", array=g.y),
                fits.Column(
                    "psf",
                    f"{g.images[i, 0].size}E",
                    dim=f"({g.images.shape[3]},{g.images.shape[2]})",
                    array=g.images[i],
                ),
            ]
            hdus.append(fits.BinTableHDU.from_columns(cols, name=f"PSFGRID_{b}"))
    with atomic_path(path) as tmp:
        fits.HDUList(hdus).writeto(tmp, overwrite=True)
    return Path(path)


#: A FITS file is a whole number of these blocks, bytes.
FITS_BLOCK = 2880


def open_fits(path: Path) -> fits.HDUList:
    """Every HDU of a FITS file, read into memory, or a one-line :class:`SceneFormatError`.

    A file cut short (an interrupted copy or write) is reported as truncated,
    with its size: its length is not a whole number of 2880-byte blocks, or
    astropy finds less data than its headers announce. Without this check a
    truncated scene surfaced as whatever its first missing piece broke (a
    missing band's extension, or a reshape error from deep inside astropy).
    Astropy's other warnings pass through.
    """
    size = path.stat().st_size
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=False)
            for hdu in hdul:
                _ = hdu.data  # read now: a truncated data unit fails here, not later
            failure = None
        except Exception as exc:  # astropy raises OSError, TypeError, ValueError...
            hdul, failure = None, exc
    said_truncated = [w for w in caught if "truncated" in str(w.message)]
    with open(path, "rb") as fh:
        looks_fits = fh.read(9) == b"SIMPLE  ="
    if looks_fits and (size % FITS_BLOCK or said_truncated):
        if hdul is not None:
            hdul.close()
        raise SceneFormatError(
            f"{path}: truncated FITS file ({size} bytes; a complete one is a multiple of {FITS_BLOCK} "
            "and holds every data unit its headers announce)"
        )
    if failure is not None:
        raise SceneFormatError(f"{path}: not a FITS file ({failure.__class__.__name__})")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return hdul


def read_scene(path: str | os.PathLike) -> Scene:
    """Read a scene-FITS file.

    Raises
    ------
    SceneFormatError
        With a one-line message naming what is wrong, for any file that is not
        a readable scene (not FITS, no ``IMAGE_*`` extension, shapes that
        disagree, unknown magnitude zeropoint...).
    """
    path = Path(path)
    if not path.exists():
        raise SceneFormatError(f"{path}: no such file")
    with open_fits(path) as hdul:
        ext = {h.name.upper(): h for h in hdul[1:]}
        primary = hdul[0].header
        if "BANDS" in primary:
            bands = tuple(b.strip() for b in str(primary["BANDS"]).split(",") if b.strip())
        else:
            bands = tuple(
                str(h.header.get("FILTER", h.name.upper()[6:]))
                for h in hdul[1:]
                if h.name.upper().startswith("IMAGE_")
            )
        if not bands:
            raise SceneFormatError(f"{path}: no IMAGE_<band> extension (not a bayesblend scene)")
        survey_name = str(primary.get("SURVEY", "lsst")).lower()
        survey = None
        with contextlib.suppress(BayesblendError):
            survey = get_survey(survey_name)

        def get(kind: str, b: str) -> fits.ImageHDU | None:
            return ext.get(f"{kind}_{b}".upper())

        images, variances, masks, psfs, grids, magzero = [], [], [], [], [], []
        wcs = None
        for b in bands:
            hdu = get("IMAGE", b)
            if hdu is None:
                raise SceneFormatError(f"{path}: band {b!r} listed in BANDS has no IMAGE_{b} extension")
            if hdu.data is None or np.ndim(hdu.data) != 2:
                raise SceneFormatError(f"{path}: IMAGE_{b} is not a 2-d image")
            images.append(np.asarray(hdu.data, dtype=np.float32))
            if "MAGZERO" in hdu.header:
                magzero.append(float(hdu.header["MAGZERO"]))
            elif survey is not None and b in survey.band_names:
                magzero.append(survey.band(b).magzero)
            else:
                raise SceneFormatError(
                    f"{path}: IMAGE_{b} has no MAGZERO and {survey_name!r} gives no default for it"
                )
            if wcs is None and "CTYPE1" in hdu.header:
                with contextlib.suppress(Exception):
                    wcs = WCS(hdu.header).celestial
            for kind, store in (("VARIANCE", variances), ("MASK", masks), ("PSF", psfs)):
                h = get(kind, b)
                store.append(None if h is None else np.asarray(h.data))
            grids.append(get("PSFGRID", b))
        shapes = {im.shape for im in images}
        if len(shapes) != 1:
            raise SceneFormatError(f"{path}: IMAGE extensions differ in shape: {sorted(shapes)}")

        def stack(kind: str, arrs: list, dtype: type) -> np.ndarray | None:
            present = [a is not None for a in arrs]
            if not any(present):
                return None
            if not all(present):
                missing = [b for b, p in zip(bands, present, strict=True) if not p]
                raise SceneFormatError(f"{path}: {kind} given for some bands but not {missing}")
            if kind != "PSF" and any(a.shape != images[0].shape for a in arrs):
                raise SceneFormatError(f"{path}: {kind} planes do not match the image shape")
            if kind == "PSF" and len({a.shape for a in arrs}) != 1:
                raise SceneFormatError(f"{path}: PSF images differ in shape between bands")
            return np.stack(arrs).astype(dtype)

        psf_grid = _psf_grid(path, bands, grids)
        variance = stack("VARIANCE", variances, np.float32)
        mask = stack("MASK", masks, np.int64)
        psf = stack("PSF", psfs, np.float32)
        if "PIXSCALE" in primary:
            pixel_scale = float(primary["PIXSCALE"])
        elif wcs is not None:
            pixel_scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3600.0)
        elif survey is not None:
            pixel_scale = survey.pixel_scale
        else:
            raise SceneFormatError(f"{path}: no PIXSCALE, WCS or known survey to give the pixel scale")
        reserved = {"SIMPLE", "BITPIX", "NAXIS", "EXTEND", "SURVEY", "BANDS", "PIXSCALE", "BUNIT"}
        meta = {k: primary[k] for k in primary if k and k not in reserved and k != "COMMENT"}
    image = np.stack(images)
    mask = None if mask is None else mask != 0
    usable = np.isfinite(image) & (True if mask is None else ~mask)
    empty = [i for i, b in enumerate(bands) if not usable[i].any()]
    if empty and len(empty) < len(bands):
        # a band with no usable pixel is masked whole, once here, naming the file: the others deblend
        names = ", ".join(repr(bands[i]) for i in empty)
        some = "bands" if len(empty) > 1 else "band"
        warnings.warn(f"{path}: {some} {names} without a finite, unmasked pixel: masked", stacklevel=2)
        mask = np.zeros(image.shape, bool) if mask is None else mask
        mask[empty] = True
        image[empty] = 0.0
    try:
        return Scene(
            image=image,
            bands=bands,
            magzero=np.array(magzero),
            survey=survey_name,
            pixel_scale=pixel_scale,
            psf=psf,
            variance=variance,
            mask=mask,
            wcs=wcs,
            meta=meta,
            psf_grid=psf_grid,
            name=path.name,
        )
    except BayesblendError as exc:
        raise SceneFormatError(f"{path}: {exc}") from None


def _psf_grid(path: Path, bands: Sequence[str], tables: list) -> PSFGrid | None:
    """The scene's PSF grid from its ``PSFGRID_<band>`` tables (None without any), or a one-line error."""
    if all(t is None for t in tables):
        return None
    missing = [b for b, t in zip(bands, tables, strict=True) if t is None]
    if missing:
        raise SceneFormatError(f"{path}: PSFGRID given for some bands but not {missing}")
    try:
        cols = [
            (np.asarray(t.data["x"], float), np.asarray(t.data["y"], float), np.asarray(t.data["psf"]))
            for t in tables
        ]
    except (KeyError, TypeError, AttributeError, IndexError, ValueError):
        raise SceneFormatError(
            f"{path}: a PSFGRID extension must be a table with columns x, y and psf"
        ) from None
    x, y, _ = cols[0]
    if any(c[0].shape != x.shape or not (np.array_equal(c[0], x) and np.array_equal(c[1], y)) for c in cols):
        raise SceneFormatError(f"{path}: the PSFGRID tables list different positions in different bands")
    if len({c[2].shape for c in cols}) != 1 or cols[0][2].ndim != 3:
        raise SceneFormatError(f"{path}: PSFGRID images differ in shape between bands, or are not 2-d")
    try:
        return PSFGrid(x, y, np.stack([c[2] for c in cols]))
    except BayesblendError as exc:
        raise SceneFormatError(f"{path}: {exc}") from None


def write_table(path: str | os.PathLike, table: Table) -> Path:
    """Write an astropy Table as FITS (or Parquet for a ``.parquet`` suffix), atomically."""
    path = Path(path)
    fmt = "parquet" if path.suffix == ".parquet" else "fits"
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            table.write(tmp, format="parquet", overwrite=True)
        else:
            table.write(tmp, format="fits", overwrite=True)
    return path


def read_table(path: str | os.PathLike) -> Table:
    """Read a FITS or Parquet table."""
    path = Path(path)
    if not path.exists():
        raise BayesblendError(f"{path}: no such file")
    fmt = "parquet" if path.suffix == ".parquet" else "fits"
    try:
        return Table.read(path, format=fmt)
    except Exception as exc:
        raise BayesblendError(f"{path}: cannot read as a {fmt} table ({exc.__class__.__name__})") from None


def rows_per_scene(table: Table, scene_paths: Sequence[str], label: str, kind: str = "source") -> list[Table]:
    """Split a table of positions (a source list or a truth table) into one table per scene file.

    Rows go to a scene by their ``scene`` column, the scene file's name
    without its directory and ``.fits`` (``blends_000001``; the file name
    with ``.fits`` is accepted too); else by a ``file`` column (the file
    name, as ``bayesblend simulate`` writes truth tables); else by an
    integer ``scene`` column, the scene's index on the command line (as the
    posterior catalogue writes it). A table with none of them serves a
    single scene only. Checked before any fitting.

    Parameters
    ----------
    table : astropy.table.Table
        Needs columns ``x`` and ``y`` (pixels, 0-based).
    scene_paths : sequence of str
        The scene files, in command-line order.
    label : str
        The table's name for messages (its path).
    kind : str
        What a row is (``"source"`` or ``"truth"``), for messages.

    Returns
    -------
    list of astropy.table.Table
        One table per scene, in the order of ``scene_paths`` (possibly empty:
        a warning names the scenes without rows, and another the rows that
        name no given scene).
    """
    names = {c.lower(): c for c in table.colnames}
    if not {"x", "y"} <= set(names):
        raise BayesblendError(f"{label}: a {kind} table needs columns x and y (pixels)")
    if "scene" not in names and "file" not in names:
        if len(scene_paths) == 1:
            return [table]
        raise BayesblendError(
            f"{label}: a {kind} table for several scenes needs a 'scene' column (the scene file's name "
            "without .fits) or a 'file' column (its file name)"
        )
    by_name = "scene" in names and np.asarray(table[names["scene"]]).dtype.kind in "US"
    column = names["scene"] if by_name or "file" not in names else names["file"]
    values = np.asarray(table[column])
    if values.dtype.kind in "iu":
        keys = [str(i) for i in range(len(scene_paths))]
        values = values.astype(str)
        how = f"by its '{column}' column, the scene's index"
    else:
        values = np.char.strip(values.astype(str))
        values = np.array([v[: -len(".fits")] if v.endswith(".fits") else v for v in values], dtype=str)
        keys = [Path(p).name.removesuffix(".fits") for p in scene_paths]
        how = f"by its '{column}' column"
    per_scene = [table[values == k] for k in keys]
    unmatched = [Path(p).name for p, t in zip(scene_paths, per_scene, strict=True) if len(t) == 0]
    if unmatched and len(table):
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        warnings.warn(f"{label}: no {kind} rows for {', '.join(unmatched[:5])}{more} ({how})", stacklevel=2)
    orphans = sorted(set(values.tolist()) - set(keys))
    if orphans:
        n = int(np.isin(values, orphans).sum())
        more = f" and {len(orphans) - 5} more" if len(orphans) > 5 else ""
        warnings.warn(
            f"{label}: {n} {kind} row(s) name scenes not given ({', '.join(orphans[:5])}{more}): left out",
            stacklevel=2,
        )
    return per_scene
