"""The study report: its tables match the database, figures exist, the HTML renders in a real browser."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess

import pytest

from calibrant.errors import CalibrantError
from calibrant.studies import load_study, run_study, write_report
from conftest import write_spec


@pytest.fixture
def finished_db(study_env, tmp_path):
    spec = load_study(write_spec(tmp_path / "s.yaml", study_env, methods=[
        {"name": "dense"}, {"name": "wanda", "sparsity": 0.5}, {"name": "sparsegpt", "sparsity": 0.5},
        {"name": "wanda", "sparsity": 0.5, "pattern": "2:3"}]))  # the 2:3 run fails (32 columns): listed as failed
    db = tmp_path / "r.sqlite"
    run_study(spec, db, progress=False)
    return db


def test_report_tables_match_database(finished_db, tmp_path):
    out = tmp_path / "report"
    rep = write_report(finished_db, out)
    tables = json.loads((out / "tables.json").read_text())
    with sqlite3.connect(finished_db) as conn:
        sql = {(label, name): (n, mean, lo, hi) for label, name, n, mean, lo, hi in conn.execute(
            "SELECT r.label, m.name, COUNT(*), AVG(m.value), MIN(m.value), MAX(m.value) FROM runs r "
            "JOIN metrics m ON m.run_key = r.key WHERE r.status = 'done' AND r.method != 'dense' "
            "AND m.name LIKE 'ppl:%' GROUP BY r.label, m.name")}
        per_source = {(label, src, name): mean for label, src, name, mean in conn.execute(
            "SELECT r.label, r.calib_source, m.name, AVG(m.value) FROM runs r JOIN metrics m ON m.run_key = r.key "
            "WHERE r.status = 'done' AND r.method != 'dense' GROUP BY r.label, r.calib_source, m.name")}
        dense = conn.execute("SELECT m.value FROM runs r JOIN metrics m ON m.run_key = r.key "
                             "WHERE r.method = 'dense' AND m.name = 'ppl:wiki'").fetchone()[0]
        failed = conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'failed'").fetchone()[0]
    summary = {(r["config"], r["metric"]): r for r in tables["summary"]}
    assert set(sql) == set(summary)
    for key, (n, mean, lo, hi) in sql.items():
        row = summary[key]
        assert row["n"] == n == 4
        assert row["mean"] == pytest.approx(mean, rel=1e-12)
        assert (row["min"], row["max"]) == (pytest.approx(lo), pytest.approx(hi))
        assert row["dense"] == pytest.approx(dense)
    for r in tables["by_source"]:
        assert r["mean"] == pytest.approx(per_source[(r["config"], r["source"], r["metric"])], rel=1e-12)
    best = {(r["config"], r["metric"]): r["best_source"] for r in tables["summary"]}
    for (config, metric), source in best.items():
        means = {s: m for (c, s, n), m in per_source.items() if c == config and n == metric}
        assert source == min(means, key=means.get)
    assert len(tables["failures"]) == failed == 4  # 2 sources × 2 seeds
    assert rep.recommendations and "lowest mean perplexity" in rep.recommendations[0]
    stab = tables["stability"][0]
    assert stab["calibration_sets"] == 4 and -1 <= stab["kendall_tau_mean"] <= 1
    md = (out / "report.md").read_text()
    assert "## Recommendations" in md and "wanda pattern=2:3 sparsity=0.5" in md
    html = (out / "index.html").read_text()
    assert html.count("data:image/png;base64,") == len(rep.figures) >= 1
    for name in rep.figures.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_refuses_foreign_directory_and_empty_db(finished_db, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(CalibrantError, match="not a calibrant report directory"):
        write_report(finished_db, foreign)
    assert (foreign / "thesis.tex").read_text() == "keep me"
    write_report(finished_db, tmp_path / "rep")
    write_report(finished_db, tmp_path / "rep")  # a report directory is replaced
    from calibrant.studies import ResultStore

    ResultStore(tmp_path / "empty.sqlite").close()
    with pytest.raises(CalibrantError, match="holds no runs"):
        write_report(tmp_path / "empty.sqlite", tmp_path / "rep2")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(finished_db, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (make test installs it where apt-get can: scripts/ensure-chromium)")
    out = tmp_path / "report"
    write_report(finished_db, out)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,2400", (out / "index.html").as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists(), "chromium wrote no screenshot"
    import numpy as np
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 2400)
    colors = img.getcolors(maxcolors=1 << 20)
    # a rendered report has text, tables and plots: many distinct colours, not a blank page
    assert colors is None or len(colors) > 200
    px = np.asarray(img).astype(int)
    # the inlined figure rendered: the strip plot's blue points and the box plot's orange medians are on the page
    blue = ((px[..., 2] > 150) & (px[..., 0] < 80) & (px[..., 1] < 160)).sum()
    orange = ((px[..., 0] > 200) & (px[..., 1] > 60) & (px[..., 1] < 200) & (px[..., 2] < 120)).sum()
    assert blue > 50 and orange > 20


def test_recommendations_state_the_float32_arithmetic_floor_for_gptq_and_sparsegpt():
    from calibrant.studies.report import ARITHMETIC_FLOOR_PCT, Report, _recommendations

    def row(config: str, best: float, worst: float) -> dict:
        return {"model": "m", "config": config, "metric": "ppl:wiki", "n": 6, "best_mean": best, "worst_mean": worst,
                "best_source": "wiki", "worst_source": "news", "seed_std": 0.1}

    rows = [row("gptq scheme=w4g128", 30.0, 30.0 * (1 + ARITHMETIC_FLOOR_PCT / 200)),
            row("gptq scheme=w4g128 precision=float64", 30.0, 30.3),
            row("sparsegpt+gptq pattern=2:4", 40.0, 44.0), row("wanda sparsity=0.5", 40.0, 40.4)]
    lines = _recommendations(Report("t", {}, summary=rows))
    floor = [("Arithmetic floor" in line, "no evidence" in line) for line in lines]
    assert floor == [(True, True), (False, False), (True, False), (False, False)]
    assert f"up to {ARITHMETIC_FLOOR_PCT:g}%" in lines[0] and ARITHMETIC_FLOOR_PCT > 0


def test_report_while_a_study_holds_the_database(finished_db, tmp_path):
    """A report (read-only) can be written while another study run holds the database's writer lock, and
    it leaves the database as it found it."""
    from calibrant.studies.store import ResultStore

    with ResultStore(finished_db, lock=True) as writer:
        rep = write_report(finished_db, tmp_path / "report")
        writer.record_attempt("k", "another")  # the writer still writes after the report
    assert rep.summary and (tmp_path / "report" / "report.md").is_file()
    with sqlite3.connect(finished_db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM attempts WHERE run_key='k'").fetchone()[0] == 1
