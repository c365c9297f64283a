"""What the tools share (the library never sees flags): a quiet start, flags derived from the config dataclasses,
one-line errors, the device line.

Tools that train call `define_training_flags()` before `app.run`, then `configs_from_flags()` to get the plain
dataclasses the library takes; every flag is a field of `hdml_tf.config` (`define_config_flags`). `run_main(fn)`
turns a user error into one line `error: ...` and exit code 2; `parse_flags` does the same for a bad flag.

The quiet start happens when this module is imported, which every tool does before anything imports TensorFlow:
TensorFlow's C++ start-up lines (oneDNN, CUDA drivers, "failed call to cuInit" on a machine without a GPU; several
of them written through absl's logging before anything can set its level) and its Python INFO/WARNING messages are
kept off the screen unless `--verbose=2` asks for them (see `quiet_start`). `device_line()` then says in one line
which device is used.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import logging
import os
import re
import sys
import tempfile
from typing import List, Optional

from absl import flags

#: --verbose at which TensorFlow's own log lines are shown (0: no progress lines, 1: progress lines, the default).
TENSORFLOW_LOGS = 2

# What TensorFlow's C++ code writes to stderr while it loads and looks for GPUs: absl-format log lines
# ("I0000 00:00:1796298396.562256   16341 port.cc:153] oneDNN custom operations are on ...", "E0000 ...
# cuda_platform.cc:52] failed call to cuInit ..."), absl's notice that logging is not initialized yet, and the
# second line of the CPU-instructions notice.
_TF_LOG_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\s\]]+:\d+\] ")
_TF_NOTICES = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
               "To enable the following instructions: ")


def is_tensorflow_noise(line: str) -> bool:
    """True for a start-up line of TensorFlow's C++ logging (INFO, WARNING or ERROR; FATAL lines are kept)."""
    return bool(_TF_LOG_LINE.match(line)) or line.startswith(_TF_NOTICES)


def flag_values(argv: List[str], name: str, depth: int = 0) -> List[str]:
    """The values `--name=v`, `--name v`, `--name` ("true") and `--noname` ("false") take in argv and in the
    flagfiles it names, in order (the last one wins, as in absl). Read before absl parses the command line: what
    must happen before TensorFlow is imported (the quiet start, oneDNN off) depends on them."""
    found = []
    for i, arg in enumerate(argv):
        if arg.startswith("--flagfile=") and depth < 10:
            try:
                with open(os.path.expanduser(arg.split("=", 1)[1])) as f:
                    lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
            except OSError:
                continue  # absl reports an unreadable flagfile itself
            found += flag_values(lines, name, depth + 1)
        elif arg in (f"--{name}", f"-{name}"):
            following = argv[i + 1] if i + 1 < len(argv) else ""
            found.append(following if following and not following.startswith("-") else "true")
        elif arg in (f"--no{name}", f"-no{name}"):
            found.append("false")
        elif arg.startswith((f"--{name}=", f"-{name}=")):
            found.append(arg.split("=", 1)[1])
    return found


def requested_verbosity(argv: List[str]) -> int:
    """The --verbose value of a command line (flagfiles included) before absl parses it: the quiet start must be
    set up before the flags are defined, and defining them may import TensorFlow. 1 when absent or not an integer
    (absl then reports a bad value)."""
    values = flag_values(list(argv[1:]), "verbose")
    if not values:
        return 1
    value = {"true": "1", "false": "0"}.get(values[-1].lower(), values[-1])
    try:
        return int(value)
    except ValueError:
        return 1


@contextlib.contextmanager
def filtered_stderr(keep=lambda line: not is_tensorflow_noise(line)):
    """Collects what is written to file descriptor 2 (C++ code included) and writes back only the lines `keep`
    accepts, when the block ends. A crash inside the block loses what was collected, so keep blocks short."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (an embedding host): nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if keep(line)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """Loads TensorFlow with its start-up lines filtered, then lists the GPUs inside the same filter (the first
    CUDA call logs "failed call to cuInit" on a machine without one)."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_data, is_package, resource readers: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with filtered_stderr():
            self._loader.exec_module(module)
            module.config.list_physical_devices("GPU")
            module.get_logger().setLevel(logging.ERROR)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Intercepts the first `import tensorflow` (wherever it happens) to load it through `_QuietLoader`."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once; find the real package with the other finders
        spec = importlib.util.find_spec("tensorflow")
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_start(verbose: int) -> None:
    """Keeps TensorFlow's own logging off the screen below `--verbose=2`; call before TensorFlow is imported.

    Measured with TensorFlow 2.21 on a CPU machine (README, "What the tools print"): TF_CPP_MIN_LOG_LEVEL=2 hides
    the CPU-instructions notice and later C++ INFO/WARNING lines, but not the lines written while the libraries
    load (oneDNN, "Could not find cuda drivers", absl's "All log messages before absl::InitializeLog()"), which
    come before TensorFlow reads the variable, nor "E0000 ... failed call to cuInit" (an ERROR; only level 3 hides
    it, and with it every later C++ error). So the variable is set to 2, and TensorFlow's import and its first
    look for GPUs run with stderr collected and written back without those lines (`filtered_stderr`); anything
    else written meanwhile is kept. A TF_CPP_MIN_LOG_LEVEL already in the environment wins.
    """
    if verbose >= TENSORFLOW_LOGS or "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


def pin_kernels_for_determinism(argv=None) -> bool:
    """With --deterministic (on the command line or in a flagfile), turns TensorFlow's oneDNN CPU kernels off
    (TF_ENABLE_ONEDNN_OPTS=0) before TensorFlow is imported, unless the environment already decides.

    Why: tools/stress_resume.py showed that with oneDNN on, two processes training from the same state on the same
    batch can differ in the last bit of a weight gradient (a matrix product or convolution filter gradient: identical
    inputs, different float summation order), so "bit-identical" resumed and repeated runs held only most of the
    time; with oneDNN off (TensorFlow's Eigen kernels) every run matched. README "Runs, resuming, and what is never
    lost" has the measurements. Returns whether oneDNN was turned off here.
    """
    values = flag_values(list(sys.argv[1:] if argv is None else argv), "deterministic")
    if values and values[-1].lower() in ("1", "true", "t", "yes", "y") and "TF_ENABLE_ONEDNN_OPTS" not in os.environ and "tensorflow" not in sys.modules:
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
        return True
    return False


pin_kernels_for_determinism()  # before quiet_start: both must run before TensorFlow is imported
quiet_start(requested_verbosity(sys.argv))

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
    an `exit_code`) prints `interrupted: ...` and exits 128 + the signal number (143). Log records print as
    `warning: ...` / `error: ...` lines (INFO as the bare message), after any progress line is finished. Ctrl-C anywhere else
    (loading data, evaluating) prints one `interrupted:` line and exits 130, without a traceback.
    """
    from hdml_tf.errors import HDMLError
    from hdml_tf.progress import end_line

    def main(argv):
        verbose = FLAGS["verbose"].value if "verbose" in FLAGS else 1
        configure_logging(verbose)
        try:
            return fn(argv)
        except HDMLError as e:
            end_line()
            if getattr(e, "exit_code", None):
                print(f"interrupted: {e}", file=sys.stderr)
                sys.exit(e.exit_code)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except BrokenPipeError:  # `tool | head`: the reader left; no traceback (Python's documented recipe)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except KeyboardInterrupt:
            end_line()
            print("interrupted: stopped by Ctrl-C (SIGINT); files already written are complete (every write is "
                  "atomic); run the same command again to continue", file=sys.stderr)
            sys.exit(130)
        except BaseException:
            end_line()  # a traceback or Ctrl-C starts on a line of its own
            raise
    return main


class _ConsoleFormatter(logging.Formatter):
    """`warning: message` / `error: message`, like the tools' own error lines; INFO records as the bare message."""

    def format(self, record):
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class _ConsoleHandler(logging.StreamHandler):
    """Writes to the current sys.stderr, after finishing a progress line drawn in place."""

    def __init__(self):
        super().__init__()
        self.setFormatter(_ConsoleFormatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # logging.StreamHandler sets it; sys.stderr is always used
        pass

    def format(self, record):  # on a terminal, long records wrap at spaces rather than mid-word
        from hdml_tf.progress import wrap
        return wrap(super().format(record), stream=sys.stderr)

    def emit(self, record):
        from hdml_tf.progress import end_line
        end_line()
        super().emit(record)


def configure_logging(verbose: int = 1) -> None:
    """The library's log records on stderr as `warning: ...` lines (INFO as the bare message); absl's handler,
    which prefixes thread ids, file names and times, is replaced. TensorFlow's Python logging shows errors only
    below `--verbose=2`, everything from there on."""
    from absl import logging as absl_logging
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, (absl_logging.ABSLHandler, _ConsoleHandler)):
            root.removeHandler(handler)
    root.addHandler(_ConsoleHandler())
    root.setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.INFO if verbose >= TENSORFLOW_LOGS else logging.ERROR)


def quiet_tensorflow():
    """No INFO chatter from TensorFlow's SavedModel loader (warnings and errors still show)."""
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    if logging.getLogger("tensorflow").level < logging.WARNING:
        logging.getLogger("tensorflow").setLevel(logging.WARNING)


def define_verbose_flag(flag_values=None) -> None:
    """--verbose for tools whose flags do not come from RunConfig (which has the same field)."""
    flags.DEFINE_integer("verbose", 1, "0: no progress lines; 1: progress lines; 2: also TensorFlow's own log "
                         "lines (C++ start-up, devices).", flag_values=FLAGS if flag_values is None else flag_values)


def device_line(mixed_precision: Optional[str] = None) -> str:
    """One line saying which device TensorFlow computes on, e.g. "device: CPU, 2 cores (no GPU found)" or
    "device: 1 × NVIDIA H200, mixed precision float16". Imports TensorFlow (quietly, see `quiet_start`)."""
    import collections

    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = collections.Counter()
        for gpu in gpus:
            try:
                names[tf.config.experimental.get_device_details(gpu).get("device_name") or gpu.name] += 1
            except (ValueError, RuntimeError):
                names[gpu.name] += 1
        text = ", ".join(f"{count} × {name}" for name, count in names.items())
    else:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        text = f"CPU, {cores} core{'s' if cores != 1 else ''} (no GPU found)"
    if mixed_precision and mixed_precision != "float32":
        text += f", mixed precision {mixed_precision}"
    elif mixed_precision:
        text += f", {mixed_precision}"
    return f"device: {text}"


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
