"""``calibrant search``: predictor-guided structured pruning under a parameter budget (or fixed keep ratios)."""

from __future__ import annotations

import argparse
from typing import Any

from calibrant.argtypes import positive_int
from calibrant.errors import CalibrantError
from calibrant.tables import table


def _keep(value: str) -> tuple[float, float]:
    parts = [p.strip() for p in value.split(",")]
    try:
        if len(parts) == 1:
            return float(parts[0]), float(parts[0])
        if len(parts) == 2:
            return float(parts[0]), float(parts[1])
    except ValueError:
        pass
    raise CalibrantError(f"--keep takes HEADS,MLP keep ratios in (0, 1] (e.g. 0.67,0.75), got '{value}'")


def cmd_search(args: argparse.Namespace) -> int:
    from calibrant.api import prune_structured, search_structured

    if args.keep is not None:
        heads, mlp = _keep(args.keep)
        loaded, cfg, out = prune_structured(
            args.model, heads, mlp, calibration=args.calibration, score=args.score, seed=args.seed,
            quantum=args.quantum, out=args.out, overwrite=args.overwrite, batch_size=args.batch_size,
            progress=not args.quiet,
        )
        print(f"pruned every block to {cfg.kv_groups[0]} KV groups and {cfg.mlp_channels[0]} MLP channels "
              f"({args.score} importance)")
        if out is not None:
            print(f"saved: {out}")
        return 0
    from calibrant.search.search import DEFAULT_PROXY_CORPUS

    res = search_structured(
        args.model, args.budget, args.samples, calibration=args.calibration, score=args.score, seed=args.seed,
        out=args.out, overwrite=args.overwrite, proxy_corpus=args.proxy_corpus or DEFAULT_PROXY_CORPUS,
        proxy_tokens=args.proxy_tokens,
        quantum=args.quantum, allow_removal=args.allow_removal, predictor=args.predictor, rounds=args.rounds,
        top_k=args.top_k, heldout_samples=args.heldout, batch_size=args.batch_size, progress=not args.quiet,
        strategy=args.strategy, max_samples=args.max_samples, min_improvement=args.min_improvement,
        patience=args.patience, proxy_metric=args.proxy_metric,
    )
    rows: list[list[Any]] = []
    for label, p in (("dense", res.dense), ("uniform (best)", res.uniform), ("searched", res.best)):
        if p is not None:
            rows.append([label, f"{p.kept_fraction:.4f}", f"{p.ppl:.3f}", f"{p.tokens_per_second:.0f}", p.origin])
    if args.proxy_metric == "kl":
        for row, p in zip(rows, [q for q in (res.dense, res.uniform, res.best) if q is not None], strict=True):
            row.insert(3, f"{p.kl:.4f}")
    print(table(rows, ["configuration", "kept block params", "proxy ppl"]
                + (["proxy KL"] if args.proxy_metric == "kl" else []) + ["tok/s", "found by"]))
    cv = res.cv
    ho = f"; held-out configurations ρ {res.heldout.spearman:.3f}" if res.heldout else ""
    print(f"predictor ({args.predictor}): {cv.n} pairs, K-fold Spearman ρ {cv.spearman:.3f}, "
          f"MAE({'KL' if args.proxy_metric == 'kl' else 'log ppl'}) "
          f"{cv.mae:.4f}{ho}")
    rounds = res.extra.get("rounds") or []
    print(f"{args.strategy}: {res.extra['measured']} configurations measured"
          + (f" over {len(rounds)} round(s), stopped by {res.extra['stopped']}" if rounds else "")
          + f"; the winner came from {res.best.origin} (round {res.best.round})")
    p = res.params
    print(f"parameters: {p['dense_total']:,} → {p['pruned_total']:,} (blocks {p['dense_blocks']:,} → "
          f"{p['pruned_blocks']:,})")
    t = res.timings
    print("time: " + ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items()))
    print(f"best: KV groups {list(res.best.config.kv_groups)}; MLP channels {list(res.best.config.mlp_channels)}"
          + (f"; removed blocks {res.best.config.to_dict()['removed']}" if any(res.best.config.removed) else ""))
    if res.out is not None:
        print(f"saved: {res.out} (pairs.sqlite, search.json, model/)")
    return 0


def add_search_parser(sub: Any) -> None:
    s = sub.add_parser("search", help="structured pruning (KV groups, MLP channels, blocks): predictor-guided "
                                      "search under a parameter budget")
    s.add_argument("--model", default="smollm2-135m", help="alias, HF directory, .gguf file or hub id")
    s.add_argument("--budget", type=float, default=0.8, help="kept fraction of the decoder blocks' parameters, in "
                                                            "(0, 1] (0.8)")
    s.add_argument("--samples", type=positive_int, default=64, help="configurations measured to train the predictor (64)")
    s.add_argument("--calibration", default="wiki:32x512", help="calibration spec for the importance scores")
    s.add_argument("--score", choices=["wanda", "magnitude"], default="wanda", help="importance score")
    s.add_argument("--out", default=None, help="output directory: pairs.sqlite, search.json, model/")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s.add_argument("--keep", default=None, metavar="HEADS,MLP",
                   help="no search: prune every block to these keep ratios of KV groups and MLP channels")
    s.add_argument("--proxy-corpus", default=None,
                   help="held-out corpora of the proxy, comma-separated, each giving an equal share of whole windows "
                        "of the last --proxy-tokens tokens of its held-out split, or one (default: wiki,news)")
    s.add_argument("--proxy-tokens", type=positive_int, default=4096, help="proxy tokens (last ones of the held-out split)")
    s.add_argument("--proxy-metric", choices=["ppl", "kl"], default="ppl",
                   help="what the search minimises on the proxy tokens: ppl (their perplexity) or kl (the mean KL "
                        "divergence from the dense model's next-token distribution; holds the dense log-probabilities "
                        "of the proxy tokens in memory, tokens x vocab x 2 bytes)")
    s.add_argument("--quantum", type=positive_int, default=64, help="MLP channels are kept in multiples of this")
    s.add_argument("--allow-removal", action="store_true", help="let the search remove whole blocks")
    s.add_argument("--predictor", choices=["lightgbm", "forest"], default="lightgbm")
    s.add_argument("--rounds", type=positive_int, default=8,
                   help="at most this many search rounds; each refits the predictor on everything measured, searches "
                        "and measures its top-k (8)")
    s.add_argument("--top-k", type=positive_int, default=6, help="predicted-best configurations measured for real per round")
    s.add_argument("--min-improvement", type=float, default=0.001,
                   help="a round improves the search when it lowers the best measured proxy loss by more than this "
                        "(nats; 0.001)")
    s.add_argument("--patience", type=int, default=2,
                   help="rounds in a row without such an improvement before the search stops (2)")
    s.add_argument("--max-samples", type=positive_int, default=None,
                   help="measured configurations in all, the initial sample included (default samples + rounds x top-k)")
    s.add_argument("--strategy", choices=["predictor", "random", "evolution"], default="predictor",
                   help="predictor (default), or a baseline at equal measured cost: random (best of random "
                        "configurations) or evolution (scored by measurement)")
    s.add_argument("--heldout", type=int, default=0, help="extra random configurations to test the predictor on")
    s.add_argument("--batch-size", type=positive_int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_search)
