"""The study report: distributions over calibration sources and seeds, ranking stability, recommendations.

``write_report(db, out)`` writes ``out/index.html`` (one self-contained file: figures inlined),
``out/report.md``, one PNG per metric and ``out/tables.json`` (every number in the report, for
checking against the database). Everything is computed from the ``runs`` and ``metrics`` tables.
"""

from __future__ import annotations

import base64
import html
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from calibrant.cache import atomic_path
from calibrant.errors import CalibrantError
from calibrant.studies.store import ResultStore

MARKER = ".calibrant-report"


def lower_is_better(metric: str) -> bool:
    return metric.startswith("ppl:")


@dataclass
class Report:
    title: str
    meta: dict[str, Any]
    summary: list[dict[str, Any]] = field(default_factory=list)  # per (model, config, metric)
    by_source: list[dict[str, Any]] = field(default_factory=list)  # per (model, config, source, metric)
    stability: list[dict[str, Any]] = field(default_factory=list)  # per (model, metric)
    recommendations: list[str] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> metric -> dense value
    figures: dict[str, str] = field(default_factory=dict)  # metric -> png file name

    def tables(self) -> dict[str, Any]:
        return {"meta": self.meta, "summary": self.summary, "by_source": self.by_source,
                "stability": self.stability, "recommendations": self.recommendations, "failures": self.failures,
                "baselines": self.baselines}


def _metric_columns(frame: Any) -> list[str]:
    cols = [c for c in frame.columns if c.startswith(("ppl:", "acc:", "acc_norm:"))]
    order = {"ppl": 0, "acc": 1, "acc_norm": 2}
    return sorted(cols, key=lambda c: (order[c.split(":")[0]], c != "acc:avg", c))


def _finite(values: Any) -> list[float]:
    return [float(v) for v in values if v is not None and isinstance(v, int | float) and math.isfinite(v)]


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def build_report(db: str | Path, study: str | None = None) -> Report:
    """Compute every table of the report from the database (no files written)."""
    from scipy.stats import kendalltau

    with ResultStore(db, create=False) as store:
        frame = store.frame(study)
        studies = store.studies()
        counts = store.counts(study)
    if frame.empty:
        raise CalibrantError(f"{db} holds no runs{' of study ' + study if study else ''}; run 'calibrant study run' "
                             "first" + (f" (studies in it: {', '.join(studies)})" if studies else ""))
    title = study or ", ".join(studies)
    rep = Report(title=title, meta={"db": str(db), "studies": studies if study is None else [study],
                                    "runs": counts, "models": sorted(frame["model"].dropna().unique().tolist())})
    ok = frame[frame["status"] == "done"]
    rep.failures = [{"label": r.label, "calibration": r.calibration, "seed": None if r.seed != r.seed else r.seed,
                     "error": r.error} for r in frame[frame["status"] != "done"].itertuples()]
    metrics = _metric_columns(ok)
    for model, mframe in ok.groupby("model"):
        dense = mframe[mframe["method"] == "dense"]
        if not dense.empty:
            rep.baselines[model] = {m: float(dense[m].mean()) for m in metrics if m in dense and dense[m].notna().any()}
        comp = mframe[mframe["method"] != "dense"]
        for label, cframe in comp.groupby("label", sort=True):
            for metric in metrics:
                vals = _finite(cframe[metric])
                if not vals:
                    continue
                per_source = []
                for source, sframe in cframe.groupby(cframe["calib_source"].fillna("(none)")):
                    sv = _finite(sframe[metric])
                    if not sv:
                        continue
                    row = {"model": model, "config": label, "source": source, "metric": metric, "n": len(sv),
                           "mean": sum(sv) / len(sv), "std": _std(sv), "min": min(sv), "max": max(sv)}
                    per_source.append(row)
                rep.by_source.extend(per_source)
                lower = lower_is_better(metric)
                ranked = sorted(per_source, key=lambda r: r["mean"], reverse=not lower)
                seed_stds = [r["std"] for r in per_source if r["n"] > 1]
                rep.summary.append({
                    "model": model, "config": label, "metric": metric, "n": len(vals), "mean": sum(vals) / len(vals),
                    "std": _std(vals), "min": min(vals), "max": max(vals),
                    "best_source": ranked[0]["source"], "best_mean": ranked[0]["mean"],
                    "worst_source": ranked[-1]["source"], "worst_mean": ranked[-1]["mean"],
                    "seed_std": sum(seed_stds) / len(seed_stds) if seed_stds else None,
                    "dense": rep.baselines.get(model, {}).get(metric),
                })
        # ranking stability of the compression configs across calibration sets (source, seed)
        for metric in metrics:
            sets = {}
            for (source, seed), sframe in comp.groupby([comp["calib_source"].fillna("(none)"),
                                                          comp["seed"].fillna(-1)]):
                scores = {lab: float(v) for lab, v in zip(sframe["label"], sframe[metric], strict=True)
                          if v == v and v is not None}
                sets[f"{source}/{int(seed)}"] = scores
            labels = sorted(set.intersection(*(set(s) for s in sets.values()))) if sets else []
            usable = {k: v for k, v in sets.items() if all(lab in v for lab in labels)}
            if len(labels) < 2 or len(usable) < 2:
                continue
            taus = []
            for a, b in itertools.combinations(sorted(usable), 2):
                tau = kendalltau([usable[a][lab] for lab in labels], [usable[b][lab] for lab in labels]).statistic
                if tau == tau:
                    taus.append(float(tau))
            best = [min(labels, key=lambda lab, s=s: s[lab] if lower_is_better(metric) else -s[lab])
                    for s in usable.values()]
            top = max(set(best), key=best.count)
            rep.stability.append({
                "model": model, "metric": metric, "configs": labels, "calibration_sets": len(usable),
                "kendall_tau_mean": sum(taus) / len(taus) if taus else None, "kendall_tau_min": min(taus) if taus else None,
                "most_often_best": top, "best_share": best.count(top) / len(best),
            })
    rep.recommendations = _recommendations(rep)
    return rep


# The float32 arithmetic noise floor of GPTQ/SparseGPT: the relative perplexity spread over lazy-batch
# blocksizes from one fixed calibration set, measured by bench/gptq_precision.py (BENCHMARKS.md).
FLOAT32_SOLVERS = ("gptq", "sparsegpt")
ARITHMETIC_FLOOR_PCT = 2.5  # news 36.41–37.32 over blocksizes 64–256 (wiki 1.4 %), 2026-11-30
ARITHMETIC_FLOOR_SOURCE = "bench/gptq_precision.py, SmolLM2-135M GPTQ W4 g64"


def _float32_solver(label: str) -> bool:
    """A config whose result carries the float32 floor: a GPTQ/SparseGPT recipe not run in float64."""
    methods = label.split(" ", 1)[0].split("+")
    return any(m in FLOAT32_SOLVERS for m in methods) and "precision=float64" not in label


def _recommendations(rep: Report) -> list[str]:
    out = []
    for row in rep.summary:
        if row["metric"] not in ("ppl:wiki", "acc:avg") and not (row["metric"].startswith("ppl:") and
                                                                 not any(r["metric"] == "ppl:wiki" for r in rep.summary)):
            continue
        if row["n"] < 2:
            continue
        what = "perplexity" if row["metric"].startswith("ppl:") else "accuracy"
        corpus = row["metric"].split(":", 1)[1]
        best, worst = row["best_mean"], row["worst_mean"]
        gap = abs(worst - best) / abs(best) * 100 if best else float("nan")
        gap_text = f"{gap:.1f}%" if gap >= 0.1 else f"{gap:.3f}%"
        seed = f"; seed-to-seed std within a source is {row['seed_std']:.3g}" if row["seed_std"] is not None else ""
        word = "lowest" if what == "perplexity" else "highest"
        line = (f"For {row['config']} ({row['model']}), calibration source **{row['best_source']}** gives the {word} "
                f"mean {what} on {corpus} ({best:.4g}); the worst, {row['worst_source']}, is {gap_text} "
                f"{'higher' if what == 'perplexity' else 'lower'} ({worst:.4g}){seed}.")
        if row["seed_std"] is not None and abs(worst - best) < 2 * row["seed_std"]:
            line += " The sources differ by less than two seed standard deviations: the choice hardly matters here."
        if what == "perplexity" and _float32_solver(row["config"]):
            line += (f" Arithmetic floor: float32 {'/'.join(FLOAT32_SOLVERS)} solves alone move perplexity by up to "
                     f"{ARITHMETIC_FLOOR_PCT:g}% (the lazy-batch blocksize; {ARITHMETIC_FLOOR_SOURCE})"
                     + (", so this gap is no evidence of a calibration effect on its own"
                        if gap < ARITHMETIC_FLOOR_PCT else "") + "; precision: float64 removes it.")
        out.append(line)
    for s in rep.stability:
        if s["kendall_tau_mean"] is None or s["metric"] not in ("ppl:wiki", "acc:avg"):
            continue
        verdict = "stable" if s["kendall_tau_mean"] >= 0.8 else "moderately stable" if s["kendall_tau_mean"] >= 0.5 \
            else "unstable"
        out.append(f"Ranking of the {len(s['configs'])} compression configs by {s['metric']} is {verdict} across "
                   f"{s['calibration_sets']} calibration sets (mean Kendall τ {s['kendall_tau_mean']:.2f}, min "
                   f"{s['kendall_tau_min']:.2f}); {s['most_often_best']} is best on {s['best_share']:.0%} of them.")
    return out


# ---------------------------------------------------------------- figures
def _figures(db: str | Path, rep: Report, study: str | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with ResultStore(db, create=False) as store:
        frame = store.frame(study)
    ok = frame[(frame["status"] == "done") & (frame["method"] != "dense")]
    for metric in _metric_columns(ok):
        for model, mframe in ok.groupby("model"):
            labels = sorted(mframe["label"].unique())
            labels = [lab for lab in labels if mframe[mframe["label"] == lab][metric].notna().any()]
            if not labels:
                continue
            fig, axes = plt.subplots(1, len(labels), figsize=(max(4.0, 3.2 * len(labels)), 3.6), squeeze=False)
            for ax, label in zip(axes[0], labels, strict=True):
                cframe = mframe[mframe["label"] == label]
                sources = sorted(cframe["calib_source"].fillna("(none)").unique())
                data = [_finite(cframe[cframe["calib_source"].fillna("(none)") == s][metric]) for s in sources]
                ax.boxplot(data, widths=0.5, showfliers=False)
                for i, vals in enumerate(data):
                    xs = [i + 1 + 0.08 * (j - (len(vals) - 1) / 2) for j in range(len(vals))]
                    ax.scatter(xs, vals, s=14, zorder=3, color="tab:blue", alpha=0.8)
                base = rep.baselines.get(model, {}).get(metric)
                if base is not None:
                    ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="dense")
                    ax.legend(fontsize=7, loc="best")
                ax.set_xticks(range(1, len(sources) + 1), sources, rotation=40, ha="right", fontsize=8)
                ax.set_title(label, fontsize=9)
                ax.set_ylabel(metric, fontsize=8)
                ax.tick_params(axis="y", labelsize=8)
            fig.suptitle(f"{Path(model).name or model}: {metric} over calibration sources (points: seeds)",
                         fontsize=10)
            fig.tight_layout()
            name = f"{metric.replace(':', '_')}__{Path(model).name or 'model'}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            rep.figures[f"{model} {metric}"] = name


# ---------------------------------------------------------------- rendering
def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


SUMMARY_COLS = ["model", "config", "metric", "n", "mean", "std", "min", "max", "best_source", "worst_source",
                "seed_std", "dense"]
SOURCE_COLS = ["model", "config", "source", "metric", "n", "mean", "std", "min", "max"]
STABILITY_COLS = ["model", "metric", "calibration_sets", "kendall_tau_mean", "kendall_tau_min", "most_often_best",
                  "best_share"]


def _md_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return "_none_\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown(rep: Report) -> str:
    parts = [f"# Study report: {rep.title}\n", f"Database `{rep.meta['db']}`; runs: "
             + ", ".join(f"{v} {k}" for k, v in sorted(rep.meta["runs"].items())) + "\n",
             "## Recommendations\n", "\n".join(f"- {r}" for r in rep.recommendations) or "_not enough runs_", "\n",
             "## Summary over calibration sources and seeds\n", _md_table(rep.summary, SUMMARY_COLS),
             "## Ranking stability across calibration sets\n", _md_table(rep.stability, STABILITY_COLS),
             "## Per calibration source (mean ± std over seeds)\n", _md_table(rep.by_source, SOURCE_COLS),
             "## Figures\n"]
    parts += [f"![{k}]({v})\n" for k, v in rep.figures.items()]
    if rep.failures:
        parts += ["## Failed runs\n", _md_table(rep.failures, ["label", "calibration", "seed", "error"])]
    return "\n".join(parts)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}th{background:#f0f0f0}td:nth-child(-n+3){text-align:left}img{max-width:100%;"
        "border:1px solid #eee;margin:0.5em 0}li{margin:0.3em 0}")


def _html(rep: Report, out: Path) -> str:
    def md_inline(text: str) -> str:
        esc = html.escape(text)
        while "**" in esc:
            esc = esc.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
        return esc

    figs = "".join(
        f"<figure><img alt='{html.escape(k)}' src='data:image/png;base64,"
        f"{base64.b64encode((out / v).read_bytes()).decode()}'><figcaption>{html.escape(k)}</figcaption></figure>"
        for k, v in rep.figures.items())
    recs = "".join(f"<li>{md_inline(r)}</li>" for r in rep.recommendations) or "<li>not enough runs</li>"
    fails = ("<h2>Failed runs</h2>" + _html_table(rep.failures, ["label", "calibration", "seed", "error"])
             if rep.failures else "")
    runs = ", ".join(f"{v} {k}" for k, v in sorted(rep.meta["runs"].items()))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>calibrant study: {html.escape(rep.title)}"
            f"</title><style>{_CSS}</style></head><body><h1>Study report: {html.escape(rep.title)}</h1>"
            f"<p>Database <code>{html.escape(rep.meta['db'])}</code>; runs: {html.escape(runs)}</p>"
            f"<h2>Recommendations</h2><ul>{recs}</ul>"
            f"<h2>Summary over calibration sources and seeds</h2>{_html_table(rep.summary, SUMMARY_COLS)}"
            f"<h2>Ranking stability across calibration sets</h2>{_html_table(rep.stability, STABILITY_COLS)}"
            f"<h2>Figures</h2>{figs}"
            f"<h2>Per calibration source (mean ± std over seeds)</h2>{_html_table(rep.by_source, SOURCE_COLS)}"
            f"{fails}</body></html>")


def write_report(db: str | Path, out: str | Path, study: str | None = None) -> Report:
    """Write the HTML, Markdown, PNG figures and tables.json of a study database into ``out``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise CalibrantError(f"{out} exists and is not a calibrant report directory; give a new --out path "
                             "(an existing report directory is replaced)")
    rep = build_report(db, study)
    with atomic_path(out, overwrite=True) as tmp:
        tmp.mkdir(parents=True)
        _figures(db, rep, study, tmp)
        (tmp / "report.md").write_text(_markdown(rep))
        (tmp / "index.html").write_text(_html(rep, tmp))
        (tmp / "tables.json").write_text(json.dumps(rep.tables(), indent=2, default=str) + "\n")
        (tmp / MARKER).write_text("written by calibrant study report\n")
    return rep
