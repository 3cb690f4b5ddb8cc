"""Studies: declarative grids over model × method × calibration × seed, resumable, stored in SQLite."""

from calibrant.studies.report import build_report, write_report
from calibrant.studies.runner import StudySummary, estimate, run_key, run_study
from calibrant.studies.spec import PlannedRun, StudySpec, StudySpecError, load_study, presets
from calibrant.studies.store import SCHEMA_VERSION, ResultStore, StoreError

__all__ = ["SCHEMA_VERSION", "PlannedRun", "ResultStore", "StoreError", "StudySpec", "StudySpecError", "StudySummary",
           "build_report", "estimate", "load_study", "presets", "run_key", "run_study", "write_report"]
