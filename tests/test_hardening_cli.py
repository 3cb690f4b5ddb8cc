"""Issue 20, item 7: cases found when calibrant was tried as a new user would. Each is one line, exit code 2,
found before any model is loaded, and leaves nothing on disk that was not there before."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from calibrant.cli import main
from tests.calibration.calib_helpers import run_cli as _run
from tests.calibration.calib_helpers import tiny_model_dir

TEXT = " ".join(f"word{i % 50} and the of" for i in range(400))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tiny_model_dir(tmp_path_factory.mktemp("tiny"), TEXT)
    text = path.parent / "calib.txt"
    text.write_text(TEXT)
    return path, text


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any model is loaded: the refusals must come before the long work."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad argument was refused")

    monkeypatch.setattr("calibrant.api.load_model", boom)


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line(code, err, *needles):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("calibrant: error: "), err
    for needle in needles:
        assert needle in err, err


def _argparse_error(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


# --------------------------------------------------------------------- 1. output locations, checked first
@pytest.mark.parametrize("argv, needle", [
    (["compress", "--model", "{model}", "--method", "magnitude", "--out", "afile/sub"], "afile"),
    (["search", "--model", "{model}", "--out", "afile/sub", "--keep", "0.5,0.5"], "afile"),
    (["search", "--model", "{model}", "--out", "afile/sub"], "afile"),
    (["calib", "make", "file:{text}:4x16", "--model", "{model}", "--out", "afile/c.safetensors"], "afile"),
    (["study", "run", "impact", "--db", "afile/x.sqlite"], "afile"),
    (["eval", "--model", "{model}", "--ppl", "wiki", "--json", "afile/r.json"], "afile"),
    (["calib", "inspect", "{calibset}", "--json", "afile/r.json"], "afile"),
    (["study", "export", "--db", "{db}", "--csv", "afile/x.csv"], "afile"),
])
def test_output_under_a_regular_file_refused_first(tiny_dir, tmp_path, capsys, monkeypatch, no_load, argv, needle):
    model_dir, text = tiny_dir
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("precious")
    calibset = tmp_path / "set.safetensors"
    if "{calibset}" in argv:
        from calibrant.calibration import CalibrationSet

        CalibrationSet.from_tensor(torch.randint(3, 50, (2, 8))).save(calibset)
    if "{db}" in argv:
        from calibrant.studies import ResultStore

        ResultStore(tmp_path / "r.sqlite").close()
    before = _snapshot(tmp_path)
    argv = [a.replace("{model}", str(model_dir)).replace("{text}", str(text)).replace("{calibset}", str(calibset))
            .replace("{db}", str(tmp_path / "r.sqlite")) for a in argv]
    code, _, err = _run(capsys, *argv, *(["--quiet"] if argv[0] != "study" or argv[1] == "run" else []))
    _one_line(code, err, needle, "not a directory")
    assert (tmp_path / "afile").read_text() == "precious" and _snapshot(tmp_path) == before


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--model", "{model}", "--ppl", "wiki", "--json", "{dir}", "--quiet"], "--json"),
    (["calib", "make", "file:{text}:4x16", "--model", "{model}", "--out", "{dir}", "--overwrite", "--quiet"],
     "--out"),
    (["study", "run", "impact", "--db", "{dir}", "--quiet"], "--db"),
])
def test_directory_given_as_output_file_refused_first(tiny_dir, tmp_path, capsys, no_load, argv, flag):
    model_dir, text = tiny_dir
    target = tmp_path / "results.safetensors"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    argv = [a.replace("{model}", str(model_dir)).replace("{text}", str(text)).replace("{dir}", str(target))
            for a in argv]
    code, _, err = _run(capsys, *argv)
    _one_line(code, err, flag, "is a directory")
    assert (target / "keep.txt").read_text() == "precious" and _snapshot(tmp_path) == ["results.safetensors",
                                                                                       "results.safetensors/keep.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a directory without write permission")
def test_output_in_unwritable_directory_refused_first(tiny_dir, tmp_path, capsys, no_load):
    model_dir, _ = tiny_dir
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--out",
                            locked / "out", "--quiet")
    finally:
        locked.chmod(0o755)
    _one_line(code, err, str(locked), "not writable")
    assert list(locked.iterdir()) == []


def test_output_where_writing_fails_refused_first(tiny_dir, tmp_path, capsys, monkeypatch, no_load):
    """An immutable directory or a read-only file system (what chmod simulates for a non-root user): the probe
    write fails, and the compression never starts."""
    import tempfile

    model_dir, _ = tiny_dir
    real = tempfile.mkdtemp
    target = tmp_path / "immutable"
    target.mkdir()

    def mkdtemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's name
        if dir is not None and os.path.realpath(dir) == os.path.realpath(target):
            raise PermissionError(1, "Operation not permitted", str(target))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    for argv in (["compress", "--model", model_dir, "--method", "magnitude", "--out", target / "out"],
                 ["eval", "--model", model_dir, "--ppl", "wiki", "--json", target / "r.json"]):
        code, _, err = _run(capsys, *argv, "--quiet")
        _one_line(code, err, str(target), "not writable", "Operation not permitted")
    assert list(target.iterdir()) == []


def test_out_dot_with_overwrite_refused(tiny_dir, tmp_path, capsys, monkeypatch, no_load):
    model_dir, _ = tiny_dir
    work = tmp_path / "work"
    work.mkdir()
    (work / "calibrant.json").write_text("{}")  # even an earlier output: the current directory is not replaced
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--out", out,
                            "--overwrite", "--quiet")
        _one_line(code, err, "current directory")
    assert (work / "notes.txt").read_text() == "precious" and _snapshot(tmp_path) == [
        "work", "work/calibrant.json", "work/notes.txt"]


# --------------------------------------------------------------------- 2. --overwrite deletes only our outputs
def test_overwrite_refuses_a_directory_of_user_files(tiny_dir, tmp_path, capsys, no_load):
    model_dir, _ = tiny_dir
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    for argv in (["compress", "--model", model_dir, "--method", "magnitude"],
                 ["search", "--model", model_dir, "--keep", "0.5,0.5"]):
        code, _, err = _run(capsys, *argv, "--out", out, "--overwrite", "--quiet")
        _one_line(code, err, str(out), "calibrant.json", "not a calibrant output")
    file_out = tmp_path / "notes.txt"
    file_out.write_text("precious")
    code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--out", file_out,
                        "--overwrite", "--quiet")
    _one_line(code, err, "is a file")
    assert (out / "thesis.tex").read_text() == "precious" and file_out.read_text() == "precious"
    assert _snapshot(tmp_path) == ["mine", "mine/thesis.tex", "notes.txt"]


def test_overwrite_replaces_an_earlier_output(tiny_dir, tmp_path, capsys):
    model_dir, _ = tiny_dir
    out = tmp_path / "out"
    assert _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--out", out, "--quiet")[0] == 0
    (tmp_path / "empty").mkdir()
    for target in (out, tmp_path / "empty"):  # an earlier output, or an empty directory: nothing of the user's lost
        code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--sparsity", "0.25",
                            "--out", target, "--overwrite", "--quiet")
        assert code == 0, err
        assert json.loads((target / "calibrant.json").read_text())["recipe"][0]["sparsity"] == 0.25


def test_out_equal_to_model_refused(tiny_dir, tmp_path, capsys, no_load):
    model_dir, _ = tiny_dir
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "calibrant.json").write_text("{}")  # a compressed model compressed again: still its own input
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for out in (model, tmp_path):
        code, _, err = _run(capsys, "compress", "--model", model, "--method", "magnitude", "--out", out,
                            "--overwrite", "--quiet")
        _one_line(code, err, "--model", "input model")
    code, _, err = _run(capsys, "search", "--model", model, "--keep", "0.5,0.5", "--out", model, "--overwrite",
                        "--quiet")
    _one_line(code, err, "input model")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before


# --------------------------------------------------------------------- 3. the recipe records what was done
def test_sparsity_contradicting_pattern_refused(tiny_dir, tmp_path, capsys, no_load):
    model_dir, _ = tiny_dir
    code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "wanda", "--sparsity", "0.9",
                        "--pattern", "2:4", "--out", tmp_path / "out", "--quiet")
    _one_line(code, err, "--sparsity 0.9", "--pattern 2:4", "0.5")
    assert list(tmp_path.iterdir()) == []


def test_pattern_alone_records_its_sparsity(tiny_dir, tmp_path, capsys):
    model_dir, _ = tiny_dir
    out = tmp_path / "out"
    code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--pattern", "1:4",
                        "--out", out, "--quiet")
    assert code == 0, err
    meta = json.loads((out / "calibrant.json").read_text())
    assert meta["recipe"][0]["sparsity"] == 0.75 and meta["recipe"][0]["pattern"] == "1:4"
    assert meta["overall_sparsity"] == pytest.approx(0.75)
    code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--pattern", "2:4",
                        "--sparsity", "0.5", "--out", tmp_path / "agree", "--quiet")  # agreeing: accepted
    assert code == 0, err


# --------------------------------------------------------------------- 4. calibrant.json of the wrong shape
@pytest.mark.parametrize("content, needle", [
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"layers": "wanda"}', "'layers' is not a list of objects"),
    (b"\xff\xfe{\x00}\x00 garbage \x80", "not UTF-8"),
])
def test_bad_metadata_one_line_naming_the_file(tiny_dir, tmp_path, capsys, content, needle):
    model_dir, _ = tiny_dir
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "calibrant.json").write_bytes(content)
    for argv in (["info", model], ["eval", "--model", model, "--ppl", "wiki"],
                 ["compress", "--model", model, "--method", "magnitude", "--out", tmp_path / "out"]):
        code, _, err = _run(capsys, *argv, "--quiet")
        _one_line(code, err, str(model / "calibrant.json"), needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ['{"recipe": "wanda"}', '{"recipe": [], "calibration": [1]}', '{"plans": 3}'])
def test_info_refuses_a_record_of_the_wrong_shape(tiny_dir, tmp_path, capsys, content):
    model_dir, _ = tiny_dir
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (model / "calibrant.json").write_text(content)
    code, _, err = _run(capsys, "info", model, "--quiet")
    _one_line(code, err, str(model / "calibrant.json"), "is not a")


# --------------------------------------------------------------------- 5. devices and batch sizes
@pytest.mark.parametrize("device, needle", [
    ("banana", "unknown device 'banana'"),
    pytest.param("cuda", "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    pytest.param("cuda:7", "cuda:7", marks=pytest.mark.skipif(torch.cuda.device_count() > 7, reason="has 8 GPUs")),
])
def test_bad_device_refused_first(tiny_dir, tmp_path, capsys, no_load, device, needle):
    model_dir, _ = tiny_dir
    code, _, err = _run(capsys, "compress", "--model", model_dir, "--method", "magnitude", "--device", device,
                        "--out", tmp_path / "out", "--quiet")
    _one_line(code, err, needle, "--device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [
    ["compress", "--method", "magnitude", "--batch-size", "0"],
    ["compress", "--method", "magnitude", "--batch-size", "-3"],
    ["eval", "--ppl", "wiki", "--batch-size", "0"],
    ["calib", "inspect", "x.safetensors", "--batch-size", "-1"],
    ["eval", "--ppl", "wiki", "--stride", "0"],
    ["eval", "--ppl", "wiki", "--seq-len", "0"],
    ["eval", "--ppl", "wiki", "--max-tokens", "-5"],
])
def test_non_positive_counts_refused_at_parse_time(capsys, no_load, argv):
    code, err = _argparse_error(capsys, *argv)
    flag = next(a for a in argv if a.startswith("--") and a not in ("--method", "--ppl"))
    assert code == 2 and err.count("\n") == 1 and err.startswith("calibrant: error: ")
    assert f"argument {flag}: must be a positive integer" in err


# --------------------------------------------------------------------- 6. evaluation arguments, argparse errors
def test_perplexity_api_refuses_stride_zero_and_short_windows():
    from calibrant.errors import CalibrantError
    from calibrant.evaluate.perplexity import perplexity
    from tests.calibration.calib_helpers import tiny_llama

    model = tiny_llama(50, context=64)
    ids = torch.randint(3, 50, (200,))
    with pytest.raises(CalibrantError, match="stride 0"):
        perplexity(model, ids, seq_len=32, stride=0, progress=False)
    with pytest.raises(CalibrantError, match="at least 2") as exc:
        perplexity(model, ids, seq_len=0, progress=False)
    assert "smaller" not in str(exc.value)
    with pytest.raises(CalibrantError, match="smaller"):
        perplexity(model, ids, seq_len=512, progress=False)


def test_eval_stride_longer_than_window_refused_first(tiny_dir, capsys, no_load):
    model_dir, _ = tiny_dir
    code, _, err = _run(capsys, "eval", "--model", model_dir, "--ppl", "wiki", "--seq-len", "32", "--stride", "64",
                        "--quiet")
    _one_line(code, err, "--stride 64", "--seq-len 32")


@pytest.mark.parametrize("command", [
    ["eval", "--ppl", "wiki,wikii"],
    ["compress", "--method", "magnitude", "--eval", "wiki,wikii"],
    ["demo", "--eval", "wiki,wikii"],
])
def test_unknown_evaluation_corpus_refused_before_loading(tiny_dir, tmp_path, capsys, monkeypatch, no_load, command):
    monkeypatch.setattr("calibrant.models.loader.load_model", no_load_model)
    model_dir, _ = tiny_dir
    code, _, err = _run(capsys, command[0], "--model", model_dir, *command[1:], "--quiet")
    _one_line(code, err, "unknown corpus 'wikii'", "Did you mean 'wiki'")


def no_load_model(*args, **kwargs):
    raise AssertionError("a model was loaded before the bad corpus name was refused")


@pytest.mark.parametrize("argv, needle", [
    (["compress", "--model", "x", "--method", "wanda", "--bogus"], "unrecognized arguments: --bogus"),
    (["compress"], "--method"),
    (["eval", "--batch-size", "many"], "--batch-size"),
    (["nosuch"], "invalid choice"),
    (["study", "run"], "spec"),
    (["compress", "--method", "wanda", "--propagate", "x"], "--propagate"),
])
def test_argparse_errors_are_one_line(capsys, argv, needle):
    code, err = _argparse_error(capsys, *argv)
    assert code == 2 and err.count("\n") == 1 and err.startswith("calibrant: error: ") and needle in err
    assert "--help" in err and "usage:" not in err


# --------------------------------------------------------------------- 7. studies: unknown names
def test_study_export_of_unknown_study_refused(tmp_path, capsys):
    from calibrant.studies import ResultStore

    db = tmp_path / "r.sqlite"
    with ResultStore(db) as store:
        store.add_to_study("impact-small", "k1")
    csv = tmp_path / "out.csv"
    code, _, err = _run(capsys, "study", "export", "--db", db, "--csv", csv, "--study", "impact-smal")
    _one_line(code, err, "no study 'impact-smal'", "impact-small", "Did you mean 'impact-small'")
    assert not csv.exists()
    empty = tmp_path / "empty.sqlite"
    ResultStore(empty).close()
    code, _, err = _run(capsys, "study", "export", "--db", empty, "--csv", csv, "--study", "nosuch")
    _one_line(code, err, "no study 'nosuch'", "no studies yet")
    assert not csv.exists()


@pytest.mark.parametrize("command", ["plan", "run", "status"])
def test_study_spec_typo_suggests_the_preset(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    argv = ["study", command, "impactt", *(["--db", tmp_path / "r.sqlite"] if command != "plan" else [])]
    if command == "status":
        from calibrant.studies import ResultStore

        ResultStore(tmp_path / "r.sqlite").close()
    code, _, err = _run(capsys, *argv)
    _one_line(code, err, "impactt", "Did you mean 'impact'?")


@pytest.mark.parametrize("option", ["--batch-size", "--samples", "--top-k", "--rounds", "--quantum", "--proxy-tokens"])
def test_search_counts_refused_at_parse_time(capsys, option):
    code, err = _argparse_error(capsys, "search", option, "0")
    assert code == 2 and err.count("\n") == 1 and f"argument {option}: must be a positive integer, got 0" in err


def test_saved_set_longer_than_the_context_refused_by_inspect_and_compress(tmp_path, capsys):
    """A saved set is held to the model's context like a spec is: calib inspect and compress agree."""
    long_ctx = tiny_model_dir(tmp_path / "long", TEXT, context=256)
    short_ctx = tiny_model_dir(tmp_path / "short", TEXT, context=64)  # the same tokenizer
    (tmp_path / "calib.txt").write_text(TEXT)
    calib = tmp_path / "c.safetensors"
    code, _, err = _run(capsys, "calib", "make", f"file:{tmp_path / 'calib.txt'}:2x100", "--model", long_ctx,
                        "--out", calib, "--quiet")
    assert code == 0, err
    for argv in (["calib", "inspect", calib, "--model", short_ctx, "--quiet"],
                 ["compress", "--model", short_ctx, "--method", "wanda", "--calibration", calib, "--out",
                  tmp_path / "out", "--quiet"]):
        code, _, err = _run(capsys, *argv)
        _one_line(code, err, "L=100 tokens exceed the model's context length 64")
    assert not (tmp_path / "out").exists()
