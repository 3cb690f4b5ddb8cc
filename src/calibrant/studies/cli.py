"""`calibrant study …`: plan, run, status, export, report, preset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from calibrant.errors import CalibrantError, suggest
from calibrant.tables import table


def _load_spec(spec: str) -> Any:
    """The study of a YAML file or preset; a name that is neither gets the close preset suggested."""
    from calibrant.studies.spec import StudySpecError, load_study, presets

    try:
        return load_study(spec)
    except StudySpecError as exc:
        hint = suggest(spec, presets()) if not Path(spec).exists() else ""
        if hint and "neither a study spec file nor a preset" in str(exc):
            raise StudySpecError(f"{exc}.{hint}") from None
        raise


def _check_db_location(db: str) -> None:
    from calibrant.export.hf import check_output_file

    check_output_file(db, "--db", "results.sqlite")


def cmd_plan(args: argparse.Namespace) -> int:
    from calibrant.studies.runner import estimate, plan_table
    from calibrant.studies.store import ResultStore

    spec = _load_spec(args.spec)
    rows, per_token = estimate(spec, progress=not args.quiet)
    store = ResultStore(args.db, create=False) if args.db and Path(args.db).exists() else None
    try:
        print(table(plan_table(rows, store, spec.name), ["#", "model", "method", "calibration", "seed", "estimate",
                                                          "in db"]))
    finally:
        if store is not None:
            store.close()
    total = sum(r.estimate_s for r in rows)
    speeds = ", ".join(f"{m}: {1 / s:,.0f} tok/s" for m, s in per_token.items())
    print(f"study {spec.name}: {len(rows)} runs, estimated {total / 60:.1f} min on this machine with one worker "
          f"(dense forward measured at {speeds}; method costs from BENCHMARKS.md)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from calibrant.studies.runner import run_study

    _check_db_location(args.db)  # before the spec is expanded and any run starts
    spec = _load_spec(args.spec)
    summary = run_study(spec, args.db, executor=args.executor, workers=args.workers, address=args.address,
                        retry_failed=args.retry_failed, progress=not args.quiet)
    print(summary.line())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from calibrant.studies.store import ResultStore

    with ResultStore(args.db, create=False) as store:
        rows = []
        for study in store.studies():
            c = store.counts(study)
            rows.append([study, c.get("done", 0), c.get("failed", 0), len(store.interrupted(study))])
        print(table(rows, ["study", "done", "failed", "interrupted (redone on next run)"]) if rows
              else f"{args.db}: no runs yet")
        if args.spec:
            spec = _load_spec(args.spec)
            have = store.spec_keys(spec.name)
            runs = spec.expand()
            left = [r for r in runs if r.spec_key not in have]
            print(f"spec {spec.name}: {len(runs) - len(left)} of {len(runs)} runs in the database, {len(left)} to go")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from calibrant.cache import atomic_path
    from calibrant.export.hf import check_output_file
    from calibrant.studies.store import ResultStore

    out = Path(args.csv)
    if out.exists() and not out.is_dir() and not args.overwrite:
        raise CalibrantError(f"{out} exists; pass --overwrite to replace it or choose another --csv path")
    check_output_file(out, "--csv", "results.csv")
    with ResultStore(args.db, create=False) as store:
        studies = store.studies()
        if args.study is not None and args.study not in studies:
            held = f"it holds {', '.join(studies)}" if studies else "it holds no studies yet"
            raise CalibrantError(f"no study '{args.study}' in {args.db}; {held}.{suggest(args.study, studies)} "
                                 "Leave out --study to export every run")
        frame = store.frame(args.study)
    frame = frame.drop(columns=["details"])
    with atomic_path(out, overwrite=True) as tmp:
        frame.to_csv(tmp, index=False)
    print(f"wrote {len(frame)} runs × {frame.shape[1]} columns to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from calibrant.export.hf import check_writable
    from calibrant.studies.report import write_report

    check_writable(args.out, "--out")
    rep = write_report(args.db, args.out, study=args.study)
    print(f"wrote {Path(args.out) / 'index.html'} (+ report.md, {len(rep.figures)} figures, tables.json)")
    for line in rep.recommendations:
        print(" - " + line.replace("**", ""))
    return 0


def cmd_preset(args: argparse.Namespace) -> int:
    from calibrant.studies.spec import preset_text, presets

    if not args.name:
        print("\n".join(presets()))
    else:
        print(preset_text(args.name), end="")
    return 0


def add_study_parser(sub: Any) -> None:
    st = sub.add_parser("study", help="declarative grids of runs: plan, run (resumable), status, export, report")
    ssub = st.add_subparsers(dest="study_command", required=True)
    spec_help = "a study YAML file or a preset name (impact, self-calibration, ptq-grid)"

    p = ssub.add_parser("plan", help="print the expanded runs and an estimate of their cost")
    p.add_argument("spec", help=spec_help)
    p.add_argument("--db", default=None, help="mark runs already in this database")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_plan)

    r = ssub.add_parser("run", help="run every run not yet in --db; safe to interrupt and rerun")
    r.add_argument("spec", help=spec_help)
    r.add_argument("--db", default="results.sqlite", help="SQLite results database (created if missing)")
    r.add_argument("--executor", choices=["local", "processes", "ray"], default="local",
                   help="local: one run at a time in this process; processes: --workers local processes; "
                        "ray: one Ray task per run (a local Ray, or the cluster at --address)")
    r.add_argument("--workers", type=int, default=1, help="parallel runs for processes / local Ray")
    r.add_argument("--address", default=None, help="Ray cluster address, e.g. ray://head:10001 or auto")
    r.add_argument("--retry-failed", action="store_true", help="redo runs recorded as failed")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_run,
                   on_interrupt="the runs already finished are kept in --db; rerun the same command to resume")

    s = ssub.add_parser("status", help="done / failed / interrupted runs per study in --db")
    s.add_argument("spec", nargs="?", default=None, help="also count what is left of this spec")
    s.add_argument("--db", default="results.sqlite")
    s.set_defaults(func=cmd_status)

    e = ssub.add_parser("export", help="one row per run, one column per metric, as CSV")
    e.add_argument("--db", default="results.sqlite")
    e.add_argument("--csv", required=True, help="output CSV file")
    e.add_argument("--study", default=None, help="only this study")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)

    rp = ssub.add_parser("report", help="HTML + Markdown + PNG report with variance plots and recommendations")
    rp.add_argument("db", help="the study database")
    rp.add_argument("--out", required=True, help="report directory (replaced if it is a calibrant report)")
    rp.add_argument("--study", default=None, help="only this study")
    rp.set_defaults(func=cmd_report)

    pr = ssub.add_parser("preset", help="print a preset's YAML (to copy and edit), or list presets")
    pr.add_argument("name", nargs="?", default=None)
    pr.set_defaults(func=cmd_preset)
