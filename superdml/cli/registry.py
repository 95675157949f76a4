"""What a stage is to the command line and to pipelines: its parameters, context and spec."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from superdml.config.load import load_config
from superdml.core import storage
from superdml.core.errors import ConfigError

CONFIG = "config"


@dataclass(frozen=True)
class Param:
    """One option of a stage that is not a config field.

    Attributes
    ----------
    name : str
        Its key in pipeline files and its Python name on the command line.
    role : {"input", "output", "value"}
        A path the stage reads (fingerprinted by pipelines), a folder it writes, or
        any other value.
    required : bool
        Must be given.
    help : str
        Help of the command-line option.
    cli : str
        Command-line spelling when not ``--<name>``: an option (``--out``) or, in
        capitals, a positional argument shown by that name (``SEGMENT_DIR``).
    arg : str
        Keyword of the entry function when not `name`.
    many : bool
        Takes several paths (a list in pipelines, ``nargs=-1`` on the command line).
    edited : bool
        An input people edit by hand (crops they sort): pipelines fingerprint it by
        content even when an earlier stage made it.
    flag : bool
        A command-line flag (``--overwrite``).
    choices : tuple of str
        Allowed values of a ``value`` parameter.
    default : object
        Default shown on the command line (the entry function's own default).
    cli_only : bool
        Not accepted in pipeline files (the pipeline decides it, as ``resume``).
    """

    name: str
    role: Literal["input", "output", "value"] = "value"
    required: bool = False
    help: str = ""
    cli: str = ""
    arg: str = ""
    many: bool = False
    edited: bool = False
    flag: bool = False
    choices: tuple[str, ...] = ()
    default: Any = None
    cli_only: bool = False


@dataclass
class RunContext:
    """What a run shares across its stages.

    Attributes
    ----------
    client : distributed.Client or None
        The dask client of stages that take one.
    device : {"auto", "cpu", "cuda"}
        Where models run.
    resume : bool
        Continue an interrupted run (``train --resume``; a pipeline stage that did not
        finish).
    overwrite : bool
        Replace what an older run of the stage wrote (``label --overwrite``; always in
        pipelines, which own their outputs).
    """

    client: Any = None
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False


Glue = Callable[[Callable[..., Any], dict[str, Any], RunContext], Any]


@dataclass(frozen=True)
class StageSpec:
    """One stage: its entry function, config and parameters (see the module docstring).

    Attributes
    ----------
    name : str
        Command name and pipeline ``stage:`` kind.
    entry : str
        ``"module:function"`` called with the parameters by keyword (``arg``), the
        config as `config` and the :class:`RunContext` fields named in `context`.
    summary : callable
        ``summary(result) -> str``: what the command prints.
    help : str
        The command's help.
    params : tuple of Param
    config : type or None
        The config dataclass; its fields are options too, plus ``config`` (a YAML file).
    context : tuple of str
        :class:`RunContext` fields passed to the entry function by keyword.
    cluster : {"cpu", "label"}
        Shape of the local dask cluster (:func:`superdml.core.cluster.make_client`).
    config_file : callable, optional
        ``config_file(options, resume) -> path or None``: the YAML to start from when
        no ``config`` is given (default: the dataclass defaults).
    glue : callable, optional
        Calls the entry function instead of one plain call (:data:`Glue`).
    exclusive : tuple of (str, str)
        Pairs of options that may not both be given.
    command : bool
        Also a command of the command line (else only a pipeline stage).
    options_from : type or None
        A base class of `config` whose fields alone are options (``evaluate`` reads a
        label config but takes only its labeling rule); all of `config`'s when None.
    outputs : callable
        ``outputs(options) -> list of paths``: the files and folders a finished run
        leaves; a pipeline reruns the stage when one is gone (or when the call raises
        a :class:`~superdml.core.errors.SuperDMLError`: what it wrote cannot be read).
        Evaluated after the earlier stages ran. Every stage declares it.
    uris : bool
        Whether its paths may be URIs of object stores (:mod:`superdml.core.storage`);
        a stage that works on local folders only refuses them with one line.
    """

    name: str
    entry: str
    summary: Callable[[Any], str]
    help: str
    params: tuple[Param, ...]
    config: type | None = None
    context: tuple[str, ...] = ()
    cluster: Literal["cpu", "label"] = "cpu"
    config_file: Callable[[Mapping[str, Any], bool], Any] | None = None
    glue: Glue | None = None
    exclusive: tuple[tuple[str, str], ...] = ()
    command: bool = True
    options_from: type | None = None
    outputs: Callable[[Mapping[str, Any]], list[Path | str]] | None = None
    uris: bool = False

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Refuse two :attr:`exclusive` options given together, and URIs where not taken.

        Raises
        ------
        ConfigError
        """
        for a, b in self.exclusive:
            if a in options and b in options:
                raise ConfigError(f"{a} and {b}: give one, not both")
        if self.uris:
            return
        for key in self.paths("input") + self.paths("output"):
            values = options.get(key)
            for value in values if isinstance(values, list | tuple) else [values]:
                if value is not None and storage.is_uri(value):
                    raise ConfigError(
                        f"{value}: superdml {self.name} reads and writes local paths only "
                        "(segment, label, export and index take URIs): copy it to a folder"
                    )

    def option_class(self) -> type | None:
        """Return the class whose fields are options (:attr:`options_from` or :attr:`config`)."""
        return self.options_from or self.config

    def config_fields(self) -> list[str]:
        """Names of the config fields that are options (none without a config)."""
        cls = self.option_class()
        return [f.name for f in dataclasses.fields(cls)] if cls else []

    def options(self) -> list[str]:
        """Every option a pipeline stage of this kind accepts."""
        names = [p.name for p in self.params if not p.cli_only] + self.config_fields()
        return sorted(names + [CONFIG] if self.config else names)

    def paths(self, role: str) -> list[str]:
        """Options holding paths with `role` (``input`` includes ``config``)."""
        names = [p.name for p in self.params if p.role == role]
        return names + [CONFIG] if role == "input" and self.config else names

    def build_config(self, options: Mapping[str, Any], resume: bool = False) -> Any:
        """Return the config of `options`: its fields over ``config`` (or the default file).

        Raises
        ------
        ConfigError
            Naming the file and the key of an unknown key or a bad value.
        """
        if self.config is None:
            return None
        fields = set(self.config_fields())
        keys = {k: v for k, v in options.items() if k.split(".")[0] in fields}
        path = options.get(CONFIG)
        if path is None and self.config_file is not None:
            path = self.config_file(options, resume)
        return load_config(path, self.config, keys)

    def run(self, options: Mapping[str, Any], ctx: RunContext) -> Any:
        """Call the entry function with resolved `options`; return its result."""
        self.check_options(options)
        module, _, function = self.entry.partition(":")
        entry = getattr(importlib.import_module(module), function)
        kwargs = {p.arg or p.name: options[p.name] for p in self.params if p.name in options}
        kwargs.update({name: getattr(ctx, name) for name in self.context})
        if self.config is not None:
            kwargs["config"] = self.build_config(options, ctx.resume)
        return self.glue(entry, kwargs, ctx) if self.glue else entry(**kwargs)
