"""Pipelines: YAML files that chain the stages, resumable stage by stage.

A pipeline file holds ``vars`` (strings referenced as ``${name}`` anywhere below) and a
list of ``stages``; each stage names its kind (``stage: train``), optionally a unique
``name`` (default: the kind) and the options of that stage: the command's paths and
its config keys (``region_size``, ``epochs``, ``k``...). Relative paths resolve against
the working folder (``--workdir``, default: the pipeline file's folder); ``${workdir}``
and ``${configs}`` (the shipped configs, :func:`superdml.shipped.configs_dir`) are
predefined. A shipped pipeline runs by name (``label_mosaic``). ``--set
key=value`` overrides a var (``--set mosaic=big.tif``) or an option
(``--set train.epochs=3``).

The whole file is checked before anything runs: unknown stage kinds and options,
missing required options, bad config values, ``${var}`` without a value, and input
paths that neither exist nor come from an earlier stage are errors naming the file and
line. Each stage records a manifest (its options and the fingerprints of its inputs,
including the manifests of the stages that produced them) in
``<workdir>/.superdml/<name>.json``. A stage whose manifest matches and whose run
finished is skipped; any change reruns it and, through the fingerprints, everything
downstream. ``force`` reruns the named stages and what follows them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from superdml._private.atomic import write_json
from superdml._private.ownership import check_apart, claim_output, remove_output
from superdml.config import (
    CropsConfig,
    IndexConfig,
    LabelConfig,
    ReviewConfig,
    SegmentConfig,
    TrainConfig,
    from_dict,
    load_config,
    parse_override,
)
from superdml.errors import ConfigError, InputError
from superdml.provenance import fingerprint
from superdml.shipped import configs_dir, loss_config_path, resolve_pipeline

logger = logging.getLogger(__name__)

STATE_DIR = ".superdml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


# ------------------------------------------------------------------------ stages


@dataclass(frozen=True)
class StageKind:
    """How the runner calls one kind of stage.

    Attributes
    ----------
    run : callable
        ``run(options, context) -> None``; options are resolved (absolute paths).
    required : tuple of str
        Options that must be given.
    paths : tuple of str
        Options holding paths (resolved against the working folder).
    inputs : tuple of str
        Path options read by the stage (fingerprinted).
    outputs : tuple of str
        Path options the stage writes.
    config : type or None
        Dataclass of the stage's config keys, accepted as options.
    extra : tuple of str
        Other accepted options.
    edited : tuple of str
        Inputs people edit by hand (crop folders they sort): fingerprinted by content
        even when an earlier stage made them.
    """

    run: Callable[[dict[str, Any], RunContext], None]
    required: tuple[str, ...]
    paths: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    config: type | None = None
    extra: tuple[str, ...] = ()
    edited: tuple[str, ...] = ()

    def options(self) -> list[str]:
        """Every option name this kind accepts."""
        keys = list(self.paths) + list(self.extra)
        if self.config is not None:
            keys += [f.name for f in fields(self.config)]
        return sorted(set(keys))


@dataclass
class RunContext:
    """What every stage run shares: the dask client, device and whether to resume."""

    client: Any = None
    device: str = "auto"
    resume: bool = False


def _split(options: dict[str, Any], config_cls: type | None) -> tuple[Any, dict[str, Any]]:
    """Build the stage config from its keys (and ``config`` file); return the rest."""
    if config_cls is None:
        return None, options
    names = {f.name for f in fields(config_cls)}
    keys = {k: v for k, v in options.items() if k in names}
    rest = {k: v for k, v in options.items() if k not in names}
    config_file = rest.pop("config", None)
    return load_config(config_file, config_cls, keys), rest


def _run_segment(options: dict[str, Any], ctx: RunContext) -> None:
    from superdml.segment import segment_raster

    config, rest = _split(options, SegmentConfig)
    rasters = rest["rasters"] if isinstance(rest["rasters"], list) else [rest["rasters"]]
    for raster in rasters:
        segment_raster(raster, rest["out"], config, client=ctx.client)


def _run_crops(options: dict[str, Any], ctx: RunContext) -> None:
    from superdml.crops import export_crops

    config, rest = _split(options, CropsConfig)
    export_crops(
        rest["segments"], rest["out"], config, rest.get("label_raster"), rest.get("classes"),
        client=ctx.client,
    )  # fmt: skip


def _run_train(options: dict[str, Any], ctx: RunContext) -> None:
    from superdml.train import LAST, TRAIN_FILES, train

    names = {f.name for f in fields(TrainConfig)}
    keys = {k: v for k, v in options.items() if k in names}
    config_file = options.get("config") or loss_config_path(keys.get("loss"))
    config = load_config(config_file, TrainConfig, keys)
    out = Path(options["out"])
    resume = ctx.resume and (out / LAST).exists()
    if not resume:
        remove_output(out, "train", TRAIN_FILES)  # this stage's own output of an older run
    train(
        options["train_dir"], out, config, options.get("val_dir"), resume=resume,
        init=options.get("init"), device=ctx.device,
    )  # fmt: skip


def _run_index(options: dict[str, Any], ctx: RunContext) -> None:
    from superdml.index import build_index

    config, rest = _split(options, IndexConfig)
    build_index(rest["checkpoint"], rest["reference_dir"], rest["out"], config, ctx.device)


def _run_label(options: dict[str, Any], ctx: RunContext) -> None:
    from superdml.label import label

    config, rest = _split(options, LabelConfig)
    label(
        rest["segments"], rest["checkpoint"], rest["reference"], rest["out"], config,
        rest.get("raster"), ctx.device, ctx.client, overwrite=True,
    )  # fmt: skip


def _run_export(options: dict[str, Any], ctx: RunContext) -> None:
    from superdml.export import export

    export(
        options["out"], options["segments"], options.get("raster_format", "cog"),
        options.get("vector", "gpkg"),
    )  # fmt: skip


def _run_evaluate(options: dict[str, Any], ctx: RunContext) -> None:
    from superdml.evaluate import evaluate

    evaluate(
        options["checkpoint"], options["query_dir"], options["out"],
        options.get("reference_dir"), ctx.device,
    )  # fmt: skip


def _run_review(options: dict[str, Any], ctx: RunContext) -> None:
    from superdml.review import REVIEW_FILES, review

    config, rest = _split(options, ReviewConfig)
    remove_output(rest["folder"], "review", REVIEW_FILES)  # its own output of an older run
    review(rest["out"], rest["segments"], rest["folder"], config, rest.get("raster"), ctx.device)


def _run_compare(options: dict[str, Any], ctx: RunContext) -> None:
    before = json.loads(Path(options["before"]).read_text())
    after = json.loads(Path(options["after"]).read_text())
    write_comparison(before, after, Path(options["out"]))


def write_comparison(before: Mapping[str, Any], after: Mapping[str, Any], out: Path) -> None:
    """Write ``comparison.json`` and ``comparison.md``: each metric before, after, change."""
    b, a = before.get("metrics", before), after.get("metrics", after)
    rows = {
        k: {"before": b[k], "after": a[k], "change": a[k] - b[k]}
        for k in sorted(set(a) & set(b))
        if isinstance(a[k], int | float) and isinstance(b[k], int | float)
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", rows)
    lines = ["| metric | before | after | change |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {k} | {r['before']:.3f} | {r['after']:.3f} | {r['change']:+.3f} |"
        for k, r in rows.items()
    ]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


STAGES: dict[str, StageKind] = {
    "segment": StageKind(
        _run_segment, ("rasters", "out"), ("rasters", "out", "config"), ("rasters", "config"),
        ("out",), SegmentConfig,
    ),
    "crops": StageKind(
        _run_crops, ("segments", "out"), ("segments", "out", "label_raster", "classes", "config"),
        ("segments", "label_raster", "classes", "config"), ("out",), CropsConfig,
    ),
    "train": StageKind(
        _run_train, ("train_dir", "out"), ("train_dir", "val_dir", "out", "init", "config"),
        ("train_dir", "val_dir", "init", "config"), ("out",), TrainConfig,
        edited=("train_dir", "val_dir"),
    ),
    "index": StageKind(
        _run_index, ("checkpoint", "reference_dir", "out"),
        ("checkpoint", "reference_dir", "out", "config"),
        ("checkpoint", "reference_dir", "config"), ("out",), IndexConfig,
        edited=("reference_dir",),
    ),
    "label": StageKind(
        _run_label, ("segments", "checkpoint", "reference", "out"),
        ("segments", "checkpoint", "reference", "out", "raster", "config"),
        ("segments", "checkpoint", "reference", "raster", "config"), ("out",), LabelConfig,
    ),
    "export": StageKind(
        _run_export, ("out", "segments"), ("out", "segments"), ("out", "segments"), (),
        None, ("raster_format", "vector"),
    ),
    "evaluate": StageKind(
        _run_evaluate, ("checkpoint", "query_dir", "out"),
        ("checkpoint", "query_dir", "reference_dir", "out"),
        ("checkpoint", "query_dir", "reference_dir"), ("out",),
        edited=("query_dir", "reference_dir"),
    ),
    "review": StageKind(
        _run_review, ("out", "segments", "folder"),
        ("out", "segments", "folder", "raster", "config"),
        ("out", "segments", "raster", "config"), ("folder",), ReviewConfig,
    ),
    "compare": StageKind(
        _run_compare, ("before", "after", "out"), ("before", "after", "out"), ("before", "after"),
        ("out",),
    ),
}  # fmt: skip


# ------------------------------------------------------------------------ loading


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of every mapping (as key ``__line__``)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


@dataclass
class Stage:
    """One resolved stage of a pipeline."""

    name: str
    kind: str
    options: dict[str, Any]
    line: int


@dataclass
class Pipeline:
    """A validated pipeline: its stages in order and the working folder."""

    path: Path
    workdir: Path
    stages: list[Stage] = field(default_factory=list)


def _substitute(value: Any, variables: Mapping[str, Any], where: str) -> Any:
    """Replace ``${var}``; a value that is exactly one ``${var}`` keeps the var's type."""
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        if whole and whole.group(1) in variables and not isinstance(variables[whole.group(1)], str):
            return variables[whole.group(1)]

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in variables:
                raise ConfigError(f"{where}: ${{{name}}} has no value (set it in vars or --set)")
            return str(variables[name])

        for _ in range(10):  # vars may reference vars
            new = _VAR.sub(replace, value)
            if new == value:
                break
            value = new
        return value
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


def _strip_lines(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_lines(v) for k, v in value.items() if k != "__line__"}
    if isinstance(value, list):
        return [_strip_lines(v) for v in value]
    return value


def load_pipeline(
    path: str | Path, sets: list[str] | None = None, workdir: str | Path | None = None
) -> Pipeline:
    """Read and validate a pipeline file (see the module docstring).

    Parameters
    ----------
    path : path
        The pipeline YAML, or the name of a shipped pipeline (``label_mosaic``).
    sets : list of str, optional
        ``key=value`` overrides of vars or ``stage.option`` values.
    workdir : path, optional
        Where relative paths resolve (default: the file's folder; for a shipped
        pipeline, the current folder).

    Raises
    ------
    ConfigError
        ``<file>:<line>: <problem>`` for anything that would fail later.
    MissingInputError
        When `path` is neither a file nor a shipped pipeline.
    """
    shipped = not Path(path).is_file()
    path = resolve_pipeline(path)
    try:
        doc = yaml.load(path.read_text(), Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list):
        raise ConfigError(f"{path}: expected a mapping with a list of 'stages'")
    unknown = set(doc) - {"vars", "stages", "__line__", "description"}
    if unknown:
        raise ConfigError(f"{path}:{doc['__line__']}: unknown top-level key {sorted(unknown)[0]!r}")
    variables = {k: v for k, v in _strip_lines(doc.get("vars") or {}).items()}
    stage_sets: dict[str, dict[str, Any]] = {}
    for text in sets or []:
        key, value = parse_override(text)
        if "." in key:
            stage, option = key.split(".", 1)
            stage_sets.setdefault(stage, {})[option] = value
        else:
            variables[key] = value
    root = Path(workdir or (Path.cwd() if shipped else path.parent)).resolve()
    variables.setdefault("workdir", str(root))
    variables.setdefault("configs", str(configs_dir()))
    pipeline = Pipeline(path, root)
    produced: set[Path] = set()
    read: set[tuple[Path, str]] = set()  # (input, stage) of this and earlier stages
    names: set[str] = set()
    for entry in doc["stages"]:
        line = entry.get("__line__", 0) if isinstance(entry, dict) else 0
        where = f"{path}:{line}"
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ConfigError(f"{where}: each stage needs 'stage: <kind>'")
        kind = entry["stage"]
        if kind not in STAGES:
            close = difflib.get_close_matches(str(kind), STAGES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown stage {kind!r}{hint}; known: {', '.join(STAGES)}")
        spec = STAGES[kind]
        name = str(entry.get("name", kind))
        if name in names:
            raise ConfigError(f"{where}: two stages named {name!r}: give one a 'name'")
        names.add(name)
        options = _strip_lines({k: v for k, v in entry.items() if k not in ("stage", "name")})
        options.update(stage_sets.pop(name, {}))
        options = _substitute(options, variables, where)
        accepted = spec.options()
        for key in options:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"{where}: stage {name!r}: unknown option {key!r}{hint}")
        for key in spec.required:
            if key not in options:
                raise ConfigError(f"{where}: stage {name!r}: missing option {key!r}")
        for key in spec.paths:
            if key in options and options[key] is not None:
                value = options[key]
                resolve = lambda p: str((root / p).resolve())  # noqa: E731
                options[key] = (
                    [resolve(v) for v in value] if isinstance(value, list) else resolve(value)
                )
        _check_config(spec, options, f"{where}: stage {name!r}")
        for key in spec.inputs:
            values = options.get(key)
            for value in values if isinstance(values, list) else [values]:
                if value is None:
                    continue
                p = Path(value)
                if not p.exists() and not any(p == q or q in p.parents for q in produced):
                    raise ConfigError(
                        f"{where}: stage {name!r}: {key} {value} does not exist and no "
                        "earlier stage makes it"
                    )
        for key in spec.inputs:
            values = options.get(key)
            read |= {(Path(v), name) for v in (values if isinstance(values, list) else [values])
                     if v is not None}  # fmt: skip
        for key in spec.outputs:
            for used, reader in sorted(read):
                try:
                    check_apart(options[key], [used])
                except InputError:
                    raise ConfigError(
                        f"{where}: stage {name!r}: {key} {options[key]} overlaps {used}, an input "
                        f"of stage {reader!r}: writing there could destroy it"
                    ) from None
            produced.add(Path(options[key]))
        pipeline.stages.append(Stage(name, kind, options, line))
    if stage_sets:
        raise ConfigError(f"--set {sorted(stage_sets)[0]}.…: no stage of that name in {path}")
    return pipeline


def _check_config(spec: StageKind, options: dict[str, Any], where: str) -> None:
    """Validate config keys now (types and ranges), so a bad value fails before any stage."""
    if spec.config is None:
        return
    names = {f.name for f in fields(spec.config)}
    keys = {k: v for k, v in options.items() if k in names}
    try:
        if spec.config is TrainConfig and "config" not in options:
            load_config(loss_config_path(keys.get("loss")), TrainConfig, keys)
        elif "config" in options:
            load_config(options["config"], spec.config, keys)
        else:
            from_dict(spec.config, keys)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


# ------------------------------------------------------------------------ running


def _fingerprint(path: Path, state: Path, edited: bool) -> str:
    """Token of an input: the producing stage's run, or the input's content.

    An input made by an earlier stage is named by that stage's run (its hash and when it
    finished), plus its content when people edit it (`edited`: crops sorted into a
    folder a stage made); any other input by its content (:mod:`superdml.provenance`).
    """
    for manifest in sorted(state.glob("*.json")):
        record = json.loads(manifest.read_text())
        for out in record.get("outputs", []):
            if path == Path(out) or Path(out) in path.parents:
                made = f"stage:{record['name']}:{record['hash']}:{record.get('finished')}"
                return f"{made}:{fingerprint(path)}" if edited else made
    return fingerprint(path)


def _stage_hash(stage: Stage, spec: StageKind, state: Path) -> str:
    inputs = {}
    for key in spec.inputs:
        values = stage.options.get(key)
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                inputs[f"{key}:{value}"] = _fingerprint(Path(value), state, key in spec.edited)
    blob = json.dumps(
        {"kind": stage.kind, "options": stage.options, "inputs": inputs}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class StageOutcome:
    """What happened to one stage: ``ran`` or ``skipped``, and how long it took."""

    name: str
    status: str
    seconds: float


@dataclass(frozen=True)
class PipelineResult:
    """Outcome of every stage, in order."""

    workdir: Path
    stages: list[StageOutcome]
    seconds: float


def run_pipeline(
    path: str | Path,
    sets: list[str] | None = None,
    workdir: str | Path | None = None,
    force: list[str] | None = None,
    client: Any = None,
    device: str = "auto",
) -> PipelineResult:
    """Run a pipeline file, skipping stages whose outputs are complete and up to date.

    Parameters
    ----------
    path : path
        The pipeline YAML (see the module docstring).
    sets : list of str, optional
        ``key=value`` overrides of vars or ``stage.option``.
    workdir : path, optional
        Where relative paths resolve and the stage manifests live.
    force : list of str, optional
        Stage names to rerun, with every stage after them.
    client : distributed.Client, optional
    device : {"auto", "cpu", "cuda"}

    Returns
    -------
    PipelineResult
    """
    start = time.perf_counter()
    pipeline = load_pipeline(path, sets, workdir)
    known = [s.name for s in pipeline.stages]
    for name in force or []:
        if name not in known:
            raise ConfigError(f"--force {name}: no such stage in {path} ({', '.join(known)})")
    with claim_output(pipeline.workdir / STATE_DIR, "pipeline") as state:
        outcomes = _run_stages(pipeline, state, force or [], client, device)
    return PipelineResult(pipeline.workdir, outcomes, time.perf_counter() - start)


def _run_stages(
    pipeline: Pipeline, state: Path, force: list[str], client: Any, device: str
) -> list[StageOutcome]:
    """Run or skip each stage in order (see :func:`run_pipeline`)."""
    forced = False
    outcomes = []
    for stage in pipeline.stages:
        spec = STAGES[stage.kind]
        forced = forced or stage.name in force
        digest = _stage_hash(stage, spec, state)
        manifest_path = state / f"{stage.name}.json"
        previous = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        outputs = [stage.options[k] for k in spec.outputs]
        done = (
            not forced
            and previous.get("hash") == digest
            and previous.get("finished") is not None
            and all(Path(p).exists() for p in outputs)
        )
        if done:
            logger.info("%s: up to date, skipped", stage.name)
            outcomes.append(StageOutcome(stage.name, "skipped", 0.0))
            continue
        resume = previous.get("hash") == digest and previous.get("finished") is None
        record = {"name": stage.name, "kind": stage.kind, "hash": digest, "options": stage.options,
                  "outputs": outputs, "started": time.time(), "finished": None}  # fmt: skip
        write_json(manifest_path, record)
        logger.info("%s: running", stage.name)
        t0 = time.perf_counter()
        spec.run(dict(stage.options), RunContext(client, device, resume))
        record["finished"] = time.time()
        write_json(manifest_path, record)
        outcomes.append(StageOutcome(stage.name, "ran", time.perf_counter() - t0))
    return outcomes
