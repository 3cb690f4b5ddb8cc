"""Study specs: expansion counts, collapsing of calibration-free runs, errors with line and column."""

from __future__ import annotations

import pytest

from calibrant.studies.runner import run_key
from calibrant.studies.spec import StudySpecError, load_study, presets
from conftest import write_spec


def test_expansion_counts(tmp_path):
    spec = load_study(write_spec(tmp_path / "s.yaml", tmp_path / "m"))
    runs = spec.expand()
    # dense 1 + wanda × 2 sources × 2 seeds + magnitude 1 (reads no calibration data: one run, not four)
    assert len(runs) == 6
    assert [r.method for r in runs].count("wanda") == 4
    assert all(r.calibration is None and r.seed is None for r in runs if r.method in ("dense", "magnitude"))
    grid = load_study(write_spec(tmp_path / "g.yaml", tmp_path / "m", methods=[
        {"name": "wanda", "sparsity": [0.5, 0.6], "pattern": [None, "2:4"]}, {"name": "rtn", "scheme": ["w4g64", "w8"]}],
        calibration={"sources": ["wiki", "news", "random-vocab"], "n": [4, 8], "length": 32, "seeds": [0, 1, 2]}))
    assert len(grid.expand()) == 2 * 2 * (3 * 2 * 3) + 2
    assert len({r.spec_key for r in grid.expand()}) == len(grid.expand())


def test_presets_expand():
    assert set(presets()) >= {"impact", "self-calibration", "ptq-grid"}
    impact = load_study("impact").expand()
    assert len(impact) == 1 + 4 * 7 * 3
    assert {r.method for r in impact} >= {"gptq", "spqr", "sparsegpt", "wanda"}
    assert {r.calibration.split(":")[0] for r in impact if r.calibration} == {
        "wiki", "news", "wikihow", "dialogue", "austen", "pydocs", "random-vocab"}
    ptq = load_study("ptq-grid").expand()
    assert len([r for r in ptq if r.method == "rtn"]) == 8  # data-free: once per scheme


def test_spec_key_changes_with_every_input(tmp_path):
    base = load_study(write_spec(tmp_path / "a.yaml", tmp_path / "m")).expand()
    again = load_study(write_spec(tmp_path / "b.yaml", tmp_path / "m")).expand()
    assert [r.spec_key for r in base] == [r.spec_key for r in again]
    other_eval = load_study(write_spec(tmp_path / "c.yaml", tmp_path / "m",
                                       evaluation={"perplexity": ["wiki"], "max_tokens": 128})).expand()
    assert not {r.spec_key for r in base} & {r.spec_key for r in other_eval}


def test_run_key_identity(monkeypatch, tmp_path):
    import calibrant.studies.runner as runner

    run = load_study(write_spec(tmp_path / "a.yaml", tmp_path / "m")).expand()[1]
    key = run_key(run, "m" * 16, "c" * 16)
    assert key == run_key(run, "m" * 16, "c" * 16)
    changed = {run_key(run, "x" * 16, "c" * 16), run_key(run, "m" * 16, "d" * 16)}
    other = load_study(write_spec(tmp_path / "b.yaml", tmp_path / "m", methods=[{"name": "wanda", "sparsity": 0.6}]))
    changed.add(run_key(other.expand()[0], "m" * 16, "c" * 16))
    ev = load_study(write_spec(tmp_path / "c.yaml", tmp_path / "m", evaluation={"perplexity": ["news"]}))
    changed.add(run_key(ev.expand()[1], "m" * 16, "c" * 16))
    monkeypatch.setattr(runner, "__version__", "9.9.9")
    changed.add(run_key(run, "m" * 16, "c" * 16))
    assert key not in changed and len(changed) == 5
    monkeypatch.undo()
    # how zero-shot requests are scored is not part of a result's identity: choosing a scorer reruns nothing
    for evaluation in ({"tasks": ["rte"], "scorer": "hf"}, {"tasks": ["rte"], "scorer": "prefix", "token_budget": 512}):
        s = load_study(write_spec(tmp_path / "s.yaml", tmp_path / "m", evaluation=evaluation)).expand()[1]
        base = load_study(write_spec(tmp_path / "t.yaml", tmp_path / "m", evaluation={"tasks": ["rte"]})).expand()[1]
        assert s.eval_dict != base.eval_dict and s.eval_dict["scorer"] == evaluation["scorer"]
        assert (s.spec_key, run_key(s, "m" * 16, "c" * 16)) == (base.spec_key, run_key(base, "m" * 16, "c" * 16))


@pytest.mark.parametrize("text, needle", [
    ("name: x\nmodels: [a\nmethods: []\n", "line 3, column 8: malformed YAML"),
    ("name: x\nmodels: [a]\nmethds: [{name: wanda}]\n", "line 3, column 1: unknown key 'methds'"),
    ("models: [a]\nmethods:\n  - {name: wanda, sparsty: 0.5}\ncalibration: {sources: [wiki]}\n",
     "line 3, column 19: method 'wanda' does not take 'sparsty'"),
    ("models: [a]\nmethods: [{name: wandaa}]\n", "unknown method 'wandaa'"),
    ("models: [a]\nmethods: [{name: wanda}]\ncalibration: {sources: [wiki], seeds: []}\n", "'seeds' is empty"),
    ("models: [a]\nmethods: [{name: wanda, sparsity: []}]\ncalibration: {sources: [wiki]}\n", "empty list"),
    ("models: [a]\nmethods: [{name: wanda}]\n", "has no sources"),
    ("models: []\nmethods: [{name: dense}]\n", "'models' is empty"),
    ("- just\n- a list\n", "is not a mapping"),
    ("models: [a]\nmethods: [{name: dense}]\nevaluation: {perplxity: [wiki]}\n", "Did you mean 'perplexity'"),
    ("models: [a]\nmethods: [{name: wanda}]\ncalibration: {sources: [nosuch]}\n", "unknown calibration source 'nosuch'"),
    ("models: [a]\nmethods: [{name: dense}]\nevaluation: {tasks: [rte], scorer: fast}\n",
     "line 3, column 28: unknown evaluation scorer 'fast'; choose from prefix, hf"),
    ("models: [a]\nmethods: [{name: dense}]\nevaluation: {tasks: [rte], token_budget: -4}\n",
     "token_budget must be a positive number of tokens, got -4"),
    ("models: [a]\nmethods: [{name: dense}]\nevaluation: {perplexity: [wiki, nwes]}\n",
     "line 3, column 14: unknown corpus 'nwes'; Did you mean 'news'?"),
])
def test_bad_specs(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(StudySpecError) as err:
        load_study(path)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg
    assert msg.startswith(str(path))


def test_suggests_closest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models: [a]\nmethds: [{name: wanda}]\n")
    with pytest.raises(StudySpecError, match="Did you mean 'methods'"):
        load_study(path)
    with pytest.raises(StudySpecError, match="neither a study spec file nor a preset"):
        load_study(tmp_path / "missing.yaml")


def test_binary_spec_file_refused(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_bytes(b"name: x\n\xd0\xff\x00binary")
    with pytest.raises(StudySpecError, match=r"not a text file \(byte 8 is not UTF-8\)"):
        load_study(path)


def test_second_round_calibration_specs_expand(tmp_path):
    """Mixtures, chat formatting, masks and selection are study sources like any other (a mixture draws its
    own windows, so a sampling mode is not appended to it)."""
    path = tmp_path / "s.yaml"
    path.write_text("models: [a]\nmethods: [{name: wanda, sparsity: 0.5}]\n"
                    "calibration: {sources: ['mix(wiki=0.5,dialogue:chat=0.5)', 'dialogue:chat:assistant-only', "
                    "'wiki:select=diverse:pool=4', 'self:chat'], n: 8, length: 64, seeds: [0, 1], sampling: docs}\n"
                    "evaluation: {perplexity: [wiki, 'dialogue:chat']}\n")
    study = load_study(path)
    specs = sorted({r.calibration for r in study.expand()})
    assert specs == ["dialogue:chat:assistant-only:docs:8x64", "mix(wiki=0.5,dialogue:chat=0.5):8x64",
                     "self:chat:8x64", "wiki:select=diverse:pool=4:docs:8x64"]
    assert study.evaluation["perplexity"] == ["wiki", "dialogue:chat"]
