"""`calibrant study …` in-process: plan, run, status, export, report, preset, and one-line errors."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from conftest import write_spec

sys.path.insert(0, str(Path(__file__).parent.parent / "calibration"))
from calib_helpers import run_cli  # noqa: E402


def test_cli_plan_run_status_export_report(study_env, tmp_path, capsys):
    spec = write_spec(tmp_path / "s.yaml", study_env)
    db = tmp_path / "r.sqlite"
    code, out, _ = run_cli(capsys, "study", "plan", spec, "--quiet")
    assert code == 0 and "study t: 6 runs, estimated" in out and "wanda sparsity=0.5" in out
    code, out, _ = run_cli(capsys, "study", "run", spec, "--db", db, "--quiet")
    assert code == 0 and "6 runs planned, 0 already in" in out and "6 done, 0 failed" in out
    code, out, _ = run_cli(capsys, "study", "status", spec, "--db", db)
    assert code == 0 and "6 of 6 runs in the database, 0 to go" in out
    code, out, _ = run_cli(capsys, "study", "plan", spec, "--db", db, "--quiet")
    assert code == 0 and out.count(" done") >= 6
    code, out, _ = run_cli(capsys, "study", "export", "--db", db, "--csv", tmp_path / "r.csv")
    assert code == 0
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 6 and all(float(r["ppl:wiki"]) > 1 for r in rows)
    code, _, err = run_cli(capsys, "study", "export", "--db", db, "--csv", tmp_path / "r.csv")
    assert code == 2 and "--overwrite" in err
    code, out, _ = run_cli(capsys, "study", "report", db, "--out", tmp_path / "rep")
    assert code == 0 and (tmp_path / "rep" / "index.html").is_file() and "calibration source" in out
    code, out, _ = run_cli(capsys, "study", "preset", "impact")
    assert code == 0 and "name: impact" in out


def test_cli_bad_input_is_one_line(study_env, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [a]\nmethods: [{name: wanda, sparsty: 0.5}]\ncalibration: {sources: [wiki]}\n")
    code, out, err = run_cli(capsys, "study", "run", bad, "--db", tmp_path / "r.sqlite")
    assert code == 2 and err.count("\n") == 1 and "Did you mean 'sparsity'" in err
    assert not (tmp_path / "r.sqlite").exists()  # a spec error is caught before the database is created
    code, _, err = run_cli(capsys, "study", "status", "--db", tmp_path / "nothing.sqlite")
    assert code == 2 and "no study database" in err
    code, _, err = run_cli(capsys, "study", "run", "nosuchpreset", "--db", tmp_path / "r.sqlite")
    assert code == 2 and "neither a study spec file nor a preset" in err
