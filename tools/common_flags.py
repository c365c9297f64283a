"""What the tools share (the library never sees flags): flags derived from the config dataclasses, one-line errors.

Tools that train call `define_training_flags()` before `app.run`, then `configs_from_flags()` to get the plain
dataclasses the library takes; every flag is a field of `hdml_tf.config` (`define_config_flags`). `run_main(fn)`
turns a user error into one line `error: ...` and exit code 2; `parse_flags` does the same for a bad flag.
"""
from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS


def _flag_name(field) -> str:
    return field.metadata.get("flag") or field.name


def define_config_flags(*classes, exclude=(), flag_values=None) -> None:
    """One absl flag per field of each config dataclass: name, type, default, help and choices all come from the
    field (`hdml_tf.config.option`), so the dataclasses are the only place they are written.

    Types: bool → DEFINE_bool; int; float; str with choices → DEFINE_enum; Optional[str] / str → DEFINE_string;
    Optional[bool] → DEFINE_enum auto|true|false (auto = None); Tuple[int, ...] → DEFINE_list of integers.
    """
    import dataclasses
    import typing

    from hdml_tf.config import choices_of
    fv = FLAGS if flag_values is None else flag_values
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name in exclude:
                continue
            name, kind, default = _flag_name(field), hints[field.name], field.default
            help_text, choices = field.metadata.get("help", ""), choices_of(field)
            if kind is bool:
                flags.DEFINE_bool(name, default, help_text, flag_values=fv)
            elif kind is int:
                flags.DEFINE_integer(name, default, help_text, flag_values=fv)
            elif kind is float:
                flags.DEFINE_float(name, default, help_text, flag_values=fv)
            elif kind == typing.Optional[bool]:
                flags.DEFINE_enum(name, "auto" if default is None else str(default).lower(),
                                  ["auto", "true", "false"], help_text + " (auto, true or false)", flag_values=fv)
            elif kind == typing.Tuple[int, ...]:
                flags.DEFINE_list(name, [str(v) for v in default], help_text, flag_values=fv)
            elif choices is not None:
                flags.DEFINE_enum(name, default, list(choices), help_text, flag_values=fv)
            elif kind in (str, typing.Optional[str]):
                flags.DEFINE_string(name, default, help_text, flag_values=fv)
            else:  # a field type this function does not know yet: a programming error, caught by the tests
                raise TypeError(f"{cls.__name__}.{field.name}: no flag type for {kind}")


def config_from_flags(cls, flag_values=None, **overrides):
    """An instance of config dataclass `cls` from the parsed flags `define_config_flags` defined.

    Raises:
      ConfigError: a value the dataclass rejects, or a list flag that is not integers.
    """
    import dataclasses
    import typing

    from hdml_tf.config import ConfigError
    fv = FLAGS if flag_values is None else flag_values
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        name = _flag_name(field)
        if field.name in overrides or name not in fv:
            continue
        value, kind = fv[name].value, hints[field.name]
        if kind == typing.Optional[bool]:
            value = None if value == "auto" else value == "true"
        elif kind == typing.Tuple[int, ...]:
            try:
                value = tuple(int(v) for v in value)
            except ValueError:
                raise ConfigError(f"--{name}={','.join(value)} must be a comma-separated list of integers") from None
        values[field.name] = value
    return cls(**values, **overrides)


def define_training_flags():
    """Every field of RunConfig, HDMLConfig and OptimConfig as a flag, plus --compare_baseline."""
    from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig
    define_config_flags(RunConfig, HDMLConfig, OptimConfig)
    flags.DEFINE_bool("compare_baseline", False, "Also train the plain baseline the same way and print both.")


def configs_from_flags():
    """(RunConfig, HDMLConfig, OptimConfig) from the parsed flags; raises ConfigError on a bad value."""
    from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig
    run = config_from_flags(RunConfig)
    hdml = config_from_flags(HDMLConfig)
    optim = config_from_flags(OptimConfig)
    hdml.layout().check_batch_size(run.batch_size)
    return run, hdml, optim


def read_flagfile(path) -> flags.FlagValues:
    """The values a training flagfile sets, parsed by the flags `define_config_flags` derives (every field of
    RunConfig, HDMLConfig and OptimConfig) in a FlagValues of their own, so this tool's flags stay untouched.

    Returns:
      flags.FlagValues; `config_from_flags(HDMLConfig, flag_values=...)` builds a config from it.
    Raises:
      ConfigError: the file cannot be read or holds a bad value.
    """
    from hdml_tf.config import ConfigError, HDMLConfig, OptimConfig, RunConfig
    fv = flags.FlagValues()
    define_config_flags(RunConfig, HDMLConfig, OptimConfig, flag_values=fv)
    try:
        fv(["flagfile", f"--flagfile={path}"], known_only=True)
    except flags.Error as e:
        raise ConfigError(f"flagfile {path} cannot be read: {str(e).replace('ERROR:: ', '')}") from None
    return fv


def method_configs(values: flags.FlagValues):
    """(HDMLConfig, OptimConfig) of the values `read_flagfile` parsed. Raises ConfigError."""
    from hdml_tf.config import HDMLConfig, OptimConfig
    return config_from_flags(HDMLConfig, flag_values=values), config_from_flags(OptimConfig, flag_values=values)


def parse_flags(argv):
    """absl's parser, but a bad flag is one `error:` line and exit code 2 like every other user error.

    Pass as `app.run(main, flags_parser=common_flags.parse_flags)`.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run_main(fn):
    """Wraps a tool's main: a user error (HDMLError) prints one line and exits 2, without a traceback.

    Training stopped by SIGTERM after saving its checkpoint (hdml_tf.callbacks.TrainingInterrupted, which carries
    an `exit_code`) prints `interrupted: ...` and exits 128 + the signal number (143).
    """
    from hdml_tf.errors import HDMLError

    def main(argv):
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
        logging.getLogger("absl").setLevel(logging.WARNING)
        try:
            return fn(argv)
        except HDMLError as e:
            if getattr(e, "exit_code", None):
                print(f"interrupted: {e}", file=sys.stderr)
                sys.exit(e.exit_code)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return main


def quiet_tensorflow():
    """No INFO chatter from TensorFlow's SavedModel loader (warnings and errors still show)."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


def check_model_path(model: str) -> str:
    """Cheap check before TensorFlow is imported: --model names something `hdml_tf.rundir.load_embedder` can load (a
    SavedModel directory, a training run directory, a .keras or a .weights.h5 file)."""
    from hdml_tf.errors import HDMLError
    expected = ("a SavedModel directory (tools/export.py --output), a training run directory, or a .keras / "
                ".weights.h5 file")
    if not model:
        raise HDMLError(f"--model is required ({expected})")
    if not os.path.exists(model):
        raise HDMLError(f"model {model} not found; expected {expected}")
    if os.path.isdir(model):
        names = os.listdir(model)
        if "saved_model.pb" not in names and not any(n.endswith((".keras", ".weights.h5")) for n in names):
            raise HDMLError(f"model {model} is a directory without saved_model.pb or trained weights; expected "
                            f"{expected}")
    elif not model.endswith((".keras", ".weights.h5")):
        raise HDMLError(f"model {model} is neither a SavedModel directory nor a .keras / .weights.h5 file")
    return model
