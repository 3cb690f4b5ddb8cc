"""Study specs: a YAML grid over models × methods (with parameter grids) × calibration × seeds.

A spec expands into :class:`PlannedRun` objects. Expansion is pure (no model is loaded): it checks
every name and parameter up front so a typo costs nothing, and it collapses the calibration axes
for runs that do not read calibration data (dense baselines, RTN, magnitude): those are one run,
not one per source and seed.

Example::

    name: impact
    models: [smollm2-135m]
    methods:
      - {name: wanda, sparsity: 0.5, pattern: [null, "2:4"]}
      - {name: gptq, scheme: w4g128}
      - {name: dense}
    calibration:
      sources: [wiki, news, random-vocab]
      n: 32
      length: 512
      seeds: [0, 1, 2]
    evaluation:
      perplexity: [wiki, news]
      max_tokens: 16384
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from calibrant.cache import stable_hash
from calibrant.errors import CalibrantError, suggest

DENSE = "dense"


class StudySpecError(CalibrantError):
    """A study spec that cannot be expanded (bad YAML, unknown key, empty grid)."""


TOP_KEYS = {"name", "description", "models", "methods", "calibration", "evaluation", "options"}
CALIB_KEYS = {"sources", "n", "length", "seeds", "sampling"}
EVAL_KEYS = {"perplexity", "max_tokens", "seq_len", "tasks", "limit", "num_fewshot", "batch_size", "scorer",
             "token_budget"}
OPTION_KEYS = {"batch_size", "propagate", "pipeline", "device"}
EVAL_DEFAULTS: dict[str, Any] = {"perplexity": ["wiki"], "max_tokens": 16384, "seq_len": 512, "tasks": [],
                                 "limit": None, "num_fewshot": 0, "batch_size": 8, "scorer": "prefix",
                                 "token_budget": None}
# how zero-shot requests are scored, not what is measured (both scorers give the same log-likelihoods):
# left out of a run's key, so choosing one never reruns a study
EVAL_EXECUTION_KEYS = ("scorer", "token_budget")
OPTION_DEFAULTS: dict[str, Any] = {"batch_size": 8, "propagate": "compressed", "pipeline": "one-pass", "device": None}


# ---------------------------------------------------------------- YAML with positions
class _MarkedDict(dict):
    """A mapping that remembers the line and column of each key (1-based) for error messages."""

    marks: dict[str, tuple[int, int]]
    where: tuple[int, int] = (0, 0)


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _MarkedDict:
    loader.flatten_mapping(node)
    out = _MarkedDict()
    out.marks = {}
    out.where = (node.start_mark.line + 1, node.start_mark.column + 1)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise StudySpecError(f"line {key_node.start_mark.line + 1}, column {key_node.start_mark.column + 1}: "
                                 f"key {key!r} is not a string; spec keys are names such as 'methods'")
        if key in out:
            raise StudySpecError(f"line {key_node.start_mark.line + 1}, column {key_node.start_mark.column + 1}: "
                                 f"duplicate key '{key}'; keep one")
        out[key] = loader.construct_object(value_node, deep=True)
        out.marks[key] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _at(mapping: Any, key: str | None = None) -> str:
    if isinstance(mapping, _MarkedDict):
        line, col = mapping.marks.get(key, mapping.where) if key else mapping.where
        if line:
            return f"line {line}, column {col}: "
    return ""


def _check_keys(mapping: Any, allowed: set[str], where: str) -> None:
    if not isinstance(mapping, dict):
        raise StudySpecError(f"{_at(mapping)}'{where}' must be a mapping of {', '.join(sorted(allowed))}")
    for key in mapping:
        if key not in allowed:
            raise StudySpecError(f"{_at(mapping, key)}unknown key '{key}' in {where}; allowed: "
                                 f"{', '.join(sorted(allowed))}.{suggest(key, allowed)}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


# ---------------------------------------------------------------- the expanded plan
@dataclass(frozen=True)
class PlannedRun:
    """One run of a study, before any model or data is touched."""

    model: str
    method: str  # "dense", a method, or a chain "sparsegpt+gptq"
    params: tuple[tuple[str, Any], ...]  # sorted (name, value); hashable
    calibration: str | None  # spec string, None for runs that read no calibration data
    seed: int | None
    evaluation: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, Any], ...]

    @property
    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def eval_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.evaluation}

    @property
    def measured_eval(self) -> dict[str, Any]:
        """The evaluation without how it is executed (``EVAL_EXECUTION_KEYS``): what identifies a result."""
        return {k: v for k, v in self.eval_dict.items() if k not in EVAL_EXECUTION_KEYS}

    @property
    def options_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def label(self) -> str:
        """Method and parameters in one short string, e.g. ``wanda sparsity=0.5 pattern=2:4``."""
        parts = [self.method] + [f"{k}={v}" for k, v in self.params if v is not None]
        return " ".join(parts)

    @property
    def spec_key(self) -> str:
        """Hash of the declarative description (model spec, method, calibration spec, seed, evaluation).

        Cheap (no model or data is read); the content key that decides whether a run is done also
        includes the model's and the calibration set's content hashes and calibrant's version."""
        return stable_hash({"model": self.model, "method": self.method, "params": self.params_dict,
                            "calibration": self.calibration, "seed": self.seed, "evaluation": self.measured_eval,
                            "options": self.options_dict})


@dataclass
class StudySpec:
    name: str
    models: list[str]
    methods: list[dict[str, Any]]  # each {"name": ..., param: [values]}
    calibration: list[tuple[str, int]]  # (spec string, seed)
    evaluation: dict[str, Any]
    options: dict[str, Any]
    description: str = ""
    source: str = ""  # file path or preset name
    raw: dict[str, Any] = field(default_factory=dict)

    def expand(self) -> list[PlannedRun]:
        """All runs of the grid, in a stable order, with calibration-free runs collapsed."""
        from calibrant.methods import needs_data

        evaluation = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.evaluation.items()))
        options = tuple(sorted(self.options.items()))
        runs: list[PlannedRun] = []
        seen: set[PlannedRun] = set()
        for model in self.models:
            for entry in self.methods:
                name = entry["name"]
                grid = {k: _as_list(v) for k, v in entry.items() if k != "name"}
                keys = sorted(grid)
                for values in itertools.product(*(grid[k] for k in keys)):
                    params = tuple((k, v) for k, v in zip(keys, values, strict=True) if v is not None)
                    free = name == DENSE or not needs_data(name, **dict(params))
                    calibs: list[tuple[str | None, int | None]] = [(None, None)] if free else list(self.calibration)
                    for calib, seed in calibs:
                        run = PlannedRun(model, name, params, calib, seed, evaluation, options)
                        if run not in seen:
                            seen.add(run)
                            runs.append(run)
        return runs


def _grid_points(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Every parameter combination of a method entry's grid."""
    grid = {k: _as_list(v) for k, v in entry.items() if k != "name"}
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _method_entries(value: Any, spec: Any) -> list[dict[str, Any]]:
    """Each method entry with its parameter grid; every grid point is built once here (the one validation
    of method parameters, :func:`calibrant.methods.make_recipe`), so a bad name or value fails at plan time."""
    from calibrant.errors import RecipeError
    from calibrant.methods import METHODS, make_recipe, parameters, recipe_classes

    if not isinstance(value, list) or not value:
        raise StudySpecError(f"{_at(spec, 'methods')}'methods' must be a non-empty list such as "
                             "[{name: wanda, sparsity: 0.5}, {name: dense}]")
    entries = []
    for item in value:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or "name" not in item:
            raise StudySpecError(f"{_at(item) or _at(spec, 'methods')}each method needs a 'name' "
                                 f"(one of dense, {', '.join(METHODS)}, or a chain such as sparsegpt+gptq)")
        name = str(item["name"]).strip().lower()
        if name == DENSE:
            allowed: set[str] = set()
        else:
            try:
                classes = recipe_classes(name)
            except RecipeError as exc:
                raise StudySpecError(f"{_at(item, 'name')}{exc}".replace(f"{', '.join(METHODS)}.",
                                     f"dense or {', '.join(METHODS)}.")) from None
            allowed = set().union(*(parameters(c) for c in classes))
        for key, v in item.items():
            if key == "name":
                continue
            if key not in allowed:
                takes = ", ".join(sorted(allowed)) or "no parameters"
                raise StudySpecError(f"{_at(item, key)}method '{name}' does not take '{key}' (it takes {takes})."
                                     f"{suggest(key, allowed)}")
            if isinstance(v, list) and not v:
                raise StudySpecError(f"{_at(item, key)}'{key}' of method '{name}' is an empty list: the grid would "
                                     "have no runs; give at least one value")
        if name != DENSE:
            for params in _grid_points(item):
                try:
                    make_recipe(name, **params)
                except RecipeError as exc:
                    raise StudySpecError(f"{_at(item) or _at(spec, 'methods')}{name}: {exc}") from None
        entries.append({"name": name, **{k: v for k, v in item.items() if k != "name"}})
    return entries


def _calibration(value: Any) -> list[tuple[str, int]]:
    from calibrant.calibration.calibset import SOURCES as known
    from calibrant.calibration.spec import parse_spec

    if value is None:
        return []
    _check_keys(value, CALIB_KEYS, "calibration")
    sources = _as_list(value.get("sources", []))
    ns = _as_list(value.get("n", 128))
    lengths = _as_list(value.get("length", 512))
    seeds = _as_list(value.get("seeds", [0]))
    sampling = value.get("sampling")
    for key, vals in (("sources", sources), ("n", ns), ("length", lengths), ("seeds", seeds)):
        if not vals:
            raise StudySpecError(f"{_at(value, key)}calibration '{key}' is empty: the grid would have no runs")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise StudySpecError(f"{_at(value, 'seeds')}seed {s!r} is not an integer")
    out = []
    for source, n, length in itertools.product(sources, ns, lengths):
        head = str(source).strip().lower()
        own_tokens = head.split(":")[0] in ("self", "random-vocab") or head.startswith("mix(")
        text = f"{source}:{sampling}:{n}x{length}" if sampling and not own_tokens else f"{source}:{n}x{length}"
        try:
            parsed = parse_spec(text)
        except CalibrantError as exc:
            raise StudySpecError(f"{_at(value, 'sources')}{exc}") from None
        if parsed.source not in known:
            raise StudySpecError(f"{_at(value, 'sources')}unknown calibration source '{parsed.source}'; choose one of "
                                 f"{', '.join(known)}.{suggest(parsed.source, known)}")
        out.extend((text, int(s)) for s in seeds)
    return out


def parse_study(data: Any, source: str = "") -> StudySpec:
    """Validate a loaded YAML document and build the :class:`StudySpec`."""
    if not isinstance(data, dict):
        raise StudySpecError(f"{source or 'the spec'} is not a mapping; a study spec starts with keys such as "
                             "'name:', 'models:', 'methods:'")
    _check_keys(data, TOP_KEYS, "the study spec")
    for key in ("models", "methods"):
        if key not in data:
            raise StudySpecError(f"the study spec has no '{key}'; add e.g. "
                                 + ("models: [smollm2-135m]" if key == "models" else "methods: [{name: wanda}]"))
    models = [str(m) for m in _as_list(data["models"])]
    if not models:
        raise StudySpecError(f"{_at(data, 'models')}'models' is empty: the grid would have no runs")
    methods = _method_entries(data["methods"], data)
    calibration = _calibration(data.get("calibration"))
    evaluation = dict(EVAL_DEFAULTS)
    if data.get("evaluation") is not None:
        _check_keys(data["evaluation"], EVAL_KEYS, "evaluation")
        evaluation.update(data["evaluation"])
    for key in ("perplexity", "tasks"):
        evaluation[key] = [str(x) for x in _as_list(evaluation[key] or [])]
    from calibrant.calibration import check_heldout_name

    for name in evaluation["perplexity"]:
        try:
            check_heldout_name(name)
        except CalibrantError as exc:
            raise StudySpecError(f"{_at(data.get('evaluation') or {}, 'perplexity')}{exc}") from None
    if evaluation["tasks"]:
        from calibrant.evaluate.zeroshot.tasks import SCORERS

        if evaluation["scorer"] not in SCORERS:
            raise StudySpecError(f"{_at(data['evaluation'], 'scorer')}unknown evaluation scorer "
                                 f"{evaluation['scorer']!r}; choose from {', '.join(SCORERS)}")
        budget = evaluation["token_budget"]
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0):
            raise StudySpecError(f"{_at(data['evaluation'], 'token_budget')}evaluation token_budget must be a "
                                 f"positive number of tokens, got {budget!r}")
    if not evaluation["perplexity"] and not evaluation["tasks"]:
        raise StudySpecError(f"{_at(data, 'evaluation')}the evaluation measures nothing; give 'perplexity' corpora "
                             "or 'tasks'")
    options = dict(OPTION_DEFAULTS)
    if data.get("options") is not None:
        _check_keys(data["options"], OPTION_KEYS, "options")
        options.update(data["options"])
    spec = StudySpec(name=str(data.get("name") or Path(source).stem or "study"), models=models, methods=methods,
                     calibration=calibration, evaluation=evaluation, options=options,
                     description=str(data.get("description") or ""), source=source, raw=dict(data))
    from calibrant.methods import needs_data

    if not spec.calibration and any(e["name"] != DENSE and needs_data(e["name"], **params)
                                    for e in methods for params in _grid_points(e)):
        raise StudySpecError("methods that read calibration data are listed but 'calibration' has no sources; add "
                             "calibration: {sources: [wiki], n: 128, length: 512, seeds: [0]}")
    if not spec.expand():
        raise StudySpecError("the grid expands to no runs; check the lists in 'methods' and 'calibration'")
    return spec


def presets() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("calibrant.studies.presets").iterdir()
                  if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    if name not in presets():
        raise StudySpecError(f"unknown preset '{name}'; choose one of {', '.join(presets())}.{suggest(name, presets())}")
    return resources.files("calibrant.studies.presets").joinpath(f"{name}.yaml").read_text()


def load_study(spec: str | Path | dict[str, Any]) -> StudySpec:
    """A YAML file, a preset name (``impact``, ``self-calibration``, ``ptq-grid``) or an already-loaded dict."""
    if isinstance(spec, dict):
        return parse_study(spec, "<dict>")
    path = Path(spec)
    if path.is_file():
        try:
            text, source = path.read_bytes().decode("utf-8"), str(path)
        except UnicodeDecodeError as exc:
            raise StudySpecError(f"{path} is not a text file (byte {exc.start} is not UTF-8); give the path of a "
                                 "study YAML file ('calibrant study preset impact' prints one to start from)") from None
    elif str(spec) in presets():
        text, source = preset_text(str(spec)), f"preset:{spec}"
    else:
        raise StudySpecError(f"'{spec}' is neither a study spec file nor a preset ({', '.join(presets())}); give the "
                             "path of a YAML file")
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise StudySpecError(f"{source}: {where}malformed YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise StudySpecError(f"{source}: malformed YAML: {exc}") from None
    try:
        return parse_study(data, source)
    except StudySpecError as exc:
        raise StudySpecError(f"{source}: {exc}") from None
