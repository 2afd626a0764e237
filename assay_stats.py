"""Assay statistics: counting error, replicates, calibration curves, detection limits.

Pure functions and small data classes, arrays in and numbers out; no files, no logging, no
figures (``quantify_assay.py`` reads the inputs and writes the results and the report).

Method
------
Uncertainty of one image
    ``sd_count = sqrt(max(N, 1) + (s N)^2)``: Poisson sampling (a count of 0 gets the
    variance of 1, so no image has infinite weight) and the model's relative counting spread
    ``s`` (:func:`count_sd`). ``s`` and the relative bias come from validation tiles,
    ``(n_pred - n_true) / n_true`` (``n_true = 0`` left out), in up to 4 density bins of
    equal tile numbers (>= 5 tiles a bin); an image takes the bin nearest on a log density
    scale (outside the validation range the end bin, flagged). Errors of disjoint tile-sized
    regions are taken as independent: an image ``m`` tiles large has spread ``s / sqrt(m)``.
    The bias is reported, not subtracted (calibrators and unknowns share it)
    (:func:`fit_count_error`, :class:`CountErrorModel`).
Replicates and samples
    A replicate is one replicate id at one concentration (its images pooled: density = sum
    of beads / sum of area), else one image (:func:`build_replicates`). A sample is all
    replicates at one concentration: mean density, SD, CV beside the Poisson CV and the
    Poisson-plus-model CV, and Pearson's chi-square dispersion test on ``k - 1`` degrees of
    freedom, over-dispersed when p < 0.05 (:func:`sample_table`, :func:`dispersion_test`).
Calibration
    Weighted least squares of density on concentration, weights ``1 / sd^2``, re-weighted
    once from the fitted values (removes the downward bias of weights from observed counts);
    covariances scaled by the reduced chi-square, CIs with Student's t
    (:func:`fit_calibration`). Models: ``linear`` (blanks included), ``loglog`` (straight
    line on log10 axes; blanks and zero counts left out; log-scale SD by the delta method)
    and ``4pl`` ``y = d + (a - d) / (1 + (x / c)^b)`` (``curve_fit`` from up to 9 starts;
    needs >= 4 distinct concentrations and >= 5 replicates). R² on each fit's own scale;
    the models are compared by ``AIC = n ln(WRSS / n) + 2 (k + 1)`` on the non-blank
    replicates in density units (:func:`choose_fit`).
Detection limits
    CLSI EP17-A2 (parametric): ``LoB = mean_blank + 1.645 SD_blank``,
    ``LoD = LoB + 1.645 SD_low`` (density units; ``SD_low`` from the lowest non-blank
    concentration with >= 2 replicates; EP17's small-sample factor not applied), turned into
    concentrations through the inverse of the chosen curve (:func:`ep17_limits`). ICH Q2(R1)
    §6.3 / §7.3: ``LoD = 3.3 sigma / S``, ``LoQ = 10 sigma / S`` from an ordinary
    least-squares line through the blanks and the lowest concentrations
    (:func:`ich_limits`). The reported LoD is EP17's when defined, else ICH's
    (:func:`detection_limits`); 95 % CIs by a percentile bootstrap over replicates within
    each concentration, everything refitted (:func:`bootstrap_limits`).

Example
-------
>>> r = ep17_limits([2, 4, 6], [10, 12, 14])
>>> round(r["lob"], 2), round(r["lod"], 2)
(7.29, 10.58)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

import reporting

FIT_KINDS = ("linear", "loglog", "4pl")
#: Unit of a relative concentration taken from a dilution factor (``160x`` -> 1/160).
DILUTION_UNIT = "1/dilution"
#: One-sided 95th percentile of the standard normal (CLSI EP17-A2, LoB and LoD).
Z95_ONE_SIDED = 1.645
#: ICH Q2(R1): LoD = 3.3 sigma / S, LoQ = 10 sigma / S.
ICH_LOD_FACTOR = 3.3
ICH_LOQ_FACTOR = 10.0
OVERDISPERSION_P = 0.05
MIN_TILES_PER_BIN = 5
MAX_ERROR_BINS = 4
#: A concentration counts as reliably counted when its images hold at least this many beads
#: on average (Poisson CV <= 32 %).
RELIABLE_MEAN_BEADS = 10
#: Standardised residuals beyond this many SD are flagged.
RESIDUAL_FLAG_SD = 2.0


class FitError(ValueError):
    """No calibration model could be fitted (the message lists each model's reason)."""


# --------------------------------------------------------------------------- counting error


@dataclass
class CountErrorModel:
    """Relative counting error of a model, piecewise constant in bead density.

    Densities are beads per native frame pixel. ``bias`` and ``spread`` are the mean and SD
    of ``(n_pred - n_true) / n_true`` over the validation tiles of each bin; ``tile_area_px``
    is their mean area.
    """

    density: np.ndarray
    low: np.ndarray
    high: np.ndarray
    bias: np.ndarray
    spread: np.ndarray
    n_tiles: np.ndarray
    tile_area_px: float
    model: str = ""
    source: str = ""
    #: Bins whose own tiles showed no spread (every tile off by the same fraction, often
    #: exactly 0): their spread is the pooled one of all tiles, never a silent 0.
    pooled_spread_bins: tuple = ()

    def at(self, n: float, area_px: float) -> tuple[float, float, bool]:
        """``(relative bias, relative spread, extrapolated)`` for an image of ``n`` beads on
        ``area_px`` native pixels; the spread is scaled by ``sqrt(tile area / area_px)``."""
        d = n / area_px
        ld = np.log10(max(d, 1e-12))
        i = int(np.argmin(np.abs(np.log10(np.maximum(self.density, 1e-12)) - ld)))
        extrapolated = bool(n > 0 and (d < self.low[0] or d > self.high[-1]))
        scale = math.sqrt(self.tile_area_px / area_px)
        return float(self.bias[i]), float(self.spread[i]) * scale, extrapolated

    def bins(self) -> list[dict]:
        """One dict per bin (for JSON and the report); densities in beads per megapixel."""
        return [{"density_low_per_mp": 1e6 * lo, "density_high_per_mp": 1e6 * hi,
                 "n_tiles": int(k), "rel_bias": float(b), "rel_spread": float(s),
                 "spread_note": ("pooled: this bin's tiles showed none" if i in
                                 self.pooled_spread_bins else "own tiles")}
                for i, (lo, hi, k, b, s) in enumerate(zip(self.low, self.high, self.n_tiles,
                                                          self.bias, self.spread))]

    def warnings(self) -> list[str]:
        """What a reader must know before trusting the uncertainty this model gives."""
        out = []
        if self.pooled_spread_bins:
            out.append(
                f"counting error: {len(self.pooled_spread_bins)} density bin(s) of the "
                f"validation tiles showed no spread (every tile off by the same fraction); "
                f"the spread of all {int(self.n_tiles.sum())} tiles "
                f"({float(np.max(self.spread)):.3g}) is used there instead of 0")
        if not np.any(self.spread > 0):
            out.append(
                f"counting error: the model's count error has no spread on its "
                f"{int(self.n_tiles.sum())} validation tiles, so 'Poisson + model CV' equals the "
                "Poisson CV; too few validation tiles to know the model's error")
        return out


def fit_count_error(n_true, n_pred, area_px, *, max_bins: int = MAX_ERROR_BINS,
                    min_per_bin: int = MIN_TILES_PER_BIN) -> CountErrorModel | None:
    """Bias and spread of the relative count error in density bins of equal tile numbers.

    Parameters
    ----------
    n_true, n_pred : array_like of int, shape (T,)
        True and predicted counts of the validation tiles.
    area_px : array_like of float, shape (T,)
        Tile areas in native frame pixels.

    Returns
    -------
    CountErrorModel, or None with fewer than 2 tiles holding beads. Tiles with
    ``n_true = 0`` are left out (their relative error is undefined). Bins hold at least
    ``min_per_bin`` tiles (one bin when there are fewer); a bin's spread is the sample SD
    (ddof=1).
    """
    t = np.asarray(n_true, float)
    p = np.asarray(n_pred, float)
    a = np.asarray(area_px, float)
    ok = (t > 0) & (a > 0) & np.isfinite(p)
    t, p, a = t[ok], p[ok], a[ok]
    if t.size < 2:
        return None
    rel, dens = (p - t) / t, t / a
    order = np.argsort(dens, kind="stable")
    k = int(max(1, min(max_bins, t.size // max(min_per_bin, 2))))
    groups = np.array_split(order, k)
    pooled = float(rel.std(ddof=1))
    spread = np.array([rel[g].std(ddof=1) if g.size > 1 else pooled for g in groups])
    no_spread = tuple(int(i) for i in np.flatnonzero(~(spread > 0)) if pooled > 0)
    spread[list(no_spread)] = pooled
    return CountErrorModel(
        density=np.array([np.median(dens[g]) for g in groups]),
        low=np.array([dens[g].min() for g in groups]),
        high=np.array([dens[g].max() for g in groups]),
        bias=np.array([rel[g].mean() for g in groups]),
        spread=spread,
        n_tiles=np.array([g.size for g in groups]),
        tile_area_px=float(a.mean()),
        pooled_spread_bins=no_spread,
    )


def count_sd(n, spread=0.0) -> np.ndarray:
    """SD of a bead count: ``sqrt(max(n, 1) + (spread * n)^2)``, element-wise.

    Poisson sampling (``sqrt(n)``, with 0 counted as 1 so no weight is infinite) combined with
    a relative counting spread (0 = Poisson only). ``n`` may be a fitted, non-integer count.
    """
    n = np.asarray(n, float)
    return np.sqrt(np.maximum(n, 1.0) + (np.asarray(spread, float) * n) ** 2)


# --------------------------------------------------------------------------- replicates


@dataclass
class Replicates:
    """Replicate-level data, one entry per replicate (arrays of shape (R,)).

    ``x`` concentration (0 for blanks), ``y`` density, ``n`` beads, ``area`` imaged area in
    density units, ``spread`` relative counting spread, ``y_true`` true density (NaN unknown).
    """

    x: np.ndarray
    y: np.ndarray
    n: np.ndarray
    area: np.ndarray
    spread: np.ndarray
    blank: np.ndarray
    n_images: np.ndarray
    y_true: np.ndarray
    ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.x.size)

    def subset(self, idx) -> Replicates:
        idx = np.asarray(idx)
        return Replicates(self.x[idx], self.y[idx], self.n[idx], self.area[idx],
                          self.spread[idx], self.blank[idx], self.n_images[idx],
                          self.y_true[idx], [self.ids[i] for i in idx])

    def sd(self, y=None) -> np.ndarray:
        """Density SD of each replicate at density ``y`` (default: the observed one)."""
        y = self.y if y is None else np.asarray(y, float)
        return count_sd(np.clip(y, 0, None) * self.area, self.spread) / self.area

    def levels(self) -> list[np.ndarray]:
        """Index arrays of the replicates at each concentration, blanks first, ascending."""
        return [np.flatnonzero(self.x == v) for v in np.unique(self.x)]


def build_replicates(images: Sequence[dict]) -> Replicates:
    """Pool per-image rows into replicates.

    ``images`` rows need ``concentration, blank, replicate, file, beads, area,
    count_spread_rel`` and optionally ``n_true``. Images sharing a replicate id at one
    concentration are pooled (density = sum of beads / sum of area; the counting spreads add
    in quadrature); without an id each image is a replicate.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in images:
        key = (r["concentration"], r["replicate"] or f"image:{r['file']}")
        groups.setdefault(key, []).append(r)
    keys = sorted(groups, key=lambda k: (k[0], k[1]))
    x, y, n, area, spread, blank, n_img, y_true, ids = ([] for _ in range(9))
    for k in keys:
        g = groups[k]
        beads = sum(r["beads"] for r in g)
        a = sum(r["area"] for r in g)
        var = sum((r["count_spread_rel"] * r["beads"]) ** 2 for r in g)
        s = (math.sqrt(var) / beads if beads > 0
             else float(np.mean([r["count_spread_rel"] for r in g])))
        truth = [r.get("n_true") for r in g]
        x.append(k[0])
        n.append(beads)
        area.append(a)
        y.append(beads / a)
        spread.append(s)
        blank.append(bool(g[0]["blank"]))
        n_img.append(len(g))
        y_true.append(sum(truth) / a if all(v is not None and v != "" for v in truth)
                      else math.nan)
        ids.append(k[1])
    return Replicates(np.array(x, float), np.array(y, float), np.array(n, float),
                      np.array(area, float), np.array(spread, float), np.array(blank, bool),
                      np.array(n_img, int), np.array(y_true, float), ids)


def dispersion_test(counts, areas) -> tuple[float, int, float]:
    """Pearson chi-square test of replicate counts against one Poisson rate.

    ``chi2 = sum (N_i - lambda a_i)^2 / (lambda a_i)`` with ``lambda = sum N / sum a``, on
    ``k - 1`` degrees of freedom; returns ``(chi2, df, p)`` (upper tail), NaNs when
    ``k < 2`` or no beads.
    """
    from scipy import stats

    c = np.asarray(counts, float)
    a = np.asarray(areas, float)
    if c.size < 2 or c.sum() <= 0:
        return math.nan, max(c.size - 1, 0), math.nan
    expected = c.sum() / a.sum() * a
    chi2 = float(((c - expected) ** 2 / expected).sum())
    df = c.size - 1
    return chi2, df, float(stats.chi2.sf(chi2, df))


def sample_table(reps: Replicates, unit: str) -> list[dict]:
    """One row per concentration: replicates, density mean / SD / CV, Poisson and expected CV,
    dispersion test, mean true density (``per_sample.csv``)."""
    out = []
    for idx in reps.levels():
        y, n = reps.y[idx], reps.n[idx]
        mean = float(y.mean())
        sd = float(y.std(ddof=1)) if idx.size > 1 else math.nan
        mean_n = float(n.mean())
        chi2, df, p = dispersion_test(n, reps.area[idx])
        s = float(np.mean(reps.spread[idx]))
        yt = reps.y_true[idx]
        out.append({
            "concentration": float(reps.x[idx[0]]), "unit": unit,
            "blank": bool(reps.blank[idx[0]]),
            "n_images": int(reps.n_images[idx].sum()), "n_replicates": int(idx.size),
            "beads": int(n.sum()), "mean_density": mean, "sd_density": sd,
            "cv_pct": 100 * sd / mean if mean > 0 else math.nan,
            "poisson_cv_pct": 100 / math.sqrt(mean_n) if mean_n > 0 else math.nan,
            "expected_cv_pct": 100 * math.sqrt(1 / mean_n + s * s) if mean_n > 0 else math.nan,
            "dispersion_chi2": chi2, "dispersion_df": df, "dispersion_p": p,
            "overdispersed": bool(p < OVERDISPERSION_P) if math.isfinite(p) else "",
            "mean_true_density": float(yt.mean()) if np.isfinite(yt).all() else math.nan,
        })
    return out


# --------------------------------------------------------------------------- curve models


def _f_linear(x, p):
    return p[0] + p[1] * np.asarray(x, float)


def _f_loglog(x, p):
    x = np.asarray(x, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x > 0, 10.0 ** p[0] * np.abs(x) ** p[1], np.nan)


def _f_4pl(x, p):
    a, b, log_c, d = p
    x = np.asarray(x, float)
    with np.errstate(all="ignore"):
        r = (x / 10.0 ** log_c) ** b  # x = 0: 0 for b > 0, inf (-> y = d) for b < 0
        return d + (a - d) / (1.0 + r)


def _t_quantile(q: float, dof: int) -> float:
    """Student's t quantile (NaN without degrees of freedom); SciPy imported on first use so
    ``--help`` stays instant."""
    from scipy import stats

    return float(stats.t.ppf(q, dof)) if dof > 0 else math.nan


_FUNCTIONS: dict[str, Callable] = {"linear": _f_linear, "loglog": _f_loglog, "4pl": _f_4pl}
_PARAM_NAMES = {"linear": ("intercept", "slope"), "loglog": ("log10_intercept", "slope"),
                "4pl": ("a", "b", "log10_c", "d")}


@dataclass
class Fit:
    """A fitted calibration curve ``density = f(concentration; p)``.

    ``p`` / ``cov`` are the internal parameters (``loglog``: log10 intercept and slope;
    ``4pl``: ``a, b, log10 c, d``); ``cov`` is scaled by the reduced chi-square. ``aic`` is
    filled by :func:`fit_calibration`. A fit that failed has ``converged = False`` and says
    why in ``message``.
    """

    kind: str
    p: np.ndarray
    cov: np.ndarray
    n: int
    dof: int
    r2: float = math.nan
    wrss: float = math.nan
    aic: float = math.nan
    converged: bool = True
    message: str = ""

    @classmethod
    def failed(cls, kind: str, message: str) -> Fit:
        k = len(_PARAM_NAMES[kind])
        return cls(kind, np.full(k, np.nan), np.full((k, k), np.nan), 0, 0,
                   converged=False, message=message)

    @property
    def t95(self) -> float:
        return _t_quantile(0.975, self.dof)

    def predict(self, x) -> np.ndarray:
        """Density at concentration(s) ``x``."""
        return _FUNCTIONS[self.kind](x, self.p)

    def invert(self, y) -> np.ndarray:
        """Concentration at density(ies) ``y``; NaN outside the curve's range."""
        y = np.asarray(y, float)
        p = self.p
        with np.errstate(all="ignore"):
            if self.kind == "linear":
                x = (y - p[0]) / p[1]
            elif self.kind == "loglog":
                x = 10.0 ** ((np.log10(y) - p[0]) / p[1])
            else:
                a, b, log_c, d = p
                x = 10.0 ** log_c * ((a - d) / (y - d) - 1.0) ** (1.0 / b)
        x = np.asarray(x, float)
        return np.where(np.isfinite(x) & (x >= 0), x, np.nan)

    def band(self, x, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise confidence band of the mean curve (delta method, numeric Jacobian, t
        quantile); for ``loglog`` computed on log10 density. NaN without a finite cov."""
        x = np.asarray(x, float)
        nan = np.full(x.shape, np.nan)
        if not self.converged or self.dof <= 0 or not np.isfinite(self.cov).all():
            return nan, nan.copy()
        log_space = self.kind == "loglog"

        def g(p):
            v = _FUNCTIONS[self.kind](x, p)
            with np.errstate(all="ignore"):
                return np.log10(v) if log_space else v

        jac = np.empty((x.size, self.p.size))
        for j in range(self.p.size):
            h = 1e-6 * max(1.0, abs(self.p[j]))
            up, dn = self.p.copy(), self.p.copy()
            up[j] += h
            dn[j] -= h
            jac[:, j] = (g(up) - g(dn)) / (2 * h)
        se = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", jac, self.cov, jac), 0))
        q = _t_quantile(0.5 + level / 2, self.dof)
        mid = g(self.p)
        lo, hi = mid - q * se, mid + q * se
        return (10.0 ** lo, 10.0 ** hi) if log_space else (lo, hi)

    def params(self) -> dict[str, dict]:
        """``name -> {value, se, ci95}``; the 4PL's ``log10_c`` is reported as ``c``."""
        out = {}
        se = np.sqrt(np.abs(np.diag(self.cov))) if self.cov.size else np.array([])
        t = self.t95
        for j, name in enumerate(_PARAM_NAMES[self.kind]):
            v, s = float(self.p[j]), float(se[j])
            ci = [v - t * s, v + t * s]
            if name == "log10_c":
                with np.errstate(over="ignore"):
                    c, lo, hi = np.power(10.0, [v, ci[0], ci[1]])
                name, v, s, ci = "c", float(c), float(c * math.log(10) * s), [lo, hi]
            out[name] = {"value": v, "se": s, "ci95": ci}
        return out


def _wls(x, y, sd) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted straight line: ``(beta [intercept, slope], (X'WX)^-1, weighted RSS)``."""
    w = 1.0 / np.asarray(sd, float) ** 2
    X = np.column_stack([np.ones_like(x), x])
    xtwx = X.T @ (X * w[:, None])
    inv = np.linalg.pinv(xtwx)
    beta = inv @ (X.T @ (w * y))
    wrss = float((w * (y - X @ beta) ** 2).sum())
    return beta, inv, wrss


def _r2(y, yhat) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - yhat) ** 2).sum()) / ss_tot if ss_tot > 0 else math.nan


def fit_linear(x, y, sd, start=None) -> Fit:
    """Weighted fit ``y = intercept + slope x`` (``start`` unused, for a common signature).

    Parameters
    ----------
    x, y, sd : array_like, shape (n,)
        Concentration, density and density SD (weights ``1 / sd^2``).
    """
    x, y, sd = (np.asarray(v, float) for v in (x, y, sd))
    if np.unique(x).size < 2:
        return Fit.failed("linear", "needs at least 2 distinct concentrations")
    beta, inv, wrss = _wls(x, y, sd)
    dof = x.size - 2
    cov = inv * (wrss / dof) if dof > 0 else np.full((2, 2), np.inf)
    return Fit("linear", beta, cov, x.size, dof, _r2(y, _f_linear(x, beta)), wrss)


def fit_loglog(x, y, sd, start=None, ref=None) -> Fit:
    """Weighted straight line on ``log10 x, log10 y`` (points with ``x, y > 0`` only).

    The SD on the log scale is ``sd / (ref ln 10)`` with ``ref`` the density the SD refers
    to (default the observed ``y``; the fitted one when re-weighting).
    """
    x, y, sd = (np.asarray(v, float) for v in (x, y, sd))
    ref = y if ref is None else np.asarray(ref, float)
    ok = (x > 0) & (y > 0) & (ref > 0)
    if np.unique(x[ok]).size < 2:
        return Fit.failed("loglog", "needs positive densities at >= 2 concentrations")
    lx, ly = np.log10(x[ok]), np.log10(y[ok])
    beta, inv, wrss = _wls(lx, ly, sd[ok] / (ref[ok] * math.log(10)))
    dof = int(ok.sum()) - 2
    cov = inv * (wrss / dof) if dof > 0 else np.full((2, 2), np.inf)
    return Fit("loglog", beta, cov, int(ok.sum()), dof, _r2(ly, beta[0] + beta[1] * lx), wrss)


def _4pl_starts(x, y) -> list[np.ndarray]:
    """Start values around the data: ``a`` = mean at the lowest concentration, ``d`` just past
    / well past the highest mean, ``c`` at the half-way crossing, the geometric mean and the
    highest concentration, ``b = 1``."""
    levels = np.unique(x)
    means = np.array([y[x == v].mean() for v in levels])
    a0, top = means[0], means[-1]
    span = top - a0 if top != a0 else (np.std(y) or 1.0)
    pos = levels[levels > 0]
    cs = [float(np.exp(np.log(pos).mean())), float(pos.max())]
    half = a0 + span / 2
    above = np.flatnonzero((means - half) * np.sign(span) >= 0)
    if above.size and levels[above[0]] > 0:
        cs.insert(0, float(levels[above[0]]))
    starts = []
    for c in cs[:3]:
        for d in (top + 0.05 * span, top + span, top + 10 * span):
            starts.append(np.array([a0, 1.0, math.log10(c), d]))
    return starts


def fit_4pl(x, y, sd, start=None, maxfev: int = 4000) -> Fit:
    """Four-parameter logistic ``y = d + (a - d) / (1 + (x / c)^b)`` by ``curve_fit``.

    Tried from ``start`` (internal parameters ``a, b, log10 c, d``) or from
    :func:`_4pl_starts`; the converged start with the lowest weighted RSS is kept. Needs
    >= 4 distinct concentrations and >= 5 points; otherwise, or when no start converges, a
    failed :class:`Fit` whose message says why.
    """
    from scipy import optimize

    x, y, sd = (np.asarray(v, float) for v in (x, y, sd))
    n_levels = np.unique(x).size
    if n_levels < 4 or x.size < 5:
        return Fit.failed("4pl", f"needs >= 4 distinct concentrations (blanks count) and >= 5 "
                                 f"replicates, got {n_levels} and {x.size}")
    starts = [np.asarray(start, float)] if start is not None else _4pl_starts(x, y)

    def f(xx, a, b, log_c, d):
        return _f_4pl(xx, (a, b, log_c, d))

    best, last = None, "no start value"
    for p0 in starts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p, cov = optimize.curve_fit(f, x, y, p0=p0, sigma=sd, absolute_sigma=False,
                                            maxfev=maxfev)
        except (RuntimeError, ValueError, optimize.OptimizeWarning) as exc:
            last = str(exc).splitlines()[0]
            continue
        pred = _f_4pl(x, p)
        if not (np.isfinite(p).all() and np.isfinite(pred).all()):
            last = "non-finite parameters"
            continue
        wrss = float((((y - pred) / sd) ** 2).sum())
        if best is None or wrss < best[2]:
            best = (p, cov, wrss)
    if best is None:
        return Fit.failed("4pl", f"4PL did not converge from {len(starts)} start value(s) "
                                 f"({last}); the data may not reach the curve's plateaus")
    p, cov, wrss = best
    fit = Fit("4pl", p, np.asarray(cov, float), x.size, x.size - 4, _r2(y, _f_4pl(x, p)),
              wrss)
    # c uncertain by more than a factor of 10 (or no covariance): the data do not pin the
    # inflection, typically because they never approach a plateau.
    if not np.isfinite(fit.cov).all() or not np.sqrt(abs(fit.cov[2, 2])) < 1.0:
        fit.message = ("4PL parameters poorly determined (c uncertain by > 10x): the data "
                       "show no plateau")
    return fit


_FITTERS = {"linear": fit_linear, "loglog": fit_loglog, "4pl": fit_4pl}


def fit_calibration(kind: str, x, y, area, spread=0.0, *, start=None, passes: int = 2) -> Fit:
    """Fit one calibration model with Poisson-plus-model weights, re-weighted from the fit.

    Parameters
    ----------
    kind : {"linear", "loglog", "4pl"}
    x, y : array_like, shape (R,)
        Concentration (0 = blank) and density of each replicate.
    area : array_like, shape (R,)
        Imaged area of each replicate (density units), so ``y * area`` is the count.
    spread : float or array_like
        Relative counting spread of each replicate (0 = Poisson only).
    start : internal parameters to start the 4PL from (bootstrap), else its own grid.
    passes : fits in all; each after the first takes its weights from the previous fit.

    Returns
    -------
    Fit, with ``aic`` computed on the non-blank replicates in density units with the weights
    of the observed counts (comparable between models).
    """
    x, y, area = (np.asarray(v, float) for v in (x, y, area))
    spread = np.broadcast_to(np.asarray(spread, float), x.shape)

    def sd_at(yy):
        return count_sd(np.clip(yy, 0, None) * area, spread) / area

    sd_obs = sd_at(y)
    fitter = _FITTERS[kind]
    fit = fitter(x, y, sd_obs, start=start)
    for _ in range(passes - 1):
        if not fit.converged:
            break
        yhat = fit.predict(x)
        if kind == "loglog":
            ref = np.where(np.isfinite(yhat), yhat, y)
            fit = fit_loglog(x, y, sd_at(ref), ref=ref)
        else:
            fit = fitter(x, y, sd_at(np.where(np.isfinite(yhat), yhat, y)), start=fit.p)
    if fit.converged:
        sel = x > 0
        pred = fit.predict(x[sel])
        if np.isfinite(pred).all() and sel.any():
            m = int(sel.sum())
            wrss = float((((y[sel] - pred) / sd_obs[sel]) ** 2).sum())
            fit.aic = m * math.log(max(wrss, 1e-300) / m) + 2 * (fit.p.size + 1)
    return fit


def choose_fit(fits: dict[str, Fit], forced: str = "auto") -> tuple[str, str]:
    """Name of the chosen model and why: ``forced`` when it converged, else lowest AIC.

    Raises
    ------
    FitError
        When no model could be fitted.
    """
    usable = {k: f for k, f in fits.items() if f.converged and math.isfinite(f.aic)}
    if not usable:
        raise FitError("no calibration model could be fitted: "
                         + "; ".join(f"{k}: {f.message}" for k, f in fits.items()))
    aics = ", ".join(f"{k} {reporting.fmt(f.aic, 2) if f.converged else 'n/a'}"
                     for k, f in fits.items())
    if forced != "auto":
        if forced in usable:
            return forced, f"--fit {forced} (AIC: {aics})"
        note = f"--fit {forced} could not be used ({fits[forced].message}); "
    else:
        note = ""
    best = min(usable, key=lambda k: usable[k].aic)
    return best, f"{note}lowest AIC ({aics})"


# --------------------------------------------------------------------------- detection limits


def lowest_counted_concentration(reps: Replicates,
                                 min_beads: float = RELIABLE_MEAN_BEADS) -> float | None:
    """Lowest non-blank concentration whose images hold ``min_beads`` or more beads on
    average (None if none does)."""
    best = None
    for idx in reps.levels():
        if reps.blank[idx[0]] or reps.x[idx[0]] <= 0:
            continue
        per_image = float(reps.n[idx].sum() / max(1, reps.n_images[idx].sum()))
        if per_image >= min_beads and (best is None or reps.x[idx[0]] < best):
            best = float(reps.x[idx[0]])
    return best


def ep17_limits(blank, low, z: float = Z95_ONE_SIDED) -> dict:
    """CLSI EP17-A2 parametric limits of blank and detection, in response units.

    ``LoB = mean(blank) + z SD(blank)``, ``LoD = LoB + z SD(low)``, SDs with ddof=1,
    ``z = 1.645`` (one-sided 95 %: at most 5 % of blanks exceed LoB, and at most 5 % of
    samples at LoD fall below LoB). CLSI EP17-A2 (2012); Armbruster & Pry, Clin Biochem Rev
    29 Suppl 1:S49-52 (2008). EP17's small-sample factor ``1 / (1 - 1 / (4 (L - K)))`` on
    the second 1.645 is not applied. NaNs when a group has fewer than 2 values.

    Examples
    --------
    >>> r = ep17_limits([2, 4, 6], [10, 12, 14])  # both SDs are 2
    >>> round(r["lob"], 2), round(r["lod"], 2)
    (7.29, 10.58)
    """
    b = np.asarray(blank, float)
    lo = np.asarray(low, float)
    mean_b = float(b.mean()) if b.size else math.nan
    sd_b = float(b.std(ddof=1)) if b.size > 1 else math.nan
    sd_low = float(lo.std(ddof=1)) if lo.size > 1 else math.nan
    lob = mean_b + z * sd_b
    return {"mean_blank": mean_b, "sd_blank": sd_b, "sd_low": sd_low, "lob": lob,
            "lod": lob + z * sd_low, "n_blank": int(b.size), "n_low": int(lo.size)}


def ich_limits(x, y) -> dict:
    """ICH Q2(R1) limits from an ordinary least-squares line: ``LoD = 3.3 sigma / S``,
    ``LoQ = 10 sigma / S``; ``sigma = sqrt(SS_res / (n - 2))``, ``S`` the slope.

    ICH Q2(R1) §6.3 / §7.3 ("based on the standard deviation of the response and the
    slope"), with sigma the residual SD of a regression line in the range of the limit
    (§6.3.2 "based on the calibration curve").

    NaNs with fewer than 3 points, fewer than 2 distinct ``x`` or a slope <= 0.
    """
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    nan = {"slope": math.nan, "intercept": math.nan, "sigma": math.nan, "lod": math.nan,
           "loq": math.nan, "n": int(x.size)}
    if x.size < 3 or np.unique(x).size < 2:
        return nan
    slope, intercept = np.polyfit(x, y, 1)
    sigma = math.sqrt(float(((y - intercept - slope * x) ** 2).sum()) / (x.size - 2))
    out = dict(nan, slope=float(slope), intercept=float(intercept), sigma=sigma)
    if slope > 0:
        out.update(lod=ICH_LOD_FACTOR * sigma / slope, loq=ICH_LOQ_FACTOR * sigma / slope)
    return out


def low_range(reps: Replicates, k: int) -> np.ndarray:
    """Indices of the blanks plus the replicates of the ``k`` lowest non-blank levels."""
    pos = np.unique(reps.x[~reps.blank])
    keep = set(pos[:max(k, 2)].tolist())
    return np.flatnonzero(reps.blank | np.isin(reps.x, list(keep)))


def detection_limits(reps: Replicates, kind: str, *, n_low: int = 3, start=None,
                     fit: Fit | None = None) -> dict:
    """LoB / LoD (EP17) and LoD / LoQ (ICH) of one data set, with the chosen curve.

    Used alike for the point estimate and each bootstrap resample. Returns a flat dict:
    ``lob, lod_density`` (EP17, density), ``lob_conc, lod_conc_ep17`` (inverted through the
    curve), ``lod_ich, loq_ich`` (concentration), ``lod`` (EP17 when available, else ICH),
    and the pieces (``ep17``, ``ich``, ``low_concentration``).
    """
    if fit is None:
        fit = fit_calibration(kind, reps.x, reps.y, reps.area, reps.spread, start=start)
    out: dict = {"fit": fit}
    blanks = reps.y[reps.blank]
    low_conc, low = math.nan, np.array([])
    for idx in reps.levels():
        if not reps.blank[idx[0]] and idx.size >= 2:
            low_conc, low = float(reps.x[idx[0]]), reps.y[idx]
            break
    ep = ep17_limits(blanks, low)
    out["ep17"], out["low_concentration"] = ep, low_conc
    out["lob"], out["lod_density"] = ep["lob"], ep["lod"]
    ok = fit.converged
    out["lob_conc"] = float(fit.invert(ep["lob"])) if ok and math.isfinite(ep["lob"]) \
        else math.nan
    out["lod_conc_ep17"] = float(fit.invert(ep["lod"])) if ok and math.isfinite(ep["lod"]) \
        else math.nan
    sel = low_range(reps, n_low)
    ich = ich_limits(reps.x[sel], reps.y[sel])
    ich["concentrations"] = sorted({float(v) for v in reps.x[sel]})
    out["ich"] = ich
    out["lod_ich"], out["loq_ich"] = ich["lod"], ich["loq"]
    out["lod"] = out["lod_conc_ep17"] if math.isfinite(ep["lod"]) else ich["lod"]
    out["lod_method"] = ("CLSI EP17" if math.isfinite(ep["lod"]) else "ICH Q2")
    return out


BOOT_KEYS = ("lob", "lod_density", "lob_conc", "lod_conc_ep17", "lod_ich", "loq_ich", "lod")


def bootstrap_limits(reps: Replicates, kind: str, *, n_boot: int = 2000, seed: int = 0,
                     n_low: int = 3, start=None) -> dict | None:
    """Percentile 95 % CIs of the limits, resampling replicates within each concentration.

    Returns None when no concentration has 2 replicates (nothing to resample). Otherwise
    ``{key: {"ci95": [lo, hi], "n_valid": int}}`` for :data:`BOOT_KEYS` plus ``slope`` of
    the chosen curve (internal parameter 1) and ``n_boot``, ``seed``; resamples where a
    value is undefined (4PL not converged, a curve that cannot be inverted) are counted out.
    """
    levels = reps.levels()
    if all(idx.size < 2 for idx in levels):
        return None
    rng = np.random.default_rng(seed)
    keys = BOOT_KEYS + ("slope",)
    vals = {k: np.full(n_boot, np.nan) for k in keys}
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in levels])
        r = detection_limits(reps.subset(idx), kind, n_low=n_low, start=start)
        for k in BOOT_KEYS:
            vals[k][b] = r[k]
        vals["slope"][b] = r["fit"].p[1] if r["fit"].converged else np.nan
    out: dict = {"n_boot": n_boot, "seed": seed}
    for k in keys:
        v = vals[k][np.isfinite(vals[k])]
        out[k] = {"ci95": [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                  if v.size else [math.nan, math.nan], "n_valid": int(v.size)}
    return out
