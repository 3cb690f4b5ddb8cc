"""Issue 20, item 6: property-based tests (Hypothesis) of the parsers and the maths.

Parsers: any text either parses or raises a CalibrantError (never another exception), and what they
print parses back to the same value. Maths: round-to-nearest on random grids puts every value on its
grid within half a step and is idempotent; N:M masks on random shapes prune exactly M − N of every M,
the lowest-scoring ones. Run with ``pytest tests/test_properties.py --hypothesis-show-statistics`` to see
the example counts.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calibrant.calibration.spec import SAMPLING_MODES, parse_spec
from calibrant.errors import CalibrantError
from calibrant.methods.quant.grid import expand_groups, fake_quant_weight, qrange, weight_qparams
from calibrant.methods.quant.scheme import QuantScheme, parse_scheme
from calibrant.methods.sparsity import nm_mask
from calibrant.studies.spec import load_study, parse_study, preset_text, presets

PARSERS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MATHS = settings(max_examples=60, deadline=None)

# text near the grammar (scheme-like and spec-like fragments glued together) finds more corners than
# uniform unicode; both are drawn
SCHEME_BITS = st.sampled_from(["w", "a", "g", "-", "asym", "sym", "mse", "channel", "tensor", "+lorc", "t",
                               "0", "1", "3", "4", "8", "9", "16", "128", " ", "W", "x"])
SPEC_BITS = st.sampled_from(["wiki", "news", "file", "self", "random", "mix", ":", "x", "128", "0", "-1", "512",
                             "windows", "docs", "packed", "=", ",", "(", ")", " ", "/tmp/a", "select", "1e3"])


def _glued(parts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(parts, max_size=8).map("".join)


@PARSERS
@given(st.one_of(_glued(SCHEME_BITS), st.text(max_size=24)))
def test_scheme_parser_never_raises_anything_else(text):
    try:
        scheme = parse_scheme(text)
    except CalibrantError:
        return
    assert parse_scheme(scheme.name) == scheme


@st.composite
def schemes(draw) -> QuantScheme:
    granularity = draw(st.sampled_from(["group", "channel", "tensor"]))
    return QuantScheme(
        bits=draw(st.integers(2, 8)),
        group_size=draw(st.sampled_from([8, 16, 32, 64, 128])) if granularity == "group" else None,
        granularity=granularity, symmetric=draw(st.booleans()), clip=draw(st.sampled_from(["none", "mse"])),
        act_bits=draw(st.sampled_from([None, 4, 8])), act_granularity=draw(st.sampled_from(["token", "tensor"])),
        lorc_rank=draw(st.sampled_from([0, 4])))


@PARSERS
@given(schemes())
def test_scheme_name_round_trips(scheme):
    parsed = parse_scheme(scheme.name)
    if scheme.act_bits is None:  # the name carries no activation granularity without activation bits
        parsed = QuantScheme(**{**parsed.__dict__, "act_granularity": scheme.act_granularity})
    assert parsed == scheme


@PARSERS
@given(st.one_of(_glued(SPEC_BITS), st.text(max_size=32)))
def test_calibration_spec_parser_never_raises_anything_else(text):
    try:
        spec = parse_spec(text)
    except CalibrantError:
        return
    assert spec.n > 0 and spec.seq_len > 0 and spec.sampling in SAMPLING_MODES


@PARSERS
@given(st.sampled_from(["wiki", "news", "austen", "dialogue", "random"]), st.integers(1, 10**6),
       st.integers(1, 10**5), st.sampled_from(["", *SAMPLING_MODES]))
def test_calibration_spec_fields_round_trip(source, n, length, sampling):
    spec = parse_spec(f"{source}{':' + sampling if sampling else ''}:{n}x{length}")
    assert (spec.source, spec.n, spec.seq_len) == (source, n, length)
    assert spec.sampling == (sampling or spec.sampling)


# study specs: values that are plausible and implausible for every key a study has
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-3, 600), st.floats(-2, 2), st.just(float("nan")),
                 st.sampled_from(["wiki", "wanda", "gptq", "w4g128", "w9", "smollm2-135m", "", "0.5", "uniform"]))
KEYS = st.sampled_from(["name", "models", "methods", "calibration", "evaluation", "sources", "n", "length",
                        "seeds", "sparsity", "scheme", "perplexity", "max_tokens", "seq_len", "tasks", "bogus"])
VALUES = st.recursive(LEAF, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                   st.dictionaries(KEYS, kids, max_size=4)), max_leaves=12)


@PARSERS
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_study_spec_parser_never_raises_anything_else(data):
    try:
        spec = parse_study(data, "<generated>")
    except CalibrantError:
        return
    spec.expand()  # a spec that parses also plans


YAML_BITS = st.sampled_from(["name: s\n", "models: [smollm2-135m]\n", "methods:\n", "  - {name: wanda}\n",
                             "  - {name: gptq, scheme: w9}\n", "calibration: {sources: [wiki], n: 4, length: 64}\n",
                             "evaluation: {perplexity: [wiki]}\n", "  - ", ": ", "{", "}", "[", "]", "\t", "- x\n",
                             "&a ", "*a ", "!!python/object:os.system ", "seeds: [0, 1]\n", "\x00", "é"])


@PARSERS
@given(st.one_of(_glued(YAML_BITS), st.text(max_size=64), st.binary(max_size=64)))
def test_study_file_loader_never_raises_anything_else(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("spec") / "study.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        load_study(path)
    except CalibrantError:
        pass


@pytest.mark.parametrize("preset", presets())
def test_study_presets_round_trip_through_yaml(preset):
    """A preset, dumped to YAML and read back, plans exactly the same runs."""
    first = load_study(preset)
    again = load_study(yaml.safe_load(yaml.safe_dump(yaml.safe_load(preset_text(preset)))))
    assert [r.spec_key for r in again.expand()] == [r.spec_key for r in first.expand()]


# ------------------------------------------------------------------ maths
@st.composite
def weights(draw) -> tuple[torch.Tensor, QuantScheme]:
    scheme = draw(schemes())
    scheme = QuantScheme(bits=scheme.bits, group_size=scheme.group_size, granularity=scheme.granularity,
                         symmetric=scheme.symmetric)  # plain min-max grids (clip searches shrink the range)
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 200))
    seed, spread = draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([1e-3, 1.0, 50.0]))
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread
    if draw(st.booleans()):
        W[:, draw(st.integers(0, cols - 1))] = 0.0  # a zero column
    if draw(st.booleans()):
        W[draw(st.integers(0, rows - 1))] = 0.0  # an all-zero row: any scale works, the zeros must stay zero
    return W, scheme


@MATHS
@given(weights())
def test_round_to_nearest_lands_on_the_grid_within_half_a_step(case):
    W, scheme = case
    Wq, scale, zero = fake_quant_weight(W, scheme)
    cols = W.shape[1]
    s, z = expand_groups(scale, cols, scheme), expand_groups(zero, cols, scheme)
    lo, hi = qrange(scheme.bits, scheme.symmetric)
    q = Wq / s + z
    assert torch.allclose(q, q.round(), atol=1e-6)  # on the grid
    assert q.round().min() >= lo and q.round().max() <= hi
    assert torch.all((W - Wq).abs() <= s / 2 * (1 + 1e-9) + 1e-12)  # min-max range: nothing is clipped
    assert torch.all(Wq[W == 0] == 0)
    again, _, _ = fake_quant_weight(Wq, scheme)
    assert torch.allclose(again, Wq, rtol=0, atol=1e-9 * float(W.abs().max() + 1))  # idempotent
    scale2, _ = weight_qparams(W, scheme)
    assert torch.equal(scale2, scale)


@MATHS
@given(st.integers(1, 8).flatmap(lambda m: st.tuples(st.integers(1, m - 1) if m > 1 else st.just(0), st.just(m))),
       st.integers(1, 9), st.integers(1, 12), st.integers(0, 2**31 - 1), st.booleans())
def test_nm_mask_prunes_exactly_m_minus_n_of_the_lowest(nm, rows, groups, seed, ties):
    n, m = nm
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 3, (rows, groups * m), generator=g).double() if ties else \
        torch.rand(rows, groups * m, generator=g, dtype=torch.float64)
    mask = nm_mask(scores, n, m)
    blocks, pruned = scores.reshape(rows, groups, m), mask.reshape(rows, groups, m)
    assert torch.all(pruned.sum(-1) == m - n)
    if 0 < n < m:  # every pruned score is ≤ every kept score of its group
        worst_pruned = torch.where(pruned, blocks, torch.full_like(blocks, -torch.inf)).amax(-1)
        best_kept = torch.where(~pruned, blocks, torch.full_like(blocks, torch.inf)).amin(-1)
        assert torch.all(worst_pruned <= best_kept)
