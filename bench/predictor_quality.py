"""How well does the search's predictor rank configurations it was not fitted on? Variants on stored pairs.

    .venv/bin/python bench/predictor_quality.py --pairs bench/results/structured_pairs_0.9.sqlite

Reads a ``pairs.sqlite`` written by ``calibrant search --heldout N --out DIR`` (every measured configuration
with its proxy loss, origin and round), fits each predictor variant on the search's own pairs (the initial
sample and the rounds' picks) and reports Spearman ρ and MAE of log-perplexity on the held-out random
configurations (never fitted on), the K-fold ρ on the fitted pairs and, of the same out-of-fold predictions,
the ρ among the configurations the rounds proposed (the search's neighbourhood of its best, where the
predictor's ranking picks what to measure) — each as mean ± std over
``--seeds`` ensemble seeds, as the search fits them (``--bags`` bootstrap members). Nothing is measured
again: the features are recomputed from the stored configurations and the dense model's importance table
(cached per calibration set), so a variant's figures are comparable with every other's on the same pairs.

Variants: ``before`` — the predictor up to this change (no summary features, every measured loss fitted as
measured, 60 % of the features per tree), once with the monotone constraints as it applied them (misaligned
with the columns: the seven keep aggregates were constrained as removed shares, and the first seven blocks'
removed head shares as keep ratios) and once aligned; then each change alone; all three; all three without the per-block
columns (whole-model features only: 20 instead of 140 for a 30-block model); ``before`` without them.
The single feature ``removed_influence`` (no fitting) is printed for reference.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # name: (summary features, per-block features, clip quantile, colsample)
    "before, as it ran (constraints misaligned)": (False, True, None, 0.6),
    "before": (False, True, None, 0.6),
    "+ clipped targets": (False, True, 0.9, 0.6),
    "+ summary features": (True, True, None, 0.6),
    "+ all features per tree": (False, True, None, 1.0),
    "all three": (True, True, 0.9, 1.0),
    "all three, whole-model features only": (True, False, 0.9, 1.0),
    "before, whole-model features only": (False, False, None, 0.6),
}


def as_it_ran(names: list[str], monotone: list[int]) -> list[int]:
    """The constraints the predictor fitted with before this change: the list was in the order of the names,
    the columns put the per-block removed-score ones before the seven keep aggregates, so the j-th column
    got the j-th name's constraint. Returns, in the names' order, the constraint each feature got."""
    per_block = [k for k in names if re.fullmatch(r"(heads|mlp|removed)_\d+", k)]
    scores = [k for k in names if k.startswith("removed_score_")]
    aggs = ["heads_mean", "heads_min", "mlp_mean", "mlp_min", "kept_attn", "kept_mlp", "kept_total"]
    column_order = per_block + scores + aggs + [k for k in names if k not in {*per_block, *scores, *aggs}]
    return [monotone[column_order.index(k)] for k in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="bench/results/structured_pairs_0.9.sqlite",
                    help="a search's pairs.sqlite (default: pairs measured at commit 607b2d0 by calibrant search "
                    "--budget 0.9 --samples 48 --calibration wiki:32x512 --proxy-tokens 2048 --rounds 6 --top-k 6 "
                    "--heldout 40, stopped during round 6)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default="wiki:32x512", help="the importance scores' calibration set (the "
                    "search's; checked against the database's hash where it records one)")
    ap.add_argument("--quantum", type=int, default=64, help="the search's channel quantum (the database's if it "
                    "records one)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--bags", type=int, default=8)
    args = ap.parse_args()
    if not Path(args.pairs).is_file():
        raise SystemExit(f"no pairs database at {args.pairs}; write one with calibrant search --heldout N --out DIR")

    import transformers

    transformers.utils.logging.set_verbosity_error()
    from calibrant.api import resolve_calibration
    from calibrant.models import load_model
    from calibrant.search import SearchSpace, StructuredConfig
    from calibrant.search.importance import compute_importance
    from calibrant.search.predictor import Ensemble, Featurizer, cross_validate, quality, spearman
    from calibrant.search.structured import ModelShape

    db = sqlite3.connect(f"file:{args.pairs}?mode=ro", uri=True)
    protocol = json.loads(db.execute("SELECT value FROM meta WHERE key = 'protocol'").fetchone()[0])
    rows = db.execute("SELECT config, nll, origin, round FROM pairs ORDER BY id").fetchall()
    configs = [StructuredConfig.from_dict(json.loads(c)) for c, *_ in rows]
    y = np.array([r[1] for r in rows])
    origin = np.array([r[2] for r in rows])
    fit_rows = (origin != "dense") & (origin != "heldout")
    test_rows = origin == "heldout"
    picks = np.array([r[3] is not None and r[3] >= 1 for r in rows])[fit_rows]  # proposed by a round
    created = [c for (c,) in db.execute("SELECT created FROM pairs ORDER BY id")]
    if test_rows.sum() < 3:
        raise SystemExit(f"{args.pairs} holds {test_rows.sum()} held-out configurations; rerun the search with "
                         "--heldout 20 or more")
    lm = load_model(args.model, quiet=True)
    calib_spec = args.calibration
    calib = resolve_calibration(calib_spec, lm.tokenizer, protocol.get("seed", 0), lm.context_length, progress=False)
    if protocol.get("calibration_hash") not in (None, calib.hash):
        raise SystemExit(f"{args.pairs} was searched with calibration hash {protocol['calibration_hash']}, "
                         f"--calibration {calib_spec} gives {calib.hash}: pass the search's spec")
    importance = compute_importance(lm.model, calib.input_ids, protocol["score"], progress=False,
                                    model_hash=lm.model_hash, calibration_hash=calib.hash)
    space = SearchSpace(ModelShape.of(lm.model), quantum=protocol.get("quantum", args.quantum),
                        allow_removal=protocol.get("allow_removal", False))

    print(f"## Predictor variants on stored pairs — {args.pairs}\n")
    print(f"budget {protocol['budget']}, proxy {protocol['proxy_tokens']} tokens of {protocol['proxy_corpus']}, "
          f"importance {protocol['score']} on {calib_spec} (hash {calib.hash}); fitted on {fit_rows.sum()} "
          f"measured configurations (rounds {sorted({r[3] for r in rows if r[3] is not None})}), tested on "
          f"{test_rows.sum()} held-out random ones; ensembles of {args.bags}, seeds 0..{args.seeds - 1}. Pairs measured "
          f"{created[0]} to {created[-1]}.\n")
    print("| variant | held-out ρ | held-out MAE | K-fold ρ | K-fold ρ, rounds' picks | fit s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (summaries, blocks, clip, colsample) in VARIANTS.items():
        feat = Featurizer(space, importance, summaries=summaries, blocks=blocks)
        X = feat(configs)
        monotone = as_it_ran(feat.names, feat.monotone) if "misaligned" in name else feat.monotone
        rho, mae, cv, picks_cv, secs = [], [], [], [], []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            ens = Ensemble("lightgbm", seed, monotone, bags=args.bags, clip=clip, colsample=colsample)
            ens.fit(X[fit_rows], y[fit_rows])
            secs.append(time.perf_counter() - t0)
            q = quality(y[test_rows], ens.predict(X[test_rows]))
            rho.append(q.spearman)
            mae.append(q.mae)
            q_cv, oof = cross_validate(X[fit_rows], y[fit_rows], "lightgbm", seed=seed, monotone=monotone,
                                       clip=clip, colsample=colsample)
            cv.append(q_cv.spearman)
            picks_cv.append(spearman(y[fit_rows][picks], oof[picks]))
        print(f"| {name} | {np.mean(rho):.3f} ± {np.std(rho):.3f} | {np.mean(mae):.3f} ± {np.std(mae):.3f} | "
              f"{np.mean(cv):.3f} ± {np.std(cv):.3f} | {np.mean(picks_cv):.3f} ± {np.std(picks_cv):.3f} | "
              f"{np.mean(secs):.2f} |", flush=True)
    feat = Featurizer(space, importance)
    col = feat.names.index("removed_influence")
    X = feat(configs)
    print(f"| the feature removed_influence alone | {spearman(y[test_rows], X[test_rows, col]):.3f} | – | "
          f"{spearman(y[fit_rows], X[fit_rows, col]):.3f} | {spearman(y[fit_rows][picks], X[fit_rows, col][picks]):.3f} "
          "| – |")


if __name__ == "__main__":
    main()
