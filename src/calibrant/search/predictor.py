"""An accuracy predictor over structured configurations: features → log-perplexity, with K-fold quality.

Features are the per-block keep ratios (KV groups, MLP channels, removal) plus simple aggregates:
mean and min per component, the kept fraction of attention, MLP and all block parameters, and the
fraction of the importance score each component keeps (Σ kept scores / Σ scores, over the blocks).
The model is a LightGBM regressor (``lightgbm``) or scikit-learn's random forest (``forest``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from calibrant.errors import CalibrantError
from calibrant.search.importance import Importance
from calibrant.search.space import SearchSpace
from calibrant.search.structured import StructuredConfig

PREDICTORS = ("lightgbm", "forest")


class Featurizer:
    """Maps configurations to a feature matrix; importance tables are precomputed once."""

    def __init__(self, space: SearchSpace, importance: Importance | None = None):
        self.space = space
        s = space.shape
        n = s.n_blocks
        self.names = [f"heads_{i}" for i in range(n)] + [f"mlp_{i}" for i in range(n)]
        if space.allow_removal:
            self.names += [f"removed_{i}" for i in range(n)]
        self.names += ["heads_mean", "heads_min", "mlp_mean", "mlp_min", "kept_attn", "kept_mlp", "kept_total"]
        self._g_cum = self._c_cum = None
        if importance is not None:
            # cumulative kept score of the top-k units, normalised by the whole model's score per component
            gs = [np.concatenate([[0.0], np.cumsum(np.sort(x.numpy())[::-1])]) for x in importance.groups]
            cs = [np.concatenate([[0.0], np.cumsum(np.sort(x.numpy())[::-1])]) for x in importance.channels]
            self._g_cum = np.stack(gs) / sum(x[-1] for x in gs)
            self._c_cum = np.stack(cs) / sum(x[-1] for x in cs)
            self.names += ["score_attn", "score_mlp"]

    def __call__(self, configs: list[StructuredConfig]) -> np.ndarray:
        s = self.space.shape
        n = s.n_blocks
        g = np.array([c.kv_groups for c in configs], dtype=float).reshape(-1, n)
        ch = np.array([c.mlp_channels for c in configs], dtype=float).reshape(-1, n)
        rm = np.array([c.removed for c in configs], dtype=bool).reshape(-1, n)
        hr = np.where(rm, 0.0, g / s.n_kv)
        mr = np.where(rm, 0.0, ch / s.intermediate)
        cols = [hr, mr] + ([rm.astype(float)] if self.space.allow_removal else [])
        attn = np.where(rm, 0, s.per_group * g).sum(1) / (s.per_group * s.n_kv * n)
        mlp = np.where(rm, 0, s.per_channel * ch).sum(1) / (s.per_channel * s.intermediate * n)
        total = np.array([self.space.kept_fraction(c) for c in configs])
        aggs = [hr.mean(1), hr.min(1), mr.mean(1), mr.min(1), attn, mlp, total]
        if self._g_cum is not None:
            rows = np.arange(n)
            gi, ci = g.astype(int), ch.astype(int)
            aggs.append(np.where(rm, 0, self._g_cum[rows, gi]).sum(1))
            aggs.append(np.where(rm, 0, self._c_cum[rows, ci]).sum(1))
        return np.column_stack([*cols, *[a[:, None] for a in aggs]])


class Predictor:
    """A regressor of log-perplexity; ``kind`` is ``lightgbm`` (default) or ``forest``."""

    def __init__(self, kind: str = "lightgbm", seed: int = 0):
        if kind not in PREDICTORS:
            raise CalibrantError(f"unknown predictor '{kind}'; use one of {', '.join(PREDICTORS)}")
        self.kind = kind
        self.seed = seed
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
            subsample=0.8, subsample_freq=1, colsample_bytree=0.6, reg_lambda=1.0, min_split_gain=0.0,
            random_state=self.seed, n_jobs=1, verbose=-1, deterministic=True, force_col_wise=True,
        )

    def fit(self, X: np.ndarray, y: np.ndarray) -> Predictor:
        if len(y) < 4:
            raise CalibrantError(f"the predictor needs at least 4 measured configurations, got {len(y)}; raise "
                                 "--samples")
        self.model = self._make(len(y))
        self.model.fit(X, y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("fit the predictor first")
        return np.asarray(self.model.predict(X), dtype=float)

    def importances(self) -> np.ndarray:
        return np.asarray(self.model.feature_importances_, dtype=float)


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
                   seed: int = 0) -> tuple[Quality, np.ndarray]:
    """Out-of-fold predictions of a K-fold split and their Spearman ρ / MAE against ``y``."""
    from sklearn.model_selection import KFold

    folds = min(folds, len(y))
    if folds < 2:
        raise CalibrantError("cross-validation needs at least 2 measured configurations")
    pred = np.empty(len(y))
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(X):
        pred[test] = Predictor(kind, seed).fit(X[train], y[train]).predict(X[test])
    return quality(y, pred), pred
