"""An accuracy predictor over structured configurations: features → log-perplexity, with K-fold quality.

Features are the per-block keep ratios (KV groups, MLP channels, removal) plus simple aggregates:
mean and min per component, the kept fraction of attention, MLP and all block parameters; with an
importance table also, per block and component, the share of that block's importance score the
configuration removes, the fraction of the whole score each component keeps, the removed share
weighted by each block's influence (1 − cos(input, output), the block's position in the residual stream),
and whole-model summaries of the removed shares (sum, sum of squares and maximum over blocks, per component
and for both, and the log of the product of the kept shares): with a few dozen measured configurations
trees cannot learn to add 2n per-block columns up themselves (``bench/predictor_quality.py``).
``Featurizer(blocks=False)`` leaves the per-block columns out.

The model is a LightGBM regressor (``lightgbm``) or scikit-learn's random forest (``forest``), fitted on
the measured losses clipped at their 90th percentile (see :class:`Predictor`). LightGBM is fitted with
**monotone constraints** where they are true of the proxy: keeping more of any block never predicts a
higher loss (keep features −1, removed-score features +1). :class:`Ensemble` bags several predictors
(bootstrap resamples, their own seeds) for a mean and a spread, the uncertainty the search uses to choose
what to measure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from calibrant.errors import CalibrantError
from calibrant.search.importance import Importance
from calibrant.search.space import SearchSpace
from calibrant.search.structured import StructuredConfig

PREDICTORS = ("lightgbm", "forest")
CLIP_QUANTILE = 0.9  # measured losses above this quantile are fitted as this quantile (see Predictor)
KEPT_FLOOR = 1e-3  # log(kept share) of a block's component: a fully removed one counts as 0.1 %


class Featurizer:
    """Maps configurations to a feature matrix; importance tables are precomputed once."""

    def __init__(self, space: SearchSpace, importance: Importance | None = None, summaries: bool = True,
                 blocks: bool = True):
        self.space = space
        self.summaries = summaries and importance is not None
        s = space.shape
        n = s.n_blocks
        self.names = [f"heads_{i}" for i in range(n)] + [f"mlp_{i}" for i in range(n)]
        if space.allow_removal:
            self.names += [f"removed_{i}" for i in range(n)]
        self.names += ["heads_mean", "heads_min", "mlp_mean", "mlp_min", "kept_attn", "kept_mlp", "kept_total"]
        # +1: more of it never lowers the loss; -1: more of it never raises it (LightGBM's monotone constraints)
        self.monotone = [-1] * (2 * n) + ([1] * n if space.allow_removal else []) + [-1] * 7
        self._g_cum = self._c_cum = None
        if importance is not None:
            # cumulative kept score of the top-k units, normalised by the whole model's score per component
            gs = [np.concatenate([[0.0], np.cumsum(np.sort(x.numpy())[::-1])]) for x in importance.groups]
            cs = [np.concatenate([[0.0], np.cumsum(np.sort(x.numpy())[::-1])]) for x in importance.channels]
            self._g_cum = np.stack(gs) / sum(x[-1] for x in gs)
            self._c_cum = np.stack(cs) / sum(x[-1] for x in cs)
            self._g_block = np.stack([x / max(x[-1], 1e-300) for x in gs])  # per block, normalised by the block
            self._c_block = np.stack([x / max(x[-1], 1e-300) for x in cs])
            influence = importance.block_influence.numpy().astype(float)
            self._influence = np.nan_to_num(influence, nan=1.0) if influence.size == n else np.ones(n)
            self.names += [f"removed_score_heads_{i}" for i in range(n)] + [f"removed_score_mlp_{i}" for i in range(n)]
            self.names += ["score_attn", "score_mlp", "removed_influence"]
            self.monotone += [1] * (2 * n) + [-1, -1, 1]
        if self.summaries:
            # whole-model summaries of the removed shares: few samples cannot teach trees to add 2n columns up
            self.names += [f"removed_{k}_{c}" for c in ("heads", "mlp") for k in ("sum", "sumsq", "max")]
            self.names += ["removed_max_block", "removed_sumsq_block", "log_kept_score_heads", "log_kept_score_mlp"]
            self.monotone += [1] * 8 + [-1, -1]
        self._all_names = list(self.names)
        self._columns = None
        if not blocks:  # the whole-model columns only: the per-block ones (names ending in _<block>) left out
            self._columns = [i for i, name in enumerate(self.names) if not re.search(r"_\d+$", name)]
            self.names = [self.names[i] for i in self._columns]
            self.monotone = [self.monotone[i] for i in self._columns]

    def __call__(self, configs: list[StructuredConfig]) -> np.ndarray:
        s = self.space.shape
        n = s.n_blocks
        g = np.array([c.kv_groups for c in configs], dtype=float).reshape(-1, n)
        ch = np.array([c.mlp_channels for c in configs], dtype=float).reshape(-1, n)
        rm = np.array([c.removed for c in configs], dtype=bool).reshape(-1, n)
        hr = np.where(rm, 0.0, g / s.n_kv)
        mr = np.where(rm, 0.0, ch / s.intermediate)
        attn = np.where(rm, 0, s.per_group * g).sum(1) / (s.per_group * s.n_kv * n)
        mlp = np.where(rm, 0, s.per_channel * ch).sum(1) / (s.per_channel * s.intermediate * n)
        total = np.array([self.space.kept_fraction(c) for c in configs])
        # in the order of self.names (and of self.monotone): [n_configs, k] blocks of columns
        parts = [hr, mr] + ([rm.astype(float)] if self.space.allow_removal else [])
        parts += [np.column_stack([hr.mean(1), hr.min(1), mr.mean(1), mr.min(1), attn, mlp, total])]
        if self._g_cum is not None:
            rows = np.arange(n)
            gi, ci = g.astype(int), ch.astype(int)
            removed_g = np.where(rm, 1.0, 1.0 - self._g_block[rows, gi])
            removed_c = np.where(rm, 1.0, 1.0 - self._c_block[rows, ci])
            both = removed_g + removed_c
            aggs = [np.where(rm, 0, self._g_cum[rows, gi]).sum(1), np.where(rm, 0, self._c_cum[rows, ci]).sum(1),
                    (both * self._influence).sum(1) / max(self._influence.sum(), 1e-12)]
            if self.summaries:
                for r in (removed_g, removed_c):
                    aggs += [r.sum(1), (r * r).sum(1), r.max(1)]
                aggs += [both.max(1), (both * both).sum(1)]
                aggs += [np.log(KEPT_FLOOR + 1.0 - r).sum(1) for r in (removed_g, removed_c)]
            parts += [removed_g, removed_c, np.column_stack(aggs)]
        X = np.concatenate(parts, axis=1)
        if X.shape[1] != len(self._all_names):  # pragma: no cover - names, constraints and columns are built together
            raise AssertionError(f"{X.shape[1]} feature columns for {len(self._all_names)} names")
        return X if self._columns is None else X[:, self._columns]


class Predictor:
    """A regressor of log-perplexity; ``kind`` is ``lightgbm`` (default) or ``forest``; ``monotone``: one
    of -1 / 0 / +1 per feature (LightGBM only; see the module docstring).

    ``clip``: measured losses above this quantile of the training losses are fitted as that quantile (None:
    as measured). A random sample holds a few catastrophic configurations (a block cut to a fifth: perplexity
    in the hundreds), and a squared-error fit spends its few splits on telling those apart; the search only
    needs them ranked as bad, and the ranking among the good ones is what picks the winner.
    ``colsample``: LightGBM's fraction of features each tree may split on."""

    def __init__(self, kind: str = "lightgbm", seed: int = 0, monotone: list[int] | None = None,
                 clip: float | None = CLIP_QUANTILE, colsample: float = 1.0):
        if kind not in PREDICTORS:
            raise CalibrantError(f"unknown predictor '{kind}'; use one of {', '.join(PREDICTORS)}")
        if clip is not None and not 0 < clip <= 1:
            raise CalibrantError(f"the predictor's clip quantile must be in (0, 1], got {clip}")
        self.kind = kind
        self.seed = seed
        self.monotone = monotone
        self.clip = clip
        self.colsample = colsample
        self.model = None

    def _make(self, n: int):
        if self.kind == "forest":
            from sklearn.ensemble import RandomForestRegressor

            return RandomForestRegressor(n_estimators=300, min_samples_leaf=2, max_features=0.5,
                                         random_state=self.seed, n_jobs=1)
        import lightgbm

        # small data: shallow trees, many small steps, leaves allowed to hold few samples
        return lightgbm.LGBMRegressor(
            n_estimators=400, learning_rate=0.03, num_leaves=8, max_depth=4, min_child_samples=max(3, n // 20),
            subsample=0.8, subsample_freq=1, colsample_bytree=self.colsample, reg_lambda=1.0, min_split_gain=0.0,
            random_state=self.seed, n_jobs=1, verbose=-1, deterministic=True, force_col_wise=True,
            **({"monotone_constraints": list(self.monotone), "monotone_constraints_method": "advanced"}
               if self.monotone is not None else {}),
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> Predictor:
        if self.monotone is not None and len(self.monotone) != X.shape[1]:
            raise ValueError(f"{len(self.monotone)} monotone constraints for {X.shape[1]} features")
        if len(y) < 4:
            raise CalibrantError(f"the predictor needs at least 4 measured configurations, got {len(y)}; raise "
                                 "--samples")
        y = np.asarray(y, dtype=float)
        if not np.isfinite(y).all():
            raise CalibrantError("a measured loss is not finite (NaN or inf); the proxy diverged on a configuration")
        if self.clip is not None:
            y = np.minimum(y, np.quantile(y, self.clip))
        self.model = self._make(len(y))
        self.model.fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("fit the predictor first")
        return np.asarray(self.model.predict(X), dtype=float)

    def importances(self) -> np.ndarray:
        return np.asarray(self.model.feature_importances_, dtype=float)


class Ensemble:
    """``bags`` predictors, each fitted on a bootstrap resample with its own seed: :meth:`predict` is their
    mean, :meth:`spread` their standard deviation (high where the measured pairs say little)."""

    def __init__(self, kind: str = "lightgbm", seed: int = 0, monotone: list[int] | None = None, bags: int = 8,
                 clip: float | None = CLIP_QUANTILE, colsample: float = 1.0):
        self.members = [Predictor(kind, seed + 1000 * b, monotone, clip, colsample) for b in range(bags)]
        self.seed = seed

    def fit(self, X: np.ndarray, y: np.ndarray) -> Ensemble:
        rng = np.random.default_rng(self.seed)
        for b, member in enumerate(self.members):
            rows = np.arange(len(y)) if b == 0 else rng.integers(0, len(y), len(y))  # member 0: all the data
            member.fit(X[rows], y[rows])
        return self

    def all(self, X: np.ndarray) -> np.ndarray:
        return np.stack([m.predict(X) for m in self.members])

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.all(X).mean(0)

    def spread(self, X: np.ndarray) -> np.ndarray:
        return self.all(X).std(0)


@dataclass
class Quality:
    spearman: float
    mae: float  # mean absolute error of log-perplexity
    n: int

    def to_dict(self) -> dict[str, float]:
        return {"spearman": self.spearman, "mae": self.mae, "n": self.n}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def quality(y: np.ndarray, pred: np.ndarray) -> Quality:
    return Quality(spearman(y, pred), float(np.mean(np.abs(y - pred))), len(y))


def cross_validate(X: np.ndarray, y: np.ndarray, kind: str = "lightgbm", folds: int = 5,
                   seed: int = 0, monotone: list[int] | None = None, clip: float | None = CLIP_QUANTILE,
                   colsample: float = 1.0) -> tuple[Quality, np.ndarray]:
    """Out-of-fold predictions of a K-fold split and their Spearman ρ / MAE against ``y``."""
    from sklearn.model_selection import KFold

    folds = min(folds, len(y))
    if folds < 2:
        raise CalibrantError("cross-validation needs at least 2 measured configurations")
    pred = np.empty(len(y))
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(X):
        pred[test] = Predictor(kind, seed, monotone, clip, colsample).fit(X[train], y[train]).predict(X[test])
    return quality(y, pred), pred
