"""Pipelines: YAML files that chain the stages, resumable stage by stage.

A pipeline file holds ``vars`` (strings referenced as ``${name}`` anywhere below) and a
list of ``stages``; each stage names its kind (``stage: train``), optionally a unique
``name`` (default: the kind) and the options of that stage: the command's paths and
its config keys (``region_size``, ``epochs``, ``k``...). Relative paths resolve against
the working folder (``--workdir``, default: the pipeline file's folder); ``${workdir}``
and ``${configs}`` (the shipped configs, :func:`superdml.config.shipped.configs_dir`) are
predefined. A shipped pipeline runs by name (``label_mosaic``). ``--set
key=value`` overrides a var (``--set mosaic=big.tif``) or an option
(``--set train.epochs=3``).

The whole file is checked before anything runs: unknown stage kinds and options,
missing required options, bad config values, ``${var}`` without a value, and input
paths that neither exist nor come from an earlier stage are errors naming the file and
line. Each stage records a manifest (its options and the fingerprints of its inputs,
including the manifests of the stages that produced them) in
``<workdir>/.superdml/<name>.json``. A stage whose manifest matches, whose run
finished and whose declared outputs (:attr:`StageSpec.outputs`) all exist is skipped;
any change (or a deleted output) reruns it and, through the fingerprints, everything
downstream. ``force`` reruns the named stages and what follows them.

The working folder, and any path, may be a URI of a bucket
(:mod:`superdml.core.storage`): relative paths then name keys under it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from superdml.cli.registry import RunContext, StageSpec
from superdml.cli.stages import REGISTRY
from superdml.config.schema import parse_override
from superdml.config.shipped import configs_dir, resolve_pipeline
from superdml.core import storage
from superdml.core.cluster import Stage as ClusterShape
from superdml.core.errors import ConfigError, InputError, SuperDMLError, did_you_mean
from superdml.core.ownership import check_apart, claim_output
from superdml.core.provenance import fingerprint
from superdml.raster.stac import is_stac, raster_fingerprint

logger = logging.getLogger(__name__)

STATE_DIR = ".superdml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


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
    workdir: Path | str
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


def _read_document(path: Path) -> dict[str, Any]:
    """Parse a pipeline file (lines kept as ``__line__``) and check its top-level keys."""
    try:
        doc = yaml.load(path.read_text(), Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), list):
        raise ConfigError(f"{path}: expected a mapping with a list of 'stages'")
    top_level = ("vars", "stages", "description")
    unknown = sorted(set(doc) - {*top_level, "__line__"})
    if unknown:
        hint = did_you_mean(unknown[0], top_level)
        raise ConfigError(f"{path}:{doc['__line__']}: unknown top-level key {unknown[0]!r}{hint}")
    return doc


def _apply_sets(sets: list[str], variables: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Put ``--set var=value`` into `variables`; return ``--set stage.option=value`` by stage."""
    stage_sets: dict[str, dict[str, Any]] = {}
    for text in sets:
        key, value = parse_override(text)
        if "." in key:
            stage, option = key.split(".", 1)
            stage_sets.setdefault(stage, {})[option] = value
        else:
            variables[key] = value
    return stage_sets


def _check_options(spec: StageSpec, options: Mapping[str, Any], where: str) -> None:
    """Refuse an option the stage does not take, or a required one that is missing."""
    accepted = spec.options()
    for key in options:
        if key not in accepted:
            hint = did_you_mean(key, accepted)
            raise ConfigError(f"{where}: unknown option {key!r}{hint}")
    for key in [p.name for p in spec.params if p.required and not p.cli_only]:
        if key not in options:
            raise ConfigError(f"{where}: missing option {key!r}")


def _resolve(root: Path | str, value: str) -> str:
    """Return an option's path or URI, relative to `root` (a folder or a URI) if relative."""
    if storage.is_uri(value):
        return str(storage.location(value))
    if storage.is_uri(root) and not Path(value).is_absolute():
        return str(storage.join(root, value))
    return str((Path(root) / value).resolve())


def _within(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it (paths or URIs, already resolved)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


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
    doc = _read_document(path)
    variables = {k: v for k, v in _strip_lines(doc.get("vars") or {}).items()}
    stage_sets = _apply_sets(sets or [], variables)
    root: Path | str = (
        storage.location(workdir)
        if workdir and storage.is_uri(workdir)
        else (Path(workdir or (Path.cwd() if shipped else path.parent)).resolve())
    )
    variables.setdefault("workdir", str(root))
    variables.setdefault("configs", str(configs_dir()))
    pipeline = Pipeline(path, root)
    produced: set[str] = set()
    read: set[tuple[str, str]] = set()  # (input, stage) of this and earlier stages
    names: set[str] = set()
    for entry in doc["stages"]:
        line = entry.get("__line__", 0) if isinstance(entry, dict) else 0
        where = f"{path}:{line}"
        if not isinstance(entry, dict) or "stage" not in entry:
            raise ConfigError(f"{where}: each stage needs 'stage: <kind>'")
        kind = entry["stage"]
        if kind not in REGISTRY:
            hint = did_you_mean(kind, REGISTRY)
            raise ConfigError(
                f"{where}: unknown stage {kind!r}{hint}; known: {', '.join(REGISTRY)}"
            )
        spec = REGISTRY[kind]
        name = str(entry.get("name", kind))
        if name in names:
            raise ConfigError(f"{where}: two stages named {name!r}: give one a 'name'")
        names.add(name)
        options = _strip_lines({k: v for k, v in entry.items() if k not in ("stage", "name")})
        options.update(stage_sets.pop(name, {}))
        options = _substitute(options, variables, where)
        _check_options(spec, options, f"{where}: stage {name!r}")
        for key in spec.paths("input") + spec.paths("output"):
            if key in options and options[key] is not None:
                value = options[key]
                options[key] = (
                    [_resolve(root, v) for v in value]
                    if isinstance(value, list)
                    else _resolve(root, value)
                )
        try:
            spec.check_options(options)
            spec.build_config(options)  # types and ranges now, before any stage runs
        except ConfigError as err:
            raise ConfigError(f"{where}: stage {name!r}: {err}") from None
        for key in spec.paths("input"):
            values = options.get(key)
            for value in values if isinstance(values, list) else [values]:
                if value is None:
                    continue
                if not storage.exists(value) and not any(_within(value, q) for q in produced):
                    raise ConfigError(
                        f"{where}: stage {name!r}: {key} {value} does not exist and no "
                        "earlier stage makes it"
                    )
        for key in spec.paths("input"):
            values = options.get(key)
            read |= {(v, name) for v in (values if isinstance(values, list) else [values])
                     if v is not None}  # fmt: skip
        for key in spec.paths("output"):
            for used, reader in sorted(read):
                try:
                    check_apart(options[key], [used])
                except InputError:
                    raise ConfigError(
                        f"{where}: stage {name!r}: {key} {options[key]} overlaps {used}, an input "
                        f"of stage {reader!r}: writing there could destroy it"
                    ) from None
            produced.add(options[key])
        pipeline.stages.append(Stage(name, kind, options, line))
    if stage_sets:
        raise ConfigError(f"--set {sorted(stage_sets)[0]}.…: no stage of that name in {path}")
    return pipeline


# ------------------------------------------------------------------------ running


def _fingerprint(path: str, state: Path | str, edited: bool) -> str:
    """Token of an input: the producing stage's run, or the input's content.

    An input made by an earlier stage is named by that stage's run (its hash and when it
    finished), plus its content when people edit it (`edited`: crops sorted into a
    folder a stage made); any other input by its content (:mod:`superdml.core.provenance`).
    """
    for name in storage.listdir(state):
        if not name.endswith(".json"):
            continue
        record = json.loads(storage.read_text(storage.join(state, name)))
        for out in record.get("outputs", []):
            if _within(path, out):
                made = f"stage:{record['name']}:{record['hash']}:{record.get('finished')}"
                return f"{made}:{fingerprint(path)}" if edited else made
    if is_stac(path):  # items.json#asset=KEY: the document's content and the key
        return raster_fingerprint(path)
    return fingerprint(path)


def _stage_hash(stage: Stage, spec: StageSpec, state: Path | str) -> str:
    edited = {p.name for p in spec.params if p.edited}
    inputs = {}
    for key in spec.paths("input"):
        values = stage.options.get(key)
        for value in values if isinstance(values, list) else [values]:
            if value is not None:
                inputs[f"{key}:{value}"] = _fingerprint(value, state, key in edited)
    blob = json.dumps(
        {"kind": stage.kind, "options": stage.options, "inputs": inputs}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _outputs_exist(spec: StageSpec, options: Mapping[str, Any]) -> bool:
    """Whether every output the stage declares exists (False when they cannot be read)."""
    if spec.outputs is None:
        raise TypeError(f"stage {spec.name!r} declares no outputs")  # a registry bug
    try:
        paths = spec.outputs(options)
    except SuperDMLError:
        return False
    return all(storage.exists(p) for p in paths)


@dataclass(frozen=True)
class StageOutcome:
    """What happened to one stage: ``ran`` or ``skipped``, and how long it took."""

    name: str
    status: str
    seconds: float


@dataclass(frozen=True)
class PipelineResult:
    """Outcome of every stage, in order."""

    workdir: Path | str
    stages: list[StageOutcome]
    seconds: float


def run_pipeline(
    path: str | Path,
    sets: list[str] | None = None,
    workdir: str | Path | None = None,
    force: list[str] | None = None,
    clients: Callable[[ClusterShape], Any] | None = None,
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
    clients : callable, optional
        ``clients(shape)``: the dask client of the stages of a cluster shape
        (:func:`superdml.core.cluster.stage_clients`); every stage runs in this process
        when None.
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
    with claim_output(storage.join(pipeline.workdir, STATE_DIR), "pipeline") as state:
        outcomes = _run_stages(pipeline, state, force or [], clients, device)
    return PipelineResult(pipeline.workdir, outcomes, time.perf_counter() - start)


def _run_stages(
    pipeline: Pipeline,
    state: Path | str,
    force: list[str],
    clients: Callable[[ClusterShape], Any] | None,
    device: str,
) -> list[StageOutcome]:
    """Run or skip each stage in order (see :func:`run_pipeline`)."""
    forced = False
    outcomes = []
    for stage in pipeline.stages:
        spec = REGISTRY[stage.kind]
        forced = forced or stage.name in force
        digest = _stage_hash(stage, spec, state)
        manifest_path = storage.join(state, f"{stage.name}.json")
        previous = (
            json.loads(storage.read_text(manifest_path)) if storage.exists(manifest_path) else {}
        )
        outputs = [stage.options[k] for k in spec.paths("output")]
        done = (
            not forced
            and previous.get("hash") == digest
            and previous.get("finished") is not None
            and all(storage.exists(p) for p in outputs)
            and _outputs_exist(spec, stage.options)
        )
        if done:
            logger.info("%s: up to date, skipped", stage.name)
            outcomes.append(StageOutcome(stage.name, "skipped", 0.0))
            continue
        resume = previous.get("hash") == digest and previous.get("finished") is None
        record = {"name": stage.name, "kind": stage.kind, "hash": digest, "options": stage.options,
                  "outputs": outputs, "started": time.time(), "finished": None}  # fmt: skip
        storage.write_json(manifest_path, record)
        logger.info("%s: running", stage.name)
        t0 = time.perf_counter()
        client = clients(spec.cluster) if clients and "client" in spec.context else None
        spec.run(dict(stage.options), RunContext(client, device, resume, overwrite=True))
        record["finished"] = time.time()
        storage.write_json(manifest_path, record)
        outcomes.append(StageOutcome(stage.name, "ran", time.perf_counter() - t0))
    return outcomes
