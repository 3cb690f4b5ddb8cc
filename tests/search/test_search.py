"""Search space, predictor, evolutionary search and the ``calibrant search`` CLI."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
import transformers as T
from search_helpers import gqa_model, run_cli, tokens, word_tokenizer

from calibrant.calibration import CalibrationSet
from calibrant.errors import CalibrantError
from calibrant.models.structured import load_structured
from calibrant.search.importance import compute_importance
from calibrant.search.predictor import Featurizer, Predictor, cross_validate, quality
from calibrant.search.pruner import StructuredPruner, count_block_params
from calibrant.search.search import evolve, search_structured
from calibrant.search.space import SearchSpace
from calibrant.search.structured import ModelShape, StructuredConfig

SYNTH = ModelShape("llama", n_blocks=12, hidden=64, head_dim=16, n_heads=8, n_kv=4, intermediate=256,
                   per_group=64 * 16 * 2 * 2 + 2 * 64 * 16, per_channel=3 * 64, fixed=128)


def test_kept_fraction_is_exact_for_sampled_configs():
    model = gqa_model("qwen2", layers=4)
    pruner = StructuredPruner(model, compute_importance(model, None, "magnitude", progress=False, cache=False))
    space = SearchSpace(pruner.shape, quantum=16, allow_removal=True, tol=0.05)
    rng = np.random.default_rng(0)
    dense_blocks = count_block_params(model)
    assert space.total == dense_blocks
    for _ in range(6):
        cfg = space.random(0.6, rng)
        assert 0.55 <= space.kept_fraction(cfg) <= 0.6
        pruner.apply(cfg)
        assert count_block_params(model) == cfg.params(pruner.shape) == round(space.kept_fraction(cfg) * dense_blocks)
    uniforms = space.uniform(0.7)
    assert [c.kv_groups[0] for c in uniforms] == list(range(pruner.shape.n_kv, 0, -1))
    for cfg in uniforms:
        assert space.within(cfg, 0.7) and len(set(cfg.kv_groups)) == 1 and len(set(cfg.mlp_channels)) == 1
        # the full budget, in single channels: one more channel in every block would exceed it
        more = StructuredConfig(cfg.kv_groups, tuple(c + 1 for c in cfg.mlp_channels), cfg.removed)
        assert space.kept_fraction(more) > 0.7 >= space.kept_fraction(cfg)


def test_budget_and_ratio_refusals():
    space = SearchSpace(SYNTH, quantum=32)
    low = space.minimum_fraction()
    with pytest.raises(CalibrantError, match=f"keeps {low:.4f}"):
        space.check_budget(low / 2)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(CalibrantError, match=r"\(0, 1\]"):
            space.check_budget(bad)
    with pytest.raises(CalibrantError, match=r"keep ratio in \(0, 1\]"):
        space.from_ratios(0.0, 0.5)
    with pytest.raises(CalibrantError, match=r"keep ratio in \(0, 1\]"):
        space.from_ratios(0.5, 1.2)
    cfg = space.from_ratios(0.5, 0.5)
    assert cfg.kv_groups == (2,) * 12 and cfg.mlp_channels == (128,) * 12


def _synthetic(space, rng, n):
    """A known ranking: later blocks' MLP and early blocks' heads matter most (plus a little noise)."""
    w_h = np.linspace(1.0, 0.1, space.shape.n_blocks)
    w_m = np.linspace(0.1, 1.0, space.shape.n_blocks)
    configs = list({space.random(0.6, rng) for _ in range(n)})
    g = np.array([c.kv_groups for c in configs]) / space.shape.n_kv
    c = np.array([c.mlp_channels for c in configs]) / space.shape.intermediate
    y = 3.0 - (g * w_h).sum(1) * 0.3 - (c * w_m).sum(1) * 0.3 + rng.normal(0, 0.01, len(configs))
    return configs, y, (w_h, w_m)


@pytest.mark.parametrize("kind", ["lightgbm", "forest"])
def test_predictor_beats_mean_on_known_ranking(kind):
    space = SearchSpace(SYNTH, quantum=32)
    rng = np.random.default_rng(1)
    configs, y, _ = _synthetic(space, rng, 120)
    X = Featurizer(space)(configs)
    cv, pred = cross_validate(X, y, kind, folds=5)
    mean_mae = np.mean(np.abs(y - y.mean()))
    assert cv.spearman > 0.6 and cv.mae < 0.8 * mean_mae
    test_cfgs, y_test, _ = _synthetic(space, np.random.default_rng(2), 40)
    q = quality(y_test, Predictor(kind).fit(X, y).predict(Featurizer(space)(test_cfgs)))
    assert q.spearman > 0.6


def test_evolution_never_returns_a_config_over_budget():
    space = SearchSpace(SYNTH, quantum=32, allow_removal=True)
    rng = np.random.default_rng(3)
    _, _, (w_h, w_m) = _synthetic(space, rng, 4)

    def score(cfgs):  # a score that rewards keeping everything: pushes hard against the budget
        kept = ~np.array([c.removed for c in cfgs])
        g = np.array([c.kv_groups for c in cfgs]) / 4 * kept
        c = np.array([c.mlp_channels for c in cfgs]) / 256 * kept
        return -(g * w_h).sum(1) - (c * w_m).sum(1)

    start = [space.random(0.55, rng) for _ in range(5)] + [StructuredConfig.dense(SYNTH)]  # dense: way over
    ranked = evolve(space, score, 0.55, rng, start, population=24, generations=15)
    assert ranked and all(space.within(c, 0.55) and space.kept_fraction(c) <= 0.55 for _, c in ranked)
    best = ranked[0][1]
    assert space.kept_fraction(best) > 0.55 - space.tol


def test_search_end_to_end_writes_pairs_and_a_reloadable_model(tmp_path, monkeypatch):
    from calibrant.models.loader import LoadedModel

    stream = torch.randint(3, 96, (6000,), generator=torch.Generator().manual_seed(0))
    import calibrant.search.search

    monkeypatch.setattr(calibrant.search.search, "heldout_token_ids",
                        lambda name, tok, progress=None: (stream, {"checksum": "synthetic"}))
    model = gqa_model("llama", layers=4)
    loaded = LoadedModel(model, word_tokenizer(), "tiny", None, "0123456789abcdef")
    out = tmp_path / "search"
    res = search_structured(loaded, CalibrationSet.from_tensor(tokens(8, 32)), 0.7, 16, proxy_tokens=256, seq_len=64,
                            quantum=16, top_k=3, population=16, generations=5, heldout_samples=4, progress=False,
                            out=out)
    space = SearchSpace(ModelShape.of(gqa_model("llama", layers=4)), quantum=16)
    assert all(space.within(p.config, 0.7) for p in res.pairs)
    assert res.best.nll == min(p.nll for p in res.pairs if p.origin != "heldout")
    assert res.uniform is not None and res.best.nll <= res.uniform.nll
    db = sqlite3.connect(out / "pairs.sqlite")
    n, origins = db.execute("SELECT count(*), group_concat(DISTINCT origin) FROM pairs").fetchone()
    assert n == len(res.pairs) + 1 and {"dense", "uniform", "random", "predicted", "heldout"} <= set(origins.split(","))
    assert json.loads(db.execute("SELECT features FROM pairs LIMIT 1").fetchone()[0])
    summary = json.loads((out / "search.json").read_text())
    assert summary["best"]["kept_fraction"] <= 0.7 and summary["cv"]["n"] >= 16
    ids = tokens()
    with torch.no_grad():
        expected = res.model(input_ids=ids).logits
        assert torch.equal(load_structured(out / "model")(input_ids=ids).logits, expected)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = word_tokenizer()
    gqa_model("llama").save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96)).save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    return root


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "1.5"], r"keep ratio in (0, 1]"),
        (["--budget", "0.01", "--score", "magnitude"], "cannot be met: the smallest configuration"),
        (["--keep", "0,0.5", "--score", "magnitude"], r"in (0, 1]"),
        (["--keep", "0.5,1.2", "--score", "magnitude"], r"in (0, 1]"),
        (["--keep", "half"], "HEADS,MLP"),
        (["--model", "{gpt2}", "--score", "magnitude"],
         "'gpt2' models is not supported: its attention is one fused c_attn (q, k and v in one transposed Conv1D "
         "matrix) and its MLP c_fc → c_proj has no gate; supported families: llama, mistral, qwen2, qwen3, "
         "gemma3_text"),
        (["--samples", "2"], "at least 10 measured configurations"),
        (["--samples", "16", "--max-samples", "12"], "--max-samples 12 is below --samples 16"),
        (["--patience", "0"], "--patience"),
    ],
)
def test_cli_bad_input_one_line_exit_2(model_dirs, tmp_path, capsys, args, message):
    args = [a.replace("{gpt2}", str(model_dirs / "gpt2")) for a in args]
    if "--model" not in args:
        args = ["--model", model_dirs / "llama", *args]
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "search", *args, "--out", out, "--quiet")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("calibrant: error: ") and message in err
    assert not out.exists()


def test_proxy_corpus_default_is_one_value_in_the_api_and_the_cli_help(model_dirs, monkeypatch, capsys):
    import inspect

    import calibrant.api
    from calibrant.cli import build_parser
    from calibrant.search.search import DEFAULT_PROXY_CORPUS, check_search

    assert DEFAULT_PROXY_CORPUS == "wiki,news"
    for fn in (search_structured, check_search):
        assert inspect.signature(fn).parameters["proxy_corpus"].default == DEFAULT_PROXY_CORPUS
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["search"]
    action = next(a for a in sub._actions if a.dest == "proxy_corpus")
    assert f"(default: {DEFAULT_PROXY_CORPUS})" in action.help
    seen = {}  # and the CLI passes that default when the option is not given

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(calibrant.api, "search_structured", record)
    with pytest.raises(Stop):
        from calibrant.cli import main

        main(["search", "--model", str(model_dirs / "llama"), "--quiet"])
    assert seen["proxy_corpus"] == DEFAULT_PROXY_CORPUS


def test_cli_keep_prunes_and_saves(model_dirs, tmp_path, capsys):
    out = tmp_path / "pruned"
    code, stdout, err = run_cli(capsys, "search", "--model", model_dirs / "llama", "--keep", "0.67,0.5",
                                "--score", "magnitude", "--quantum", "16", "--out", out, "--quiet")
    assert code == 0, err
    assert "2 KV groups and 48 MLP channels" in stdout
    plain = T.AutoModelForCausalLM.from_pretrained(out)  # uniform shapes: a stock llama directory
    assert plain.config.model_type == "llama" and plain.config.num_key_value_heads == 2
    assert plain.model.layers[0].mlp.down_proj.in_features == 48


# ---- rounds, stopping rule, baselines, monotone constraints (issue 17) ---------------------------------------

def _proxy_search(monkeypatch, **kwargs):
    """search_structured on a tiny 4-block llama with a synthetic proxy stream."""
    from calibrant.models.loader import LoadedModel

    stream = torch.randint(3, 96, (6000,), generator=torch.Generator().manual_seed(0))
    import calibrant.search.search

    monkeypatch.setattr(calibrant.search.search, "heldout_token_ids",
                        lambda name, tok, progress=None: (stream, {"checksum": "synthetic"}))
    loaded = LoadedModel(gqa_model("llama", layers=kwargs.pop("layers", 4)), word_tokenizer(), "tiny", None,
                         "0123456789abcdef")
    # one synthetic stream stands in for every corpus: one corpus unless a test names several
    args = {"proxy_tokens": 256, "seq_len": 64, "quantum": 16, "population": 12, "generations": 4,
            "proxy_corpus": "wiki", "progress": False, **kwargs}
    return search_structured(loaded, CalibrationSet.from_tensor(tokens(8, 32)), args.pop("budget", 0.7),
                             args.pop("samples", 12), **args)


def test_rounds_add_exactly_the_measured_top_k_with_their_round(monkeypatch, tmp_path):
    res = _proxy_search(monkeypatch, rounds=3, top_k=3, patience=99, out=tmp_path / "s")
    by_round = {}
    for p in res.pairs:
        by_round.setdefault(p.round, []).append(p)
    assert sorted(by_round) == [0, 1, 2, 3]
    assert [len(by_round[r]) for r in (1, 2, 3)] == [3, 3, 3]
    assert all(p.origin == "predicted" for r in (1, 2, 3) for p in by_round[r])
    assert [h["round"] for h in res.extra["rounds"]] == [1, 2, 3] and res.extra["stopped"] == "rounds"
    db = sqlite3.connect(tmp_path / "s" / "pairs.sqlite")
    assert db.execute("SELECT round, count(*) FROM pairs WHERE origin = 'predicted' GROUP BY round").fetchall() == \
        [(1, 3), (2, 3), (3, 3)]
    assert res.extra["winner"] == {"origin": res.best.origin, "round": res.best.round}


def test_the_stopping_rule_stops_and_max_samples_bounds_the_cost(monkeypatch):
    res = _proxy_search(monkeypatch, rounds=5, top_k=2, min_improvement=100.0, patience=1)  # nothing improves
    assert res.extra["stopped"] == "no improvement" and len(res.extra["rounds"]) == 1   # by 100 nats
    assert not res.extra["rounds"][0]["improved"]
    res = _proxy_search(monkeypatch, rounds=5, top_k=2, min_improvement=100.0)  # the default: two such rounds
    assert res.extra["stopped"] == "no improvement" and len(res.extra["rounds"]) == 2
    capped = _proxy_search(monkeypatch, rounds=10, top_k=4, patience=99, max_samples=18)
    assert capped.extra["measured"] == 18 and capped.extra["stopped"] == "max_samples"


@pytest.mark.parametrize("strategy, origin", [("random", "random"), ("evolution", "evolved")])
def test_baselines_measure_as_many_configurations_within_the_budget(monkeypatch, strategy, origin):
    res = _proxy_search(monkeypatch, strategy=strategy, max_samples=20)
    space = SearchSpace(ModelShape.of(gqa_model("llama", layers=4)), quantum=16)
    assert res.extra["measured"] == 20 and all(space.within(p.config, 0.7) for p in res.pairs)
    assert sum(p.origin == origin and p.round >= 1 for p in res.pairs) == 8  # 20 − the 12 of the initial sample
    assert res.best.nll == min(p.nll for p in res.pairs)


def test_an_exact_predictor_finds_the_brute_force_optimum(monkeypatch):
    """With a test double that predicts the true proxy loss, the rounds must find the best configuration of a
    small space (729 configurations, of which the search's candidates are those that spend the budget), found
    here by measuring every one; the initial sample alone does not hold it."""
    import copy
    import itertools

    import calibrant.search.search as search_mod
    from calibrant.evaluate.perplexity import perplexity

    stream = torch.randint(3, 96, (6000,), generator=torch.Generator().manual_seed(0))
    proxy = stream[-256:]
    base = gqa_model("llama", layers=3)
    shape = ModelShape.of(base)
    space = SearchSpace(shape, quantum=32)  # per block 3 KV groups x 3 channel levels
    imp = compute_importance(base, tokens(8, 32), "wanda", progress=False, cache=False)
    pruner = StructuredPruner(copy.deepcopy(base), imp)
    known: dict = {}

    def true_nll(cfg):
        if cfg not in known:
            pruner.apply(cfg)
            known[cfg] = perplexity(pruner.model, proxy, seq_len=64, batch_size=4, progress=False).nll
        return known[cfg]

    budget = 0.7
    every = [StructuredConfig(g, c, (False,) * 3) for g in itertools.product((1, 2, 3), repeat=3)
             for c in itertools.product((32, 64, 96), repeat=3)]

    def grown(cfg):  # every configuration one step larger
        for b in range(3):
            if cfg.kv_groups[b] < 3:
                yield StructuredConfig(tuple(g + (i == b) for i, g in enumerate(cfg.kv_groups)), cfg.mlp_channels,
                                       cfg.removed)
            if cfg.mlp_channels[b] < 96:
                yield StructuredConfig(cfg.kv_groups, tuple(c + 32 * (i == b) for i, c in enumerate(cfg.mlp_channels)),
                                       cfg.removed)

    # the search spends the budget: its candidates are the configurations under it that no step can grow
    feasible = [c for c in every if space.within(c, budget) and not any(space.within(g, budget) for g in grown(c))]
    assert len(feasible) > 40
    optimum = min(feasible, key=true_nll)

    class Exact:  # decodes the configuration from its keep-ratio features and measures it
        def __init__(self, *args, **kwargs):
            pass

        def fit(self, X, y):
            return self

        def all(self, X):
            n = shape.n_blocks
            cfgs = [StructuredConfig(tuple(int(round(h * shape.n_kv)) for h in row[:n]),
                                     tuple(int(round(m * shape.intermediate)) for m in row[n:2 * n]), (False,) * n)
                    for row in X]
            return np.array([[true_nll(c) for c in cfgs]])

        def predict(self, X):
            return self.all(X)[0]

    monkeypatch.setattr(search_mod, "Ensemble", Exact)
    res = _proxy_search(monkeypatch, layers=3, quantum=32, budget=budget, samples=10, rounds=2, top_k=3,
                        patience=99)
    assert optimum not in {p.config for p in res.pairs if p.round == 0}
    assert res.best.config == optimum and res.best.origin == "predicted"


def test_monotone_constraints_hold_on_the_fitted_predictor():
    space = SearchSpace(SYNTH, quantum=32)
    rng = np.random.default_rng(5)
    configs, y, _ = _synthetic(space, rng, 150)
    y = y + rng.normal(0, 0.3, len(y))  # noisy enough that an unconstrained fit is not monotone everywhere
    feat = Featurizer(space)
    model = Predictor("lightgbm", 0, feat.monotone).fit(feat(configs), y)
    for cfg in configs[:40]:
        for b in range(SYNTH.n_blocks):
            if cfg.kv_groups[b] < SYNTH.n_kv:
                more = StructuredConfig(tuple(g + (i == b) for i, g in enumerate(cfg.kv_groups)), cfg.mlp_channels,
                                        cfg.removed)
                assert model.predict(feat([more]))[0] <= model.predict(feat([cfg]))[0] + 1e-9
    assert len(feat.monotone) == feat(configs[:1]).shape[1]


def test_rounds_below_one_are_refused(model_dirs, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "search", "--model", model_dirs / "llama", "--rounds", "0", "--quiet")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--rounds: must be a positive integer, got 0" in err
    with pytest.raises(CalibrantError, match="--rounds and --top-k must be at least 1"):
        search_structured(None, None, 0.8, 16, rounds=0)


def test_candidates_alternate_the_neighbourhood_of_the_best_and_the_evolution():
    from calibrant.search.search import neighbourhood, pick_candidates

    space = SearchSpace(ModelShape.of(gqa_model("llama", layers=4)), quantum=16)
    rng = np.random.default_rng(0)
    best = [space.random(0.7, rng) for _ in range(3)]
    seen = set(best)
    near = neighbourhood(space, best, 0.7, rng, size=200, exclude=seen)
    assert len(near) == len(set(near)) > 50 and not seen & set(near)
    assert all(space.within(c, 0.7) and space.kept_fraction(c) >= 0.7 - space.tol for c in near)

    def steps(a, b):  # blocks whose genes differ
        return sum(x != y for x, y in zip(a.kv_groups + a.mlp_channels, b.kv_groups + b.mlp_channels, strict=True))

    # a mutation changes at most three blocks' genes; repair may then step a few more
    assert np.median([min(steps(c, b) for b in best) for c in near]) <= 4
    far = [space.random(0.7, rng) for _ in range(10)]
    ranked = [(float(i), c) for i, c in enumerate(far)]
    score = {c: float(i) for i, c in enumerate(near)}
    picked = pick_candidates(ranked, near, lambda cs: np.array([score[c] for c in cs]), 5, seen | {far[0]})
    assert picked == [near[0], far[1], near[1], far[2], near[2]]  # measured ones skipped, the rest in turn


def _synthetic_importance(shape, seed=0):
    from calibrant.search.importance import Importance

    g = torch.Generator().manual_seed(seed)
    return Importance("wanda", [torch.rand(shape.n_kv, generator=g, dtype=torch.float64) for _ in range(shape.n_blocks)],
                      [torch.rand(shape.intermediate, generator=g, dtype=torch.float64) for _ in range(shape.n_blocks)],
                      torch.rand(shape.n_blocks, generator=g, dtype=torch.float64))


def test_summary_features_sum_the_removed_shares_and_whole_model_columns_are_a_subset():
    space = SearchSpace(SYNTH, quantum=32)
    imp = _synthetic_importance(SYNTH)
    configs = [space.random(0.6, np.random.default_rng(s)) for s in range(20)] + [StructuredConfig.dense(SYNTH)]
    feat = Featurizer(space, imp)
    X = feat(configs)
    assert X.shape[1] == len(feat.names) == len(feat.monotone)
    n = SYNTH.n_blocks
    rg = X[:, [feat.names.index(f"removed_score_heads_{i}") for i in range(n)]]
    rc = X[:, [feat.names.index(f"removed_score_mlp_{i}") for i in range(n)]]
    col = {name: X[:, i] for i, name in enumerate(feat.names)}
    np.testing.assert_allclose(col["kept_total"], [space.kept_fraction(c) for c in configs])  # names match columns
    np.testing.assert_allclose(col["heads_min"], X[:, [feat.names.index(f"heads_{i}") for i in range(n)]].min(1))
    np.testing.assert_allclose(col["removed_sum_heads"], rg.sum(1))
    np.testing.assert_allclose(col["removed_sumsq_mlp"], (rc ** 2).sum(1))
    np.testing.assert_allclose(col["removed_max_block"], (rg + rc).max(1))
    np.testing.assert_allclose(col["log_kept_score_mlp"], np.log(1.001 - rc).sum(1))
    # one block's removed share, by hand: the lowest-scored channels beyond the kept count
    c = configs[0]
    scores = np.sort(imp.channels[3].numpy())[::-1]
    np.testing.assert_allclose(rc[0, 3], scores[c.mlp_channels[3]:].sum() / scores.sum())
    assert (X[-1, [feat.names.index(k) for k in ("removed_sum_heads", "removed_max_block")]] == 0).all()  # dense

    whole = Featurizer(space, imp, blocks=False)
    Xw = whole(configs)
    assert not any(name[-1].isdigit() for name in whole.names) and Xw.shape[1] == len(whole.monotone) == 20
    np.testing.assert_array_equal(Xw, X[:, [feat.names.index(name) for name in whole.names]])
    assert Featurizer(space, imp, summaries=False)(configs).shape[1] == X.shape[1] - 10


def test_clipped_targets_fit_the_outliers_as_the_quantile_and_nan_is_refused():
    space = SearchSpace(SYNTH, quantum=32)
    rng = np.random.default_rng(4)
    configs, y, _ = _synthetic(space, rng, 60)
    y[:5] += 6.0  # five catastrophic configurations
    X = Featurizer(space)(configs)
    clipped = Predictor("lightgbm", 0, clip=0.8).fit(X, y).predict(X)
    by_hand = Predictor("lightgbm", 0, clip=None).fit(X, np.minimum(y, np.quantile(y, 0.8))).predict(X)
    np.testing.assert_array_equal(clipped, by_hand)
    assert clipped.max() < np.quantile(y, 0.8) + 0.05 < y.max() - 5  # boosting may overshoot a little, not 6 nats
    bad = y.copy()
    bad[7] = np.nan
    with pytest.raises(CalibrantError, match="not finite"):
        Predictor("lightgbm", 0).fit(X, bad)
    with pytest.raises(CalibrantError, match="clip quantile"):
        Predictor("lightgbm", 0, clip=1.5)


def test_monotone_constraints_hold_with_the_importance_and_summary_features():
    space = SearchSpace(SYNTH, quantum=32)
    imp = _synthetic_importance(SYNTH, seed=1)
    rng = np.random.default_rng(6)
    configs, y, _ = _synthetic(space, rng, 150)
    y = y + rng.normal(0, 0.3, len(y))
    feat = Featurizer(space, imp)
    model = Predictor("lightgbm", 0, feat.monotone).fit(feat(configs), y)
    for cfg in configs[:30]:
        for b in range(SYNTH.n_blocks):
            if cfg.mlp_channels[b] < SYNTH.intermediate:
                more = StructuredConfig(cfg.kv_groups, tuple(c + 32 * (i == b) for i, c in enumerate(cfg.mlp_channels)),
                                        cfg.removed)
                assert model.predict(feat([more]))[0] <= model.predict(feat([cfg]))[0] + 1e-9


def test_a_kl_proxy_is_what_the_search_minimises_and_is_stored(monkeypatch, tmp_path):
    res = _proxy_search(monkeypatch, rounds=2, top_k=3, patience=99, heldout_samples=3, proxy_metric="kl",
                        out=tmp_path / "s")
    assert res.dense is not None and res.dense.kl == 0.0
    assert all(p.metric == "kl" and p.kl is not None and p.kl > 0 and p.loss == p.kl for p in res.pairs)
    searched = [p for p in res.pairs if p.origin != "heldout"]
    assert res.best.kl == min(p.kl for p in searched)
    assert res.uniform is not None and res.best.kl <= res.uniform.kl
    db = sqlite3.connect(tmp_path / "s" / "pairs.sqlite")
    rows = db.execute("SELECT origin, kl, metric FROM pairs ORDER BY id").fetchall()
    assert rows[0] == ("dense", 0.0, "kl") and len(rows) == len(res.pairs) + 1
    assert all(m == "kl" and kl > 0 for _, kl, m in rows[1:])
    summary = json.loads((tmp_path / "s" / "search.json").read_text())
    assert summary["protocol"]["proxy"]["metric"] == "kl" and summary["best"]["proxy_loss"] == res.best.kl
    from calibrant.search.search import PairStore

    stored = PairStore(tmp_path / "s" / "pairs.sqlite").pairs()[1:]  # in measurement order: held-out before rounds
    assert sorted((p.kl, p.metric, p.origin) for p in stored) == sorted((p.kl, p.metric, p.origin) for p in res.pairs)


def test_an_unknown_proxy_metric_is_refused_before_loading():
    with pytest.raises(CalibrantError, match="unknown proxy metric 'nll'; use ppl or kl"):
        search_structured(None, None, 0.8, 16, proxy_metric="nll")


def test_a_proxy_over_several_corpora_takes_whole_windows_from_the_end_of_each(monkeypatch, tmp_path):
    import calibrant.search.search as S

    streams = {"wiki": torch.arange(3000) % 90 + 3, "news": torch.arange(5000) % 50 + 40}
    monkeypatch.setattr(S, "heldout_token_ids",
                        lambda name, tok, progress=None: (streams[name], {"checksum": f"sum-{name}"}))
    ids, metas = S.proxy_token_ids("wiki,news", None, 300, 64)  # 150 each → two whole windows of 64
    assert torch.equal(ids, torch.cat([streams["wiki"][-128:], streams["news"][-128:]]))
    assert metas == [{"corpus": "wiki", "tokens": 128, "checksum": "sum-wiki"},
                     {"corpus": "news", "tokens": 128, "checksum": "sum-news"}]
    one, _ = S.proxy_token_ids("wiki", None, 300, 64)  # one corpus: exactly its last tokens, no window rounding
    assert torch.equal(one, streams["wiki"][-300:])
    res = _proxy_search(monkeypatch, rounds=1, top_k=2, proxy_corpus="wiki, news", out=tmp_path / "s")
    proxy = json.loads((tmp_path / "s" / "search.json").read_text())["protocol"]["proxy"]
    assert proxy["tokens"] == 256 and [p["corpus"] for p in proxy["parts"]] == ["wiki", "news"]
    assert proxy["corpus"] == "wiki,news"  # the spec as parsed, not as typed
    assert res.dense.meta_tokens == 256 - 4  # four windows of 64, each window's first token unscored


@pytest.mark.parametrize("spec, tokens, message", [
    ("wiki,,news", 4096, "once each, separated by commas"),
    ("wiki,wiki", 4096, "once each"),
    ("wiki,news", 600, "fewer than one window of 512 tokens; use at least 1024"),
    ("wiki,nwes", 4096, "unknown corpus 'nwes'; Did you mean 'news'"),
    ("wiki:html", 4096, "has option 'html'"),
])
def test_a_bad_proxy_corpus_list_is_refused_before_loading(spec, tokens, message):
    with pytest.raises(CalibrantError, match=message):
        search_structured(None, None, 0.8, 16, proxy_corpus=spec, proxy_tokens=tokens)
