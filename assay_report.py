"""Text of an assay: ``ASSAY_REPORT.md`` and the warnings it and the log carry.

Built from the results dict ``quantify_assay.py`` writes as ``assay_results.json`` (every
number in the report is formatted from it, with :func:`reporting.fmt` at 4 significant
digits) and from :mod:`assay_stats` objects for the warnings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

import reporting
from assay_stats import (
    DILUTION_UNIT,
    RELIABLE_MEAN_BEADS,
    RESIDUAL_FLAG_SD,
    CountErrorModel,
    Fit,
    Replicates,
    lowest_counted_concentration,
)


def _fmt(v, digits: int = 4) -> str:
    """:func:`reporting.fmt` with 4 significant digits (the assay report's precision)."""
    return reporting.fmt(v, digits)


def ci_text(ci) -> str:
    """``[lo, hi]`` of a 95 % CI, or ``n/a`` unless both ends are finite floats."""
    return "n/a" if not ci or ci[0] is None or not all(
        isinstance(c, float) and math.isfinite(c) for c in ci) else \
        f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _table(rows: Sequence[dict], cols: Sequence[tuple[str, str]]) -> list[str]:
    return [reporting.md_dict_table(rows, cols, formatter=_fmt)]


def fit_summary(fit: Fit) -> dict:
    """A fit as it is stored in the results JSON."""
    return {"model": fit.kind, "converged": fit.converged, "message": fit.message,
            "params": fit.params() if fit.converged else {}, "r2": fit.r2, "aic": fit.aic,
            "n": fit.n, "dof": fit.dof}


def extrapolation_warning(n_images: int, model: CountErrorModel) -> str:
    """The sentence for images outside the validation tiles' density range."""
    return (f"{n_images} image(s) lie outside the density range of the validation tiles "
            f"({1e6 * model.low[0]:.4g}-{1e6 * model.high[-1]:.4g} beads per megapixel): no "
            "model error is known there. The nearest bin's bias and spread stand in for it, "
            "which is a guess (column error_model_extrapolated in per_image.csv)")


def residual_flags(reps: Replicates, fit: Fit, limit: float = RESIDUAL_FLAG_SD) -> list[str]:
    """Replicates whose standardised residual ``(y - fit) / sd`` lies beyond ``limit``.

    Returns one line per such replicate, and a first line saying so when all of them do (the
    stated uncertainty then understates the scatter, or the curve does not describe the data).
    """
    if not fit.converged or not len(reps):
        return []
    z = (reps.y - fit.predict(reps.x)) / reps.sd()
    bad = np.flatnonzero(np.isfinite(z) & (np.abs(z) > limit))
    names = [str(x).removeprefix("image:") for x in reps.ids] or [str(i) for i in range(len(reps))]
    out = [f"residual: replicate {names[i]} at "
           f"concentration {reps.x[i]:.4g} is {z[i]:+.1f} SD from the {fit.kind} curve"
           for i in bad]
    finite = int(np.isfinite(z).sum())
    if bad.size and bad.size == finite:
        out.insert(0, f"residual: all {finite} replicate(s) lie beyond ±{limit:g} SD of the "
                      f"{fit.kind} curve: the scatter is larger than the counting uncertainty "
                      "(Poisson + model error) explains, or the curve does not fit; the fit's "
                      "CIs and the limits are too narrow")
    elif bad.size:
        out.insert(0, f"residual: {bad.size} of {finite} replicate(s) lie beyond ±{limit:g} SD "
                      f"of the {fit.kind} curve (expected about {0.05 * finite:.1f})")
    return out


def lod_warning(lod, reps: Replicates, unit: str) -> str | None:
    """A sentence when the LoD lies above the lowest concentration that was reliably counted
    (the limit then says less than the data: it comes from the scatter of the low-range
    line, not from blanks), else None."""
    low = lowest_counted_concentration(reps)
    if lod is None or low is None or not math.isfinite(lod) or lod <= low:
        return None
    return (f"LoD {lod:.4g} {unit} is above {low:.4g} {unit}, the lowest concentration whose "
            f"images were counted with >= {RELIABLE_MEAN_BEADS} beads each on average. The "
            "limit comes from the scatter of the low-range line, not from blanks; measure "
            "blanks (EP17) and more replicates at the low end before quoting it")


def build_report(res: dict, figures: Sequence[str]) -> str:
    """``ASSAY_REPORT.md``: every number is formatted from ``res`` (the results JSON)."""
    unit = res["unit"] or "(no unit)"
    du = res["density_unit"]
    dh = res["density_heading"]
    st = res["settings"]
    L = ["# Assay report", ""]
    L += [f"- predictions: `{st['summary']}`",
          f"- concentrations: {st['concentration_source']}; unit **{unit}**",
          f"- density: {dh}",
          f"- counting uncertainty: {res['count_error']['note']}",
          f"- images used: {res['n_images']} ({res['n_replicates']} replicates at "
          f"{res['n_concentrations']} concentrations"
          + (" + blanks" if res["n_blank_images"] else "") + ")"
          + (f"; excluded: {len(res['excluded'])}" if res["excluded"] else "")
          + (f"; without concentration: {len(res['unmatched'])}" if res["unmatched"] else ""),
          ""]
    fit = res["fit"]
    L += [f"## Headline; density in {du}", ""]
    L.append(f"- calibration model: **{fit['model']}**, R² {_fmt(fit['r2'])}, chosen by "
             f"{res['fit_choice']}")
    as_dilution = ""
    if res["unit"] == DILUTION_UNIT and res["lod"] is not None and res["lod"] > 0:
        as_dilution = f" (a {1 / res['lod']:.4g}x dilution)"
    L.append(f"- LoD = **{_fmt(res['lod'])} {unit}**{as_dilution} ({res['lod_method']}), "
             f"95 % CI {ci_text(res['lod_ci95'])}")
    lob_d = res["detection"]["lob_density"]
    L.append(f"- LoQ = {_fmt(res['loq'])} {unit} (ICH Q2, 10·σ/slope); LoB = "
             + (f"{_fmt(lob_d)} {du} (concentration {_fmt(res['lob'])} {unit})"
                if lob_d is not None else "n/a (needs >= 2 blank replicates)"))
    L += ["", "## Warnings", ""] + [f"- {w}" for w in res.get("warnings") or ["none"]]
    L += ["", f"## Calibration fits; density in {dh}", "",
          "| model | parameters (95 % CI) | R² | AIC | n | note |", "|---|---|---|---|---|---|"]
    for f in res["fits"].values():
        ps = "; ".join(f"{k} {_fmt(v['value'])} {ci_text(v['ci95'])}"
                       for k, v in f["params"].items())
        mark = " (chosen)" if f["model"] == fit["model"] else ""
        L.append(f"| {f['model']}{mark} | {ps or 'n/a'} | {_fmt(f['r2'])} | {_fmt(f['aic'])} | "
                 f"{f['n']} | {f['message'] or ''} |")
    tr = res.get("truth")
    if tr:
        L += ["", f"## Truth; density in {dh}", "", tr["note"]]
        if tr.get("fit"):
            ps = "; ".join(f"{k} {_fmt(v['value'])} {ci_text(v['ci95'])}"
                           for k, v in tr["fit"]["params"].items())
            L += ["", f"True curve ({tr['fit']['model']} fitted to the true counts): {ps}; "
                      f"R² {_fmt(tr['fit']['r2'])}."]
    L += ["", f"## Detection limits (concentration in {unit}; response in {du})", "",
          "| limit | value | 95 % CI | definition |", "|---|---|---|---|"]
    d = res["detection"]
    boot = res.get("bootstrap") or {}

    def ci(k):
        return ci_text(boot.get(k, {}).get("ci95")) if boot else "n/a"

    rows = [
        ("LoB (response)", d["lob_density"], ci("lob"),
         "mean_blank + 1.645·SD_blank (CLSI EP17)"),
        ("LoB (concentration)", d["lob_conc"], ci("lob_conc"), "LoB through the inverse curve"),
        ("LoD EP17 (response)", d["lod_density"], ci("lod_density"),
         "LoB + 1.645·SD_low (CLSI EP17)"),
        ("LoD EP17 (concentration)", d["lod_conc_ep17"], ci("lod_conc_ep17"),
         "EP17 LoD through the inverse of the chosen curve"),
        ("LoD ICH", d["lod_ich"], ci("lod_ich"),
         "3.3·σ/slope, σ = residual SD of the low-range line (ICH Q2)"),
        ("LoQ ICH", d["loq_ich"], ci("loq_ich"), "10·σ/slope (ICH Q2)"),
    ]
    L += [f"| {a} | {_fmt(b)} | {c} | {e} |" for a, b, c, e in rows]
    ep, ich = d["ep17"], d["ich"]
    L += ["", f"EP17: {ep['n_blank']} blank replicate(s), mean {_fmt(ep['mean_blank'])}, SD "
              f"{_fmt(ep['sd_blank'])}; SD_low {_fmt(ep['sd_low'])} from {ep['n_low']} "
              f"replicate(s) at {_fmt(d['low_concentration'])} {unit}. ICH: line through "
              f"{ich['n']} replicates at {', '.join(_fmt(c) for c in ich['concentrations'])} "
              f"{unit}: slope {_fmt(ich['slope'])}, σ {_fmt(ich['sigma'])}.",
          "", (f"Bootstrap: {boot['n_boot']} resamples of the replicates within each "
               f"concentration (seed {boot['seed']}); LoD defined in {boot['lod']['n_valid']} "
               "of them." if boot else
               "Bootstrap: not possible, no concentration has 2 replicates (CIs n/a).")]
    L += ["", f"## Per sample; density in {dh}", ""]
    L += _table(res["per_sample"], [
        ("concentration", f"concentration ({unit})"), ("blank", "blank"),
        ("n_images", "images"), ("n_replicates", "replicates"), ("beads", "beads"),
        ("mean_density", f"mean ({du})"), ("sd_density", "SD"), ("cv_pct", "CV %"),
        ("poisson_cv_pct", "Poisson CV %"), ("expected_cv_pct", "Poisson+model CV %"),
        ("dispersion_p", "dispersion p"), ("overdispersed", "over-dispersed"),
        ("mean_true_density", "true mean")])
    ce = res["count_error"]
    L += ["", "## Counting error of the model; density in beads per megapixel of frame", "",
          ce["note"] + "."]
    if ce.get("bins"):
        L += [""] + _table(ce["bins"], [
            ("density_low_per_mp", "density from (beads/MP)"),
            ("density_high_per_mp", "to"), ("n_tiles", "tiles"), ("rel_bias", "rel. bias"),
            ("rel_spread", "rel. spread (per tile)"), ("spread_note", "note")])
    if figures:
        L += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    problems = [f"{f}: excluded, {why}" for f, why in res["excluded"]] + \
        [f"{f}: no concentration ({res['unmatched_reason']})" for f in res["unmatched"]] + \
        list(res.get("missing_samples") or [])
    if problems:
        L += ["", "## Problems", ""] + [f"- {p}" for p in problems]
    L += ["", "## Concentration of each file", "", "<details><summary>"
          f"{len(res['rules'])} files</summary>", "", "| file | concentration | rule |",
          "|---|---|---|"]
    L += [f"| {f} | {_fmt(c)} | {r} |" for f, c, r in res["rules"]]
    L += ["", "</details>", "", "## Definitions", "",
          "- Count SD = sqrt(max(N, 1) + (s·N)²): Poisson plus the model's relative counting "
          "spread s from its validation tiles (scaled by sqrt(tile area / image area)); "
          "bias reported, not subtracted.",
          "- Weighted fits (1/SD²), re-weighted once from the fitted values; covariance scaled "
          "by the reduced chi-square; 95 % CIs with Student's t. AIC = n ln(WRSS/n) + 2(k+1) "
          "on the non-blank replicates. R² on each fit's own scale.",
          "- Dispersion: Pearson chi-square of replicate counts against one Poisson rate, "
          "k - 1 degrees of freedom; over-dispersed when p < 0.05.",
          "- LoB = mean_blank + 1.645·SD_blank; LoD = LoB + 1.645·SD_low (CLSI EP17-A2, "
          "parametric, without the small-sample factor). LoD = 3.3·σ/S, LoQ = 10·σ/S "
          "(ICH Q2(R1)). CIs: percentile bootstrap over replicates within concentrations.", ""]
    return "\n".join(L)
