"""Predictor-guided search over structured-pruning configurations under a parameter budget.

1. importance once (cached); 2. measure K configurations on a cheap proxy (the last tokens of one or more
held-out splits: their mean NLL, or with ``proxy_metric="kl"`` the mean KL divergence from the dense model's
next-token distribution): the uniform ones, random ones in the budget band, perturbations of the best so far — each a
re-slice of the dense weights, stored in SQLite (round 0); 3. rounds (active learning): fit a bagged,
monotone-constrained predictor (:mod:`calibrant.search.predictor`; K-fold Spearman ρ / MAE), narrow each
block's ranges to the region it likes, evolve (tournament, uniform crossover, mutation, budget repair)
on its optimistic score (mean − ``kappa`` × bag spread), rank by the same score a neighbourhood of the best
measured (one- to three-block steps and crossovers, where the predictor is trusted most), measure the top-k
new configurations for real, taken in turn from the neighbourhood and from the evolution (stored with their
round), refit, and again — until a round's measurements stop improving the best
measured proxy loss by more than ``min_improvement`` nats for ``patience`` rounds, ``rounds`` rounds are
done, or ``max_samples`` configurations are measured; 4. return the best measured configuration — never
one over budget.

The same entry point runs the ablation's baselines at an equal number of measured configurations
(``strategy``): ``random`` (the uniform configurations, then random ones in the budget band: the best
measured) and ``evolution`` (the same evolution scored by measurement instead of the predictor).

One module (over 500 lines) because the arms must share one measurer, one pair store and one initial
sample to be compared at equal cost.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrant import __version__
from calibrant.cache import atomic_path
from calibrant.calibration import CalibrationSet, check_heldout_name, heldout_token_ids
from calibrant.errors import CalibrantError
from calibrant.evaluate.perplexity import perplexity
from calibrant.export.hf import check_output
from calibrant.models.loader import LoadedModel
from calibrant.models.structured import save_structured
from calibrant.search.importance import SCORES, Importance, compute_importance
from calibrant.search.predictor import (
    CLIP_QUANTILE,
    Ensemble,
    Featurizer,
    Predictor,
    Quality,
    cross_validate,
    quality,
)
from calibrant.search.pruner import StructuredPruner, count_params
from calibrant.search.space import Bounds, SearchSpace, check_ratio
from calibrant.search.structured import ModelShape, StructuredConfig

PAIRS_FILE = "pairs.sqlite"
RESULT_FILE = "search.json"


# ----------------------------------------------------------------------------------------------
# measured pairs


@dataclass
class Pair:
    config: StructuredConfig
    kept_fraction: float
    ppl: float
    nll: float
    seconds: float
    origin: str  # dense | uniform | random | perturb | predicted | evolved | heldout

    @property
    def tokens_per_second(self) -> float:
        return math.nan if not self.seconds else self.meta_tokens / self.seconds

    meta_tokens: int = 0
    round: int | None = 0  # the search round that proposed it (0: the initial sample; None: held-out)
    kl: float | None = None  # mean KL(dense ‖ pruned) per proxy token (nats), when the proxy metric is ``kl``
    metric: str = "ppl"  # what the search minimises: ``ppl`` (the proxy NLL) or ``kl``

    @property
    def loss(self) -> float:
        """The proxy loss the search minimises: the mean NLL (``ppl``) or the mean KL from the dense model (``kl``)."""
        if self.metric == "kl":
            if self.kl is None:
                raise CalibrantError("a pair measured without a dense reference has no KL; measure it with --proxy-metric kl")
            return self.kl
        return self.nll


class PairStore:
    """Measured (configuration, proxy perplexity) pairs in SQLite, table ``pairs``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS pairs (id INTEGER PRIMARY KEY, config TEXT NOT NULL, features TEXT, "
            "kept_fraction REAL, ppl REAL, nll REAL, seconds REAL, tokens INTEGER, origin TEXT, created TEXT, "
            "round INTEGER, kl REAL, metric TEXT)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self.db.commit()

    def add(self, pair: Pair, features: list[float] | None = None) -> None:
        self.db.execute(
            "INSERT INTO pairs (config, features, kept_fraction, ppl, nll, seconds, tokens, origin, created, round, kl, "
            "metric) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (pair.config.to_json(), json.dumps(features) if features is not None else None, pair.kept_fraction,
             pair.ppl, pair.nll, pair.seconds, pair.meta_tokens, pair.origin, time.strftime("%Y-%m-%dT%H:%M:%S"),
             pair.round, pair.kl, pair.metric),
        )
        self.db.commit()

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str)))
        self.db.commit()

    def pairs(self) -> list[Pair]:
        rows = self.db.execute(
            "SELECT config, kept_fraction, ppl, nll, seconds, origin, tokens, round, kl, metric FROM pairs ORDER BY id"
        ).fetchall()
        return [Pair(StructuredConfig.from_dict(json.loads(c)), k, p, n, s, o, t, r, kl, m or "ppl")
                for c, k, p, n, s, o, t, r, kl, m in rows]

    def close(self) -> None:
        self.db.close()


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class SearchResult:
    best: Pair
    uniform: Pair | None
    dense: Pair | None
    pairs: list[Pair]
    cv: Quality | None
    heldout: Quality | None
    budget: float
    params: dict[str, int]
    timings: dict[str, float]
    importance: dict[str, Any]
    protocol: dict[str, Any]
    out: Path | None = None
    model: Any = None  # the in-memory model, pruned to ``best``
    pruner: StructuredPruner | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def pd(p: Pair | None) -> dict[str, Any] | None:
            if p is None:
                return None
            return {"config": p.config.to_dict(), "kept_fraction": p.kept_fraction, "proxy_ppl": p.ppl,
                    "proxy_nll": p.nll, "proxy_kl": p.kl, "proxy_loss": p.loss, "seconds": p.seconds,
                    "tokens_per_second": p.tokens_per_second, "origin": p.origin, "round": p.round}

        return {
            "calibrant_version": __version__, "budget": self.budget, "best": pd(self.best),
            "uniform": pd(self.uniform), "dense": pd(self.dense), "n_pairs": len(self.pairs),
            "cv": self.cv.to_dict() if self.cv else None, "heldout": self.heldout.to_dict() if self.heldout else None,
            "params": self.params, "timings": self.timings, "importance": self.importance, "protocol": self.protocol,
            **self.extra,
        }


# ----------------------------------------------------------------------------------------------
# the search


class _Measurer:
    """Measures configurations on the proxy. With ``metric="kl"`` the first configuration measured (the dense
    one) is kept as the reference: its float16 log-probabilities on the proxy tokens (``tokens × vocab × 2``
    bytes: 0.4 GB for 4,096 tokens and a 49k vocabulary)."""

    def __init__(self, pruner: StructuredPruner, space: SearchSpace, proxy: torch.Tensor, seq_len: int,
                 batch_size: int, store: PairStore | None, featurize: Callable | None, metric: str = "ppl"):
        self.pruner, self.space, self.proxy = pruner, space, proxy
        self.seq_len, self.batch_size, self.store, self.featurize = seq_len, batch_size, store, featurize
        self.metric = metric
        self.reference: list[torch.Tensor] | None = None
        self.seen: dict[StructuredConfig, Pair] = {}

    def __call__(self, cfg: StructuredConfig, origin: str, round_no: int | None = 0) -> Pair:
        if cfg in self.seen:
            return self.seen[cfg]
        self.pruner.apply(cfg)
        first = self.metric == "kl" and self.reference is None
        if first and not cfg.is_dense(self.space.shape):  # pragma: no cover - the search measures dense first
            raise AssertionError("the KL proxy needs the dense model measured first")
        r = perplexity(self.pruner.model, self.proxy, seq_len=self.seq_len, batch_size=self.batch_size,
                       progress=False, keep_logprobs=first, reference=self.reference)
        if first:
            self.reference, r.logprobs, r.kl = r.logprobs, None, 0.0
        pair = Pair(cfg, self.space.kept_fraction(cfg), r.ppl, r.nll, r.seconds, origin, r.tokens, round_no, r.kl,
                    self.metric)
        self.seen[cfg] = pair
        if self.store is not None:
            feats = self.featurize([cfg])[0].tolist() if self.featurize else None
            self.store.add(pair, feats)
        return pair


def narrow(space: SearchSpace, predictor: Predictor | Ensemble, featurize: Featurizer, budget: float,
           rng: np.random.Generator, pool: int = 3000, top: float = 0.05) -> tuple[Bounds, list[StructuredConfig]]:
    """Per-block ranges spanned by the top-predicted random configurations (widened by one step).

    Returns the bounds and the top configurations (a starting population for the evolution).
    """
    configs = list({space.random(budget, rng) for _ in range(pool)})
    pred = predictor.predict(featurize(configs))
    order = np.argsort(pred)
    best = [configs[i] for i in order[: max(8, int(len(configs) * top))]]
    enc = [space.encode(c) for c in best]
    g = np.stack([e[0] for e in enc])
    c = np.stack([e[1] for e in enc])
    full = space.full_bounds()
    b = Bounds(np.maximum(g.min(0) - 1, full.g_lo), np.minimum(g.max(0) + 1, full.g_hi),
               np.maximum(c.min(0) - 1, full.c_lo), np.minimum(c.max(0) + 1, full.c_hi))
    if space.params_arrays(b.g_lo, b.c_lo, np.zeros(len(b.g_lo), bool)) > budget * space.total:
        b = full  # the narrowed box cannot reach the budget: keep the full ranges
    return b, best


def neighbourhood(space: SearchSpace, best: list[StructuredConfig], budget: float, rng: np.random.Generator,
                  size: int = 2000, exclude: Any = ()) -> list[StructuredConfig]:
    """Up to ``size`` distinct unmeasured configurations a step from the best measured: mutations of one to three
    blocks and crossovers of two of them, repaired into the budget band (where the predictor, fitted on
    measurements around them, is trusted most)."""
    out: dict[StructuredConfig, None] = {}
    for _ in range(3 * size):
        if len(out) >= size:
            break
        a = best[int(rng.integers(len(best)))]
        if len(best) > 1 and rng.random() < 0.3:
            a = space.crossover(a, best[int(rng.integers(len(best)))], budget, rng)
        c = space.mutate(a, budget, rng, blocks=int(rng.integers(1, 4)))
        if c not in exclude:
            out[c] = None
    return list(out)


def pick_candidates(ranked: list[tuple[float, StructuredConfig]], near: list[StructuredConfig],
                    score: Callable[[list[StructuredConfig]], np.ndarray], k: int,
                    seen: Any) -> list[StructuredConfig]:
    """The ``k`` configurations to measure next: the best-scored (optimistic predicted loss) of the
    neighbourhood of the best measured, alternating with the global evolution's best, each unmeasured and
    distinct."""
    local = [c for _, c in sorted(zip(score(near), near, strict=True), key=lambda t: t[0])] if near else []
    far = [c for _, c in ranked]
    out: list[StructuredConfig] = []
    queues = [local, far]
    turn = 0
    while len(out) < k and any(queues):
        q = queues[turn % 2] or queues[(turn + 1) % 2]
        c = q.pop(0)
        if c not in seen and c not in out:
            out.append(c)
            turn += 1
    return out


def evolve(space: SearchSpace, score: Callable[[list[StructuredConfig]], np.ndarray], budget: float,
           rng: np.random.Generator, start: list[StructuredConfig], bounds: Bounds | None = None,
           population: int = 48, generations: int = 30, elite: int = 8) -> list[tuple[float, StructuredConfig]]:
    """Evolutionary search minimising ``score`` (predicted log-perplexity); returns (score, config) best first.

    Every individual is repaired into the budget band, so no returned configuration is over budget.
    """
    pop = list(dict.fromkeys(space.decode(*space.repair(*space.encode(c), budget, rng, bounds)) for c in start))
    while len(pop) < population:
        pop.append(space.random(budget, rng, bounds))
    scores = dict(zip(pop, score(pop), strict=True))
    for _ in range(generations):
        ranked = sorted(scores.items(), key=lambda kv: kv[1])
        parents = [c for c, _ in ranked[:population]]

        def tournament(parents: list[StructuredConfig] = parents) -> StructuredConfig:
            i, j = rng.integers(len(parents), size=2)
            return parents[min(i, j)]  # parents are sorted: the lower index is the better one

        children = []
        for _ in range(population):
            child = space.crossover(tournament(), tournament(), budget, rng, bounds) if rng.random() < 0.7 \
                else tournament()
            child = space.mutate(child, budget, rng, bounds, blocks=int(rng.integers(1, 4)))
            if child not in scores:
                children.append(child)
        if children:
            scores.update(zip(children, score(children), strict=True))
        keep = sorted(scores.items(), key=lambda kv: kv[1])[: max(population, elite)]
        scores = dict(keep)
    out = sorted(((s, c) for c, s in scores.items()), key=lambda t: t[0])
    for _, c in out:
        if not space.within(c, budget):  # pragma: no cover - repair guarantees it
            raise AssertionError(f"search produced a configuration over budget: {space.kept_fraction(c)}")
    return out


FOLDS = 5  # the predictor's K-fold cross-validation
STRATEGIES = ("predictor", "random", "evolution")
PROXY_METRICS = ("ppl", "kl")
# the proxy's held-out corpora: half wiki, half news — against wiki alone it won more of the ablation's runs
# (BENCHMARKS.md, "Structured search with the wiki+news proxy across seeds")
DEFAULT_PROXY_CORPUS = "wiki,news"


def check_search(budget: float, samples: int, *, score: str = "wanda", rounds: int = 1, top_k: int = 6,
                 proxy_tokens: int = 4096, out: str | Path | None = None, overwrite: bool = False,
                 strategy: str = "predictor", max_samples: int | None = None, patience: int = 2,
                 proxy_metric: str = "ppl", proxy_corpus: str = DEFAULT_PROXY_CORPUS, seq_len: int = 512) -> None:
    """Refuse bad :func:`search_structured` arguments (cheap: nothing is loaded)."""
    corpora = proxy_corpora(proxy_corpus)
    if len(corpora) > 1 and proxy_tokens // len(corpora) < seq_len:
        raise CalibrantError(f"--proxy-tokens {proxy_tokens} gives each of the {len(corpora)} proxy corpora fewer "
                             f"than one window of {seq_len} tokens; use at least {len(corpora) * seq_len}")
    if proxy_metric not in PROXY_METRICS:
        raise CalibrantError(f"unknown proxy metric '{proxy_metric}'; use {' or '.join(PROXY_METRICS)} (kl: the "
                             "divergence of the pruned model's next-token distribution from the dense model's)")
    if not isinstance(samples, int) or samples < max(8, 2 * FOLDS):
        raise CalibrantError(f"--samples must be at least {max(8, 2 * FOLDS)} measured configurations (the "
                             f"predictor's {FOLDS}-fold cross-validation needs two per fold), got {samples}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1 or top_k < 1:
        raise CalibrantError(f"--rounds and --top-k must be at least 1, got rounds={rounds}, top-k={top_k}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise CalibrantError(f"--patience must be at least 1 round without improvement, got {patience}")
    if strategy not in STRATEGIES:
        raise CalibrantError(f"unknown search strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
    if max_samples is not None and max_samples < samples:
        raise CalibrantError(f"--max-samples {max_samples} is below --samples {samples}: the initial sample alone "
                             "would exceed it; raise --max-samples or lower --samples")
    if not 0 < budget <= 1:
        raise CalibrantError(f"the budget must be a keep ratio in (0, 1], got {budget}; e.g. 0.8 keeps 80 % of the "
                             "block parameters")
    if proxy_tokens < 64:
        raise CalibrantError(f"--proxy-tokens {proxy_tokens} is too few; use at least 64 (e.g. 4096)")
    if score not in SCORES:
        raise CalibrantError(f"unknown importance score '{score}'; use {' or '.join(SCORES)}")
    if out is not None:
        check_output(out, overwrite)


def proxy_corpora(spec: str) -> list[str]:
    """The held-out corpora a proxy spec names: ``wiki`` or a comma-separated list such as ``wiki,news``."""
    names = [n.strip() for n in str(spec).split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise CalibrantError(f"proxy corpus '{spec}' must name held-out corpora once each, separated by commas "
                             "(e.g. wiki or wiki,news)")
    for name in names:
        check_heldout_name(name)
    return names


def proxy_token_ids(spec: str, tokenizer: Any, tokens: int, seq_len: int,
                    progress: bool | None = None) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The proxy tokens: the *last* ``tokens`` of one corpus's held-out split, or with several corpora an equal
    share of each, cut to whole windows of ``seq_len`` so no window straddles two corpora (their evaluation
    uses the first tokens, so the two never overlap). Returns the ids and each corpus's held-out metadata."""
    names = proxy_corpora(spec)
    share = tokens if len(names) == 1 else tokens // len(names) // seq_len * seq_len
    parts, metas = [], []
    for name in names:
        ids, meta = heldout_token_ids(name, tokenizer, progress=progress)
        parts.append(ids[-share:])
        metas.append({"corpus": name, "tokens": int(parts[-1].numel()), "checksum": meta.get("checksum")})
    return torch.cat(parts), metas


def _importance(loaded: LoadedModel, calibration: CalibrationSet | None, score: str, batch_size: int,
                progress: bool) -> Importance:
    return compute_importance(
        loaded.model, calibration.input_ids if calibration is not None else None, score, batch_size=batch_size,
        progress=progress, model_hash=loaded.model_hash,
        calibration_hash=calibration.hash if calibration is not None else None,
        token_mask=calibration.token_mask if calibration is not None else None)


def search_structured(
    loaded: LoadedModel,
    calibration: CalibrationSet | None,
    budget: float = 0.8,
    samples: int = 64,
    *,
    score: str = "wanda",
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    proxy_corpus: str = DEFAULT_PROXY_CORPUS,
    proxy_tokens: int = 4096,
    seq_len: int = 512,
    quantum: int = 64,
    allow_removal: bool = False,
    predictor: str = "lightgbm",
    rounds: int = 8,
    top_k: int = 6,
    population: int = 48,
    generations: int = 30,
    heldout_samples: int = 0,
    batch_size: int = 4,
    progress: bool = True,
    save_model: bool = True,
    strategy: str = "predictor",
    max_samples: int | None = None,
    min_improvement: float = 0.001,
    patience: int = 2,
    kappa: float = 1.0,
    bags: int = 8,
    monotone_constraints: bool = True,
    proxy_metric: str = "ppl",
) -> SearchResult:
    """Search per-block structured-pruning configurations of ``loaded`` keeping ``budget`` of block parameters.

    ``calibration`` feeds the ``wanda`` importance score (``magnitude`` needs none; :func:`calibrant.api.
    search_structured` loads the model and builds the set from a spec). The proxy is perplexity on the
    *last* ``proxy_tokens`` tokens of held-out text (so the usual evaluation on the first tokens stays
    separate): by default (``"wiki,news"``) an equal share of whole windows from each corpus listed; one name
    takes them all from that corpus (:func:`proxy_token_ids`). With ``out``, writes ``pairs.sqlite``,
    ``search.json`` and the pruned model (``model/``) atomically. The returned model is left pruned to the best configuration.

    Rounds and their stopping rule, ``strategy`` (``predictor``, or the ``random`` / ``evolution`` baselines)
    and ``max_samples`` (measured configurations in all; default ``samples + rounds · top_k``): see the
    module docstring. ``monotone_constraints`` (LightGBM only) and ``bags`` / ``kappa`` shape the predictor.
    ``proxy_metric``: what the search minimises on the proxy tokens — ``ppl`` (their mean NLL) or ``kl`` (the
    mean KL divergence of the pruned model's next-token distribution from the dense model's; the proxy
    perplexity is recorded either way).
    """
    check_search(budget, samples, score=score, rounds=rounds, top_k=top_k, proxy_tokens=proxy_tokens, out=out,
                 overwrite=overwrite, strategy=strategy, max_samples=max_samples, patience=patience,
                 proxy_metric=proxy_metric, proxy_corpus=proxy_corpus, seq_len=seq_len)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    torch_model = loaded.model
    shape = ModelShape.of(torch_model)  # refuses unsupported families before any work
    space = SearchSpace(shape, quantum=quantum, allow_removal=allow_removal)
    budget = space.check_budget(budget)
    calib = calibration if score == "wanda" else None
    proxy, proxy_meta = proxy_token_ids(proxy_corpus, loaded.tokenizer, proxy_tokens, seq_len,
                                        progress=None if progress else False)
    proxy_corpus = ",".join(m["corpus"] for m in proxy_meta)  # recorded as parsed: "wiki, news" → "wiki,news"
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    importance = _importance(loaded, calib, score, batch_size, progress)
    timings["importance_s"] = time.perf_counter() - t0

    pruner = StructuredPruner(torch_model, importance)
    featurize = Featurizer(space, importance)
    monotone = featurize.monotone if monotone_constraints and predictor == "lightgbm" else None
    rng = np.random.default_rng(seed)
    with atomic_path(out, overwrite=overwrite) if out is not None else contextlib.nullcontext() as tmp:
        store = None
        if tmp is not None:
            tmp.mkdir(parents=True)
            store = PairStore(tmp / PAIRS_FILE)
            store.set_meta("protocol", {"proxy_corpus": proxy_corpus, "proxy_tokens": int(proxy.numel()),
                                        "proxy_metric": proxy_metric,
                                        "seq_len": seq_len, "budget": budget, "score": score, "seed": seed,
                                        "quantum": space.quantum, "allow_removal": allow_removal,
                                        "calibration_hash": calib.hash if calib is not None else None,
                                        "model_hash": loaded.model_hash})
        measure = _Measurer(pruner, space, proxy, seq_len, batch_size, store, featurize, proxy_metric)

        # dense reference on the proxy (also the dense throughput)
        dense = measure(StructuredConfig.dense(shape), "dense")
        del measure.seen[dense.config]

        t0 = time.perf_counter()
        plan = _sample_plan(space, budget, samples, rng)
        bar = tqdm(total=samples, desc="measure configurations", unit="cfg", disable=not progress)
        measured: list[Pair] = []
        for origin, cfg in plan:
            if cfg is None:  # a perturbation of one of the best measured so far
                best = sorted(measured, key=lambda p: p.loss)[:5]
                base = best[int(rng.integers(len(best)))].config
                cfg = space.mutate(base, budget, rng, blocks=int(rng.integers(2, 6)))
                tries = 0
                while cfg in measure.seen and tries < 20:
                    cfg = space.mutate(base, budget, rng, blocks=int(rng.integers(2, 6)))
                    tries += 1
            measured.append(measure(cfg, origin))
            bar.update(1)
            bar.set_postfix(best=f"{min(p.loss for p in measured):.4f}")
        bar.close()
        timings["pairs_s"] = time.perf_counter() - t0

        heldout_pairs: list[Pair] = []
        if heldout_samples:
            t0 = time.perf_counter()
            hrng = np.random.default_rng(seed + 7919)
            for _ in tqdm(range(heldout_samples), desc="held-out configurations", disable=not progress):
                heldout_pairs.append(measure(space.random(budget, hrng), "heldout", None))
            timings["heldout_pairs_s"] = time.perf_counter() - t0

        train = list(measured)
        cv = heldout_q = None
        timings["fit_s"] = timings["search_s"] = timings["reeval_s"] = 0.0
        limit = max_samples if max_samples is not None else samples + rounds * top_k
        history: list[dict[str, Any]] = []
        stopped = "rounds"
        if strategy == "predictor":
            best_loss = min(p.loss for p in train)
            stale = 0
            for round_no in range(1, rounds + 1):
                if len(train) >= limit:
                    stopped = "max_samples"
                    break
                t0 = time.perf_counter()
                X = featurize([p.config for p in train])
                y = np.array([p.loss for p in train])
                cv, _ = cross_validate(X, y, predictor, folds=FOLDS, seed=seed, monotone=monotone)
                model_p = Ensemble(predictor, seed + round_no, monotone, bags=bags).fit(X, y)
                if heldout_pairs:
                    heldout_q = quality(np.array([p.loss for p in heldout_pairs]),
                                        model_p.predict(featurize([p.config for p in heldout_pairs])))
                timings["fit_s"] += time.perf_counter() - t0

                t0 = time.perf_counter()
                bounds, top = narrow(space, model_p, featurize, budget, rng)
                leaders = [p.config for p in sorted(train, key=lambda p: p.loss)[:8]]
                start = leaders + top

                def optimistic(cfgs: list[StructuredConfig], m: Ensemble = model_p) -> np.ndarray:
                    all_ = m.all(featurize(cfgs))
                    return all_.mean(0) - kappa * all_.std(0)

                ranked = evolve(space, optimistic, budget, rng, start, bounds, population=population,
                                generations=generations)
                near = neighbourhood(space, leaders, budget, rng, exclude=measure.seen)
                timings["search_s"] += time.perf_counter() - t0

                t0 = time.perf_counter()
                fresh = pick_candidates(ranked, near, optimistic, min(top_k, limit - len(train)), measure.seen)
                new = [measure(cfg, "predicted", round_no)
                       for cfg in tqdm(fresh, desc=f"round {round_no}: measure top {len(fresh)}", disable=not progress)]
                train += new
                timings["reeval_s"] += time.perf_counter() - t0
                round_best = min((p.loss for p in new), default=math.inf)
                improved = round_best < best_loss - min_improvement
                history.append({"round": round_no, "measured": len(new), "round_best_loss": round_best,
                                "best_loss": min(best_loss, round_best), "improved": improved,
                                "cv_spearman": cv.spearman})
                best_loss = min(best_loss, round_best)
                stale = 0 if improved else stale + 1
                if stale >= patience:
                    stopped = "no improvement"
                    break
        else:  # the ablation's baselines, at the same number of measured configurations
            t0 = time.perf_counter()
            more = max(0, limit - len(train))
            extra = _random_arm(space, measure, budget, rng, more, top_k) if strategy == "random" else \
                _evolution_arm(space, measure, budget, rng, train, more, top_k)
            train += extra
            timings["reeval_s"] += time.perf_counter() - t0
            stopped = "max_samples"
            X = featurize([p.config for p in train])
            cv, _ = cross_validate(X, np.array([p.loss for p in train]), predictor, folds=FOLDS, seed=seed,
                                   monotone=monotone)

        candidates = [p for p in train if space.within(p.config, budget)]
        best = min(candidates, key=lambda p: p.loss)
        uniforms = [p for p in measured if p.origin == "uniform"]
        uniform = min(uniforms, key=lambda p: p.loss) if uniforms else None

        pruner.apply(best.config)
        params = {"dense_total": 0, "pruned_total": count_params(torch_model),
                  "dense_blocks": space.total, "pruned_blocks": best.config.params(shape)}
        params["dense_total"] = params["pruned_total"] - params["pruned_blocks"] + params["dense_blocks"]
        result = SearchResult(
            best, uniform, dense, train + heldout_pairs, cv, heldout_q, budget, params, timings,
            {k: v for k, v in importance.meta.items()},
            {"proxy": {"corpus": proxy_corpus, "tokens": int(proxy.numel()), "slice": "last tokens of held-out",
                       "seq_len": seq_len, "checksum": proxy_meta[0]["checksum"] if len(proxy_meta) == 1 else None,
                       "parts": proxy_meta, "metric": proxy_metric},
             "calibration": ({**calib.provenance, "hash": calib.hash} if calib is not None else None),
             "score": score, "seed": seed, "samples": samples, "quantum": space.quantum,
             "allow_removal": allow_removal, "predictor": predictor, "rounds": rounds, "top_k": top_k,
             "strategy": strategy, "max_samples": limit, "min_improvement": min_improvement, "patience": patience,
             "kappa": kappa, "bags": bags, "monotone": monotone is not None, "clip_quantile": CLIP_QUANTILE,
             "model": {"spec": loaded.spec, "hash": loaded.model_hash}},
            model=torch_model, pruner=pruner,
            extra={"rounds": history, "stopped": stopped, "measured": len(train),
                   "winner": {"origin": best.origin, "round": best.round}},
        )
        if tmp is not None:
            t0 = time.perf_counter()
            (tmp / RESULT_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
            if save_model:
                save_structured(torch_model, loaded.tokenizer, tmp / "model",
                                {"search": {"budget": budget, "proxy_ppl": best.ppl,
                                            "kept_fraction": best.kept_fraction},
                                 "base_model": {"spec": loaded.spec, "hash": loaded.model_hash},
                                 "calibration": result.protocol["calibration"]})
            if store is not None:
                store.close()
            timings["save_s"] = time.perf_counter() - t0
    if out is not None:
        result.out = Path(out)
    return result


def _random_arm(space: SearchSpace, measure: _Measurer, budget: float, rng: np.random.Generator, n: int,
                per_round: int) -> list[Pair]:
    """``n`` more random configurations in the budget band, measured (rounds of ``per_round`` numbered)."""
    out: list[Pair] = []
    tries = 0
    while len(out) < n and tries < 50 * (n + 1):
        cfg = space.random(budget, rng)
        tries += 1
        if cfg not in measure.seen:
            out.append(measure(cfg, "random", 1 + len(out) // per_round))
    return out


def _evolution_arm(space: SearchSpace, measure: _Measurer, budget: float, rng: np.random.Generator,
                   pool: list[Pair], n: int, per_round: int, population: int = 8) -> list[Pair]:
    """``n`` more configurations bred (tournament, crossover, mutation, budget repair) from the best measured
    so far and each measured: evolution scored by measurement instead of the predictor."""
    out: list[Pair] = []
    tries = 0
    while len(out) < n and tries < 50 * (n + 1):
        tries += 1
        parents = [p.config for p in sorted(pool + out, key=lambda p: p.loss)[:population]]

        def pick(parents: list[StructuredConfig] = parents) -> StructuredConfig:
            i, j = rng.integers(len(parents), size=2)
            return parents[min(i, j)]  # sorted: the lower index is the better one

        child = space.crossover(pick(), pick(), budget, rng) if rng.random() < 0.7 else pick()
        child = space.mutate(child, budget, rng, blocks=int(rng.integers(1, 4)))
        if child not in measure.seen:
            out.append(measure(child, "evolved", 1 + len(out) // per_round))
    return out


def _sample_plan(space: SearchSpace, budget: float, samples: int,
                 rng: np.random.Generator) -> list[tuple[str, StructuredConfig | None]]:
    """What to measure: the uniform configurations, ~55 % random ones, the rest perturbations (None = decided
    later from the best measured so far)."""
    plan: list[tuple[str, StructuredConfig | None]] = [("uniform", c) for c in space.uniform(budget)][:samples]
    seen = {c for _, c in plan}
    n_random = max(1, int(round((samples - len(plan)) * 0.55)))
    target = len(plan) + n_random
    tries = 0
    while len(plan) < target and tries < 50 * samples:
        c = space.random(budget, rng)
        tries += 1
        if c not in seen:
            seen.add(c)
            plan.append(("random", c))
    while len(plan) < samples:
        plan.append(("perturb", None))
    return plan


def check_prune(heads: float, mlp: float, *, score: str = "wanda", out: str | Path | None = None,
                overwrite: bool = False) -> None:
    """Refuse bad :func:`prune_structured` arguments (cheap: nothing is loaded)."""
    check_ratio("--keep heads", heads)
    check_ratio("--keep mlp", mlp)
    if score not in SCORES:
        raise CalibrantError(f"unknown importance score '{score}'; use {' or '.join(SCORES)}")
    if out is not None:
        check_output(out, overwrite)


def prune_structured(
    loaded: LoadedModel,
    calibration: CalibrationSet | None,
    heads: float,
    mlp: float,
    *,
    score: str = "wanda",
    quantum: int = 64,
    out: str | Path | None = None,
    overwrite: bool = False,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[LoadedModel, StructuredConfig, Path | None]:
    """Prune every block of ``loaded`` to the same keep ratios (``heads`` of KV groups, ``mlp`` of channels),
    no search; ``calibration`` feeds the ``wanda`` score.

    Returns (the loaded model, now pruned; the configuration; the output directory if ``out``).
    """
    check_prune(heads, mlp, score=score, out=out, overwrite=overwrite)
    shape = ModelShape.of(loaded.model)
    space = SearchSpace(shape, quantum=quantum)
    cfg = space.from_ratios(heads, mlp)
    importance = _importance(loaded, calibration if score == "wanda" else None, score, batch_size, progress)
    StructuredPruner(loaded.model, importance).apply(cfg)
    path = None
    if out is not None:
        path = save_structured(loaded.model, loaded.tokenizer, out,
                               {"structured_keep": {"heads": heads, "mlp": mlp, "score": score},
                                "kept_fraction": space.kept_fraction(cfg),
                                "base_model": {"spec": loaded.spec, "hash": loaded.model_hash}},
                               overwrite=overwrite)
    return loaded, cfg, path
