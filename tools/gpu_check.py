#!/usr/bin/env python
"""One prepared command that proves the GPU path within a time budget, and leaves one JSON with everything.

    python tools/gpu_check.py                                       # 8 minutes, on whatever TensorFlow sees
    python tools/gpu_check.py --require_gpu --output=$OUT/gpu_check.json   # exit 2 at once without a GPU
    python tools/gpu_check.py --image_size=64 --batch_size=8 --num_classes=8 --train_steps=6 --timing_steps=1 \
        --timing_rounds=2 --timing_warmup=1 --dataset=generated --budget_s=300   # a CPU smoke run: CPU numbers

It measures, at the paper's settings (the flagfile `--config`, default configs/cub200_npair.cfg: Caffe GoogLeNet,
N-pair, batch 128 = 64 anchors x 64 synthetic negatives each, 227 px, CUB-200's hyper-parameters), in this order
(the most valuable numbers first):

  device         GPU, driver (nvidia-smi), TensorFlow and its CUDA build; whether XLA, float16 and bfloat16 run.
  step_float32   train step of the baseline and HDML, XLA off and on: images/s, HDML/baseline ratio (blocks
                 interleaved, `hdml_tf.benchmarking`), peak GPU memory, warm-up/compile time.
  pipeline       the input pipeline on the data (uncached, memory and disk cache) against the step's consumption.
  train          `--train_steps` steps of HDML on the data's training classes in float16, then float32 from the
                 same seed: NaN/Inf and skipped steps, the three loss scales every `--scale_every` steps, steps/s,
                 NMI and R@1 on the unseen test classes.
  step_float16, step_bfloat16   the step_float32 measurement in 16-bit compute.
  step_triplet   HDML's train step in the triplet layout at `--triplet_batch_size` (paper 120), float32.
  train_spread   float32 again from seed + 1: the run-to-run spread float16 - float32 is judged against.

Before every piece and every model the clock is checked; what no longer fits is recorded as skipped with the
reason. The JSON (`--output`) is rewritten atomically after every finished measurement, so a kill leaves a valid
file of what finished; at `--budget_s` a watchdog marks the running piece interrupted, writes the JSON, prints the
summary and exits 0. It ends with a summary table and the JSON's path. On a machine where TensorFlow sees no GPU
every number is a CPU number, and the output and the JSON (`numbers_are`) say so.

Data: `--dataset=auto` takes the project's CUB-200 subset at ../shared/data/cub200_subset (or shared/ inside the
checkout) when present, else a generated folder of JPEGs; `--dataset=cub200 --data_dir=DIR` a full CUB-200-2011.
N-pair needs B/2 distinct training classes, so on the subset (58 training classes) the pipeline and the training
run use batch 116, which the JSON states.

Models are built with `hdml_tf.experiment.build_model` (random weights unless `--weights`: speed does not depend on
them, NMI/R@1 after a few hundred steps from random weights are far below the paper's).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common_flags  # noqa: E402  (parse_flags, run_main, read_flagfile, method_configs)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "cub200_npair.cfg"
#: The project's CUB-200 subset beside a checkout (../shared), or inside one (shared/ travels to a device machine).
SUBSET_CANDIDATES = (REPO.parent / "shared" / "data" / "cub200_subset", REPO / "shared" / "data" / "cub200_subset")
#: Pieces in the order they run: what matters most first.
PIECES = ("device", "step_float32", "pipeline", "train", "step_float16", "step_bfloat16", "step_triplet",
          "train_spread")
PRECISIONS = ("float32", "float16", "bfloat16")
#: N-pair layout at the paper's batch: HDML's cost target against the baseline (README, Benchmarks).
TARGET_RATIO = 1.10
#: A training run is compared with float32 within max(SPREAD_FACTOR x the seed-to-seed difference, SPREAD_FLOOR)
#: points: one pair of seeds is one sample of the spread, so it gets a factor and a floor.
SPREAD_FACTOR, SPREAD_FLOOR = 2.0, 1.0

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """The tool's flags, defined in `flag_values` (when run as a program: absl's global FLAGS; tests pass their
    own `flags.FlagValues()`)."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_float("budget_s", 480.0, "Wall-clock budget in seconds from the start of the process; pieces "
                       "that no longer fit are skipped, and the run stops at the budget with what it has.", **fv)
    flags.DEFINE_string("output", "runs/gpu_check.json", "The JSON with everything (rewritten after each piece).", **fv)
    flags.DEFINE_list("pieces", list(PIECES), f"Pieces to run (always in the order {', '.join(PIECES)}).", **fv)
    flags.DEFINE_bool("require_gpu", False, "Stop with an error (exit 2) when TensorFlow sees no GPU.", **fv)
    flags.DEFINE_string("config", str(DEFAULT_CONFIG), "Flagfile of the paper row whose hyper-parameters, backbone, "
                        "image size, resize and batch size are used.", **fv)
    flags.DEFINE_string("backbone", None, "Backbone (default: the config's).", **fv)
    flags.DEFINE_integer("image_size", 0, "Crop size in pixels (0: the config's).", **fv)
    flags.DEFINE_integer("resize", 0, "Square resize before cropping (0: the config's, at least the crop).", **fv)
    flags.DEFINE_integer("batch_size", 0, "N-pair batch of the step timing (0: the config's, paper 128).", **fv)
    flags.DEFINE_integer("embedding_size", 0, "Embedding size (0: the config's).", **fv)
    flags.DEFINE_integer("triplet_batch_size", 120, "Triplet batch of step_triplet (paper 120).", **fv)
    flags.DEFINE_integer("num_classes", 100, "Classifier outputs of the timed models (CUB-200: 100 training "
                         "classes).", **fv)
    flags.DEFINE_list("precisions", list(PRECISIONS), "Compute precisions of the step_* pieces.", **fv)
    flags.DEFINE_list("xla", ["auto"], "jit_compile settings of the timed models: auto (false and true on a GPU, "
                      "false on a CPU, where XLA compiles for minutes), or a list of true/false.", **fv)
    flags.DEFINE_list("methods", ["baseline", "hdml"], "Methods of the step_* pieces (step_triplet: hdml).", **fv)
    flags.DEFINE_integer("timing_steps", 10, "Timed steps per block.", **fv)
    flags.DEFINE_integer("timing_rounds", 3, "Interleaved rounds of blocks.", **fv)
    flags.DEFINE_integer("timing_warmup", 2, "Untimed steps per model before timing (tracing, XLA compilation).", **fv)
    flags.DEFINE_enum("dataset", "auto", ["auto", "cub200", "cars196", "sop", "folder", "generated"],
                      "Data of the pipeline and training pieces: auto = the CUB-200 subset in shared/ when present, "
                      "else generated JPEGs.", **fv)
    flags.DEFINE_string("data_dir", None, "Where --dataset is unpacked (auto: found; generated: not used).", **fv)
    flags.DEFINE_integer("max_classes", 0, "Keep only the first K training and K test classes (0: all).", **fv)
    flags.DEFINE_list("pipeline_modes", ["uncached", "memory", "disk"], "Input pipelines to time.", **fv)
    flags.DEFINE_integer("pipeline_steps", 20, "Timed batches per pipeline.", **fv)
    flags.DEFINE_integer("pipeline_warmup", 3, "Batches pulled before timing a pipeline.", **fv)
    flags.DEFINE_integer("train_steps", 300, "Steps of each training run (float16, float32, the spread run).", **fv)
    flags.DEFINE_enum("train_jit_compile", "auto", ["auto", "true", "false"], "XLA for the training runs; auto = "
                      "on with a GPU (what tools/train.py does).", **fv)
    flags.DEFINE_integer("scale_every", 10, "Record the loss scales every N training steps.", **fv)
    flags.DEFINE_string("weights", None, "ImageNet weights of the backbone for the training runs.", **fv)
    flags.DEFINE_integer("eval_batch_size", 128, "Rows per batch when embedding the test classes.", **fv)
    flags.DEFINE_string("scratch_dir", None, "Generated images and the disk cache (default: a temporary folder, "
                        "removed at the end).", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of weights, batches and sampling.", **fv)


# ------------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the check needs, from the flags (validated), as plain values."""
    budget_s: float
    output: str
    pieces: tuple
    require_gpu: bool
    config: str
    row_steps: int  # the config's --steps: one paper row (8,000)
    backbone: str
    image_size: int
    resize: int
    batch_size: int
    triplet_batch_size: int
    num_classes: int
    precisions: tuple
    xla: Optional[tuple]  # None: auto
    methods: tuple
    timing_steps: int
    timing_rounds: int
    timing_warmup: int
    dataset: str
    data_dir: Optional[str]
    max_classes: int
    pipeline_modes: tuple
    pipeline_steps: int
    pipeline_warmup: int
    train_steps: int
    train_jit_compile: str
    scale_every: int
    weights: Optional[str]
    eval_batch_size: int
    scratch_dir: Optional[str]
    seed: int
    hdml: object  # HDMLConfig of the config row (loss npair)
    optim: object  # OptimConfig of the config row

    def to_json(self) -> dict:
        found = {f.name: list(v) if isinstance(v, tuple) else v
                 for f in dataclasses.fields(self) if f.name not in ("hdml", "optim")
                 for v in (getattr(self, f.name),)}
        found["hdml"] = dataclasses.asdict(self.hdml)
        found["optim"] = dataclasses.asdict(self.optim)
        found["xla"] = "auto" if self.xla is None else list(self.xla)
        return found


def _choices(name: str, values, allowed) -> tuple:
    from hdml_tf.config import ConfigError
    values = tuple(v.strip() for v in values if v.strip())
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(f"--{name}={','.join(values)}: expected a list of {', '.join(allowed)}")
    return values


def settings_from_flags(flag_values=FLAGS) -> Settings:
    """Settings from the parsed flags and the --config flagfile; raises ConfigError on a bad value."""
    fv = flag_values
    from hdml_tf.config import ConfigError
    lists = dict(pieces=_choices("pieces", fv.pieces, PIECES),
                 precisions=_choices("precisions", fv.precisions, PRECISIONS),
                 methods=_choices("methods", fv.methods, ("baseline", "hdml")),
                 pipeline_modes=_choices("pipeline_modes", fv.pipeline_modes, ("uncached", "memory", "disk")))
    xla = None
    if [v.lower() for v in fv.xla] != ["auto"]:
        xla = tuple(dict.fromkeys(v == "true" for v in _choices("xla", [v.lower() for v in fv.xla],
                                                                 ("true", "false"))))
    for name, low in (("budget_s", 1), ("num_classes", 2), ("timing_steps", 1), ("timing_rounds", 1),
                      ("timing_warmup", 1), ("pipeline_steps", 1), ("pipeline_warmup", 0), ("train_steps", 1),
                      ("scale_every", 1), ("eval_batch_size", 1), ("max_classes", 0), ("triplet_batch_size", 0),
                      ("image_size", 0), ("resize", 0), ("batch_size", 0), ("embedding_size", 0)):
        if getattr(fv, name) < low:
            raise ConfigError(f"--{name}={getattr(fv, name)} must be >= {low}")
    row = common_flags.read_flagfile(fv.config)
    hdml, optim = common_flags.method_configs(row)
    if fv.embedding_size:
        hdml = dataclasses.replace(hdml, embedding_size=fv.embedding_size)
    hdml = dataclasses.replace(hdml, loss="npair", hdml=True)
    backbone = fv.backbone or row.backbone
    image_size = fv.image_size or row.image_size or 227
    if image_size < 32:
        raise ConfigError(f"--image_size={image_size} must be >= 32")
    resize = fv.resize or max(row.resize or 256, image_size)
    if resize < image_size:
        raise ConfigError(f"--resize={resize} must be >= the crop --image_size={image_size}")
    batch_size = fv.batch_size or row.batch_size
    hdml.layout().check_batch_size(batch_size)
    if fv.triplet_batch_size:
        dataclasses.replace(hdml, loss="triplet").layout().check_batch_size(fv.triplet_batch_size)
    if fv.dataset in ("cub200", "cars196", "sop", "folder") and not fv.data_dir:
        raise ConfigError(f"--dataset={fv.dataset} needs --data_dir (where it is unpacked)")
    if fv.data_dir and not os.path.isdir(fv.data_dir):
        raise ConfigError(f"--data_dir={fv.data_dir} is not a directory")
    if fv.weights and not os.path.exists(fv.weights):
        raise ConfigError(f"--weights={fv.weights} does not exist")
    existing = Path(fv.output).resolve().parent  # the first existing folder on the way (created at the 1st write)
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(f"--output={fv.output} cannot be written ({existing} is not a writable directory); "
                          f"expected a path in a writable directory")
    from hdml_tf.backbones import BACKBONES  # imports TensorFlow: after the checks that need none
    if backbone not in BACKBONES:
        raise ConfigError(f"--backbone={backbone}: expected one of {', '.join(BACKBONES)}")
    return Settings(
        budget_s=float(fv.budget_s), output=fv.output, require_gpu=fv.require_gpu, config=fv.config,
        row_steps=int(row.steps),
        backbone=backbone, image_size=image_size, resize=resize, batch_size=batch_size,
        triplet_batch_size=fv.triplet_batch_size, num_classes=fv.num_classes, xla=xla,
        timing_steps=fv.timing_steps, timing_rounds=fv.timing_rounds, timing_warmup=fv.timing_warmup,
        dataset=fv.dataset, data_dir=fv.data_dir, max_classes=fv.max_classes,
        pipeline_steps=fv.pipeline_steps, pipeline_warmup=fv.pipeline_warmup, train_steps=fv.train_steps,
        train_jit_compile=fv.train_jit_compile, scale_every=fv.scale_every, weights=fv.weights,
        eval_batch_size=fv.eval_batch_size, scratch_dir=fv.scratch_dir, seed=fv.seed, hdml=hdml,
        optim=optim, **lists)


def selected_pieces(settings: Settings) -> List[str]:
    """The pieces that run, in order: those of --pieces, less the step_<precision> of precisions not asked for."""
    return [name for name in PIECES if name in settings.pieces and not (
        name.startswith("step_") and name != "step_triplet" and name[len("step_"):] not in settings.precisions)]


# ------------------------------------------------------------------------------------------------ derived numbers
def _timed_variants(result: dict, loss: str = "npair") -> Dict[str, dict]:
    """Every timed variant of the step_* pieces in `loss`'s layout: name -> its summary."""
    found = {}
    for name, piece in result["pieces"].items():
        if name.startswith("step_"):
            for key, v in piece.get("variants", {}).items():
                if v.get("loss") == loss and "step_seconds" in v:
                    found[key] = v
    return found


def compare_runs(candidate: dict, reference: dict, spread: Optional[dict] = None) -> Optional[dict]:
    """float16 - float32 (or any two training runs) in percentage points of NMI and R@1, judged against the
    seed-to-seed spread when a spread run exists: within when |difference| <= max(SPREAD_FACTOR x spread,
    SPREAD_FLOOR) points for both metrics.

    Args:
      candidate, reference: training-run records with `metrics` (fractions) and `steps_done`.
      spread: a second reference run from another seed (same precision as `reference`), or None.
    """
    if not candidate or not reference or "metrics" not in candidate or "metrics" not in reference:
        return None
    keys = ("nmi", "recall@1")
    found = {"difference_points": {k: round(100 * (candidate["metrics"][k] - reference["metrics"][k]), 2)
                                   for k in keys},
             "same_steps": candidate.get("steps_done") == reference.get("steps_done")}
    if spread and "metrics" in spread:
        seed_diff = {k: round(abs(100 * (spread["metrics"][k] - reference["metrics"][k])), 2) for k in keys}
        tolerance = {k: round(max(SPREAD_FACTOR * seed_diff[k], SPREAD_FLOOR), 2) for k in keys}
        found.update(seed_spread_points=seed_diff, tolerance_points=tolerance,
                     rule=f"|difference| <= max({SPREAD_FACTOR:g} x seed spread, {SPREAD_FLOOR:g} point)",
                     within_spread=all(abs(found["difference_points"][k]) <= tolerance[k] for k in keys))
    else:
        found["within_spread"] = None
        found["why_no_verdict"] = "no spread run (train_spread) finished: run-to-run spread not measured"
    return found


def derive(result: dict) -> dict:
    """Numbers computed from the measured ones: pipeline vs step, the float16/float32 agreement, and the projected
    wall time of one paper row (the config's --steps, 8,000 for the paper's rows)."""
    pieces = result["pieces"]
    timed = _timed_variants(result)
    found = {}
    hdml = {k: v for k, v in timed.items() if v.get("method") == "hdml"}
    fastest = min(hdml, key=lambda k: hdml[k]["step_seconds"]) if hdml else None
    rates = {mode: t["images_per_s"] for mode, t in pieces.get("pipeline", {}).get("modes", {}).items()
             if "images_per_s" in t}
    cached = max((rates[m] for m in ("memory", "disk") if m in rates), default=None)
    if fastest and rates:
        consumes = hdml[fastest]["images_per_s"]
        found["input_vs_step"] = {
            "consumer": fastest, "consumer_images_per_s": consumes,
            "uncached_ratio": round(rates["uncached"] / consumes, 2) if "uncached" in rates else None,
            "cached_ratio": round(cached / consumes, 2) if cached else None, "target_ratio": 2.0}
    train = pieces.get("train", {}).get("runs", {})
    spread = pieces.get("train_spread", {}).get("run")
    found["float16_vs_float32"] = compare_runs(train.get("float16"), train.get("float32"), spread)
    steps = result["settings"]["row_steps"]
    row = {"steps": steps, "what": "training steps only: start-up, compilation and evaluations not included"}
    row["per_variant_minutes"] = {k: round(steps * v["step_seconds"] / 60, 1) for k, v in timed.items()}
    if fastest:
        step = hdml[fastest]["step_seconds"]
        row["fastest_hdml"] = {"variant": fastest, "minutes": round(steps * step / 60, 1)}
        if cached:  # the step cannot run faster than the cached pipeline delivers
            bound = max(step, hdml[fastest]["batch_size"] / cached)
            row["fastest_hdml"]["minutes_with_cached_input"] = round(steps * bound / 60, 1)
    row["from_training_runs_minutes"] = {p: round(steps * r["step_seconds_median"] / 60, 1)
                                         for p, r in train.items() if r.get("step_seconds_median")}
    found["projected_row"] = row
    return found


# ------------------------------------------------------------------------------------------------ the check
class Skipped(Exception):
    """A piece (or part of one) that does not run; the message says why."""


class PieceFailed(Exception):
    """A piece that ran and produced nothing usable; the message says why (no traceback needed)."""


class Check:
    """Runs the pieces under the budget and keeps the JSON current.

    All changes to `result` happen under `lock`, each followed by an atomic write, so the watchdog thread (budget)
    and a signal handler always find a consistent result to write before they end the process.
    """

    def __init__(self, settings: Settings, start: float, command: str):
        from hdml_tf import benchmarking
        self.s = settings
        self.bm = benchmarking
        self.budget = benchmarking.Budget(settings.budget_s, margin=min(10.0, 0.05 * settings.budget_s))
        self.budget.start = start  # the budget counts from the process's start (imports included)
        self.lock = threading.RLock()
        self.device: Optional[str] = None
        self.xla_values: tuple = ()
        self.warmups: Dict[bool, List[float]] = {False: [], True: []}
        self._data = None
        self._scratch = None
        self._eval_seconds: Optional[float] = None
        self.budget_hit = False
        self.done = False
        self.result = {
            "tool": "gpu_check", "command": command, "status": "running", "numbers_are": None, "note": None,
            "budget_s": settings.budget_s, "elapsed_s": 0.0, "settings": settings.to_json(),
            "pieces": {name: {"status": "pending"} for name in selected_pieces(settings)}}

    # -------------------------------------------------------------------------------------------- bookkeeping
    def short(self, why: str) -> str:
        """Notes that the budget cut something short (the final status says so); returns `why`."""
        self.budget_hit = True
        return why

    def say(self, text: str) -> None:
        print(f"[{self.budget.elapsed():5.0f} s] {text}", file=sys.stderr, flush=True)

    def save(self) -> None:
        with self.lock:
            self.result["elapsed_s"] = round(self.budget.elapsed(), 1)
            self.result["derived"] = derive(self.result)
            self.bm.write_json_atomic(self.s.output, self.result)

    def record(self, piece: str, **values) -> None:
        with self.lock:
            self.result["pieces"][piece].update(values)
            self.save()

    def record_in(self, piece: str, key: str, name: str, value) -> None:
        """result.pieces[piece][key][name] = value, then write."""
        with self.lock:
            self.result["pieces"][piece].setdefault(key, {})[name] = value
            self.save()

    def stop(self, why: str, status: str, exit_code: int) -> None:
        """Ends the process now (budget watchdog, SIGTERM): marks the running piece interrupted and the pending ones
        skipped, writes the JSON, prints the summary, exits with `exit_code` -- whatever goes wrong on the way."""
        with self.lock:
            if self.done:  # the run has just finished by itself
                return
            self.done = True
        try:
            with self.lock:
                for piece in self.result["pieces"].values():
                    if piece["status"] == "running":
                        piece.update(status="interrupted", reason=why)
                    elif piece["status"] == "pending":
                        piece.update(status="skipped", reason=why)
                self.result["status"] = status
                self.save()
                print(summary(self.result, self.s.output), flush=True)
                self.cleanup()
        except BaseException:  # the exit below must happen: the budget is a promise
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_code)

    def cleanup(self) -> None:
        if self._scratch is not None and not self.s.scratch_dir:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def run_piece(self, name: str, fn: Callable[[str], None]) -> None:
        if name not in self.result["pieces"]:
            return
        if not self.budget.fits(1.0):
            self.record(name, status="skipped", reason=self.short(f"budget: {self.budget.remaining():.0f} s left"))
            return
        self.say(f"{name} ...")
        self.record(name, status="running", started_at_s=round(self.budget.elapsed(), 1))
        start = time.monotonic()
        from hdml_tf.errors import HDMLError
        try:
            fn(name)
            status, extra = "done", {}
        except Skipped as e:
            status, extra = "skipped", {"reason": str(e)}
        except (HDMLError, PieceFailed) as e:
            status, extra = "failed", {"error": str(e)}
        except Exception as e:  # a piece that breaks must not cost the others: report and go on
            traceback.print_exc()
            status, extra = "failed", {"error": self.bm._one_line(e)}
        self.record(name, status=status, seconds=round(time.monotonic() - start, 1), **extra)
        self.say(f"{name}: {status}" + (f" ({next(iter(extra.values()))})" if extra else ""))

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        import tensorflow as tf
        tf.get_logger().setLevel("ERROR")
        logging.getLogger("hdml_tf.experiment").setLevel(logging.ERROR)  # "random weights" once, below
        try:
            self.save()  # the output is writable before minutes of work
        except OSError as e:
            from hdml_tf.config import ConfigError
            raise ConfigError(f"--output={self.s.output} cannot be written ({e.strerror or e}); expected a path "
                              f"in a writable directory") from None
        self.device = self.bm.accelerator()
        gpu = self.device is not None
        self.result["numbers_are"] = "GPU" if gpu else "CPU"
        self.result["note"] = (None if gpu else "TensorFlow sees no GPU: every number in this file was measured on "
                               "the CPU. These are CPU numbers, not GPU numbers.")
        self.xla_values = self.s.xla if self.s.xla is not None else ((False, True) if gpu else (False,))
        if self.s.xla is None and not gpu:
            self.result["xla_note"] = "XLA not timed on the CPU (--xla=auto): compiling the step takes minutes there"
        if not gpu:
            self.say("TensorFlow sees no GPU: the numbers below are CPU NUMBERS, not GPU numbers")
        if self.s.require_gpu and not gpu:
            facts = self.bm.device_facts(probe=False)
            self.result["pieces"].setdefault("device", {}).update(status="done", facts=facts)
            self.result["status"] = "no_gpu"
            self.save()
            from hdml_tf.config import ConfigError
            raise ConfigError("--require_gpu: TensorFlow sees no GPU" + (
                f" ({facts['gpu_not_used']})" if facts.get("gpu_not_used") else "") + f"; facts in {self.s.output}")
        self.say(f"random weights{' except the training runs (--weights)' if self.s.weights else ''}: speed does "
                 "not depend on them")
        self.result["startup_s"] = round(self.budget.elapsed(), 1)  # imports: before the watchdog could start
        watchdog = threading.Timer(max(0.0, self.budget.remaining()),
                                   lambda: self.stop(f"budget of {self.s.budget_s:g} s reached", "budget_reached", 0))
        watchdog.daemon = True
        watchdog.start()
        try:
            for name in PIECES:
                self.run_piece(name, self.piece(name))
        finally:
            watchdog.cancel()
        with self.lock:
            if self.done:
                return self.result
            self.done = True
            statuses = [p["status"] for p in self.result["pieces"].values()]
            self.result["status"] = ("budget_reached" if self.budget_hit else "complete" if all(
                s == "done" for s in statuses) else "complete_with_gaps")
            self.save()
            self.cleanup()
        return self.result

    def piece(self, name: str) -> Callable[[str], None]:
        if name.startswith("step_"):
            kind = name[len("step_"):]
            if kind == "triplet":
                return lambda n: self.step_piece(n, "float32", loss="triplet", methods=("hdml",),
                                                 batch_size=self.s.triplet_batch_size)
            return lambda n: self.step_piece(n, kind)
        return {"device": self.device_piece, "pipeline": self.pipeline_piece, "train": self.train_piece,
                "train_spread": self.spread_piece}[name]

    # -------------------------------------------------------------------------------------------- device
    def device_piece(self, name: str) -> None:
        facts = self.bm.device_facts(probe=True)
        self.record(name, facts=facts)
        gpus = ", ".join(g["name"] for g in facts["gpus"]) or "none"
        self.say(f"device: {facts['accelerator']}; GPUs seen by TensorFlow: {gpus}; TensorFlow {facts['tensorflow']} "
                 f"(CUDA build {facts['tensorflow_build']['is_cuda_build']}, CUDA "
                 f"{facts['tensorflow_build']['cuda_version']}); driver "
                 f"{(facts['nvidia_smi'] or [{}])[0].get('driver_version', 'not found (no nvidia-smi)')}")
        self.say(f"XLA usable: {facts['xla']['usable']}; float16 usable: {facts['precisions']['float16']['usable']}; "
                 f"bfloat16 usable: {facts['precisions']['bfloat16']['usable']}")
        if facts.get("gpu_not_used"):
            self.say(f"WARNING: {facts['gpu_not_used']}")

    # -------------------------------------------------------------------------------------------- step timing
    def model_run(self, precision: str, xla: bool, **changes):
        """The RunConfig of a timed model. `experiment.build_model` reads only its model fields (backbone, size,
        weights, precision, XLA, seed); the embedded data set name needs no data_dir."""
        from hdml_tf.config import RunConfig
        return RunConfig(**dict(dict(dataset="glyphs", backbone=self.s.backbone, image_size=self.s.image_size,
                                     resize=self.s.resize, batch_size=self.s.batch_size, mixed_precision=precision,
                                     jit_compile="true" if xla else "false", seed=self.s.seed, verbose=0), **changes))

    def warmup_estimate(self, xla: bool) -> Optional[float]:
        """Seconds a model's warm-up is expected to take: the longest seen so far with the same XLA setting,
        plus a fifth (HDML traces more than the baseline); None before the first."""
        seen = self.warmups[xla]
        return 1.2 * max(seen) if seen else None

    def step_piece(self, name: str, precision: str, loss: str = "npair", methods=None, batch_size=None) -> None:
        import tensorflow as tf

        from hdml_tf import experiment
        batch_size = batch_size or self.s.batch_size
        methods = methods or self.s.methods
        if not batch_size:
            raise Skipped("--triplet_batch_size=0")
        hdml_cfg = dataclasses.replace(self.s.hdml, loss=loss)
        batch = self.bm.make_batch(loss, batch_size, self.s.image_size, self.s.num_classes, self.s.seed)
        if self.device:  # the batch stays in GPU memory: no host-to-device copy inside the timed steps
            with tf.device(self.device):
                batch = tuple(tf.identity(t) for t in batch)
        layout = {"npair": f"{batch_size // 2} anchors x {batch_size // 2} synthetic negatives each "
                           f"({(batch_size // 2) ** 2} synthetic rows)",
                  "triplet": f"{batch_size // 3} triplets"}.get(loss, loss)
        self.record(name, precision=precision, loss=loss, batch_size=batch_size, image_size=self.s.image_size,
                    backbone=self.s.backbone, layout=layout,
                    memory_source=("tf.config.experimental.get_memory_info, reset per block" if self.device else
                                   "max RSS of the process (process-wide, only grows)"))
        variants = []
        for xla in self.xla_values:
            for method in methods:
                run = self.model_run(precision, xla, batch_size=batch_size)
                cfg = dataclasses.replace(hdml_cfg, hdml=method == "hdml")

                def build(run=run, cfg=cfg):
                    return experiment.build_model(run, cfg, self.s.optim, self.s.num_classes)
                variants.append(self.bm.TimedVariant(
                    f"{method}_{'' if loss == 'npair' else loss + '_'}{precision}{'_xla' if xla else ''}", build,
                    batch_size, method=method, precision=precision, jit_compile=xla, loss=loss))
        try:
            for v in variants:
                self._warm_up(name, v, batch, variants)
            rounds = self.bm.time_interleaved(variants, batch, self.device, self.s.timing_steps,
                                              self.s.timing_rounds, fits=self.budget.fits,
                                              progress=lambda line: self.say(f"{name}: {line}"))
            if rounds < self.s.timing_rounds and any(v.model is not None for v in variants):
                self.short("timing rounds cut short")
            self._record_timing(name, variants, rounds)
        finally:
            for v in variants:
                v.model = None
            self._release()
        if not any(v.blocks for v in variants):
            why = "no variant was timed: " + "; ".join(f"{v.name}: {v.error}" for v in variants)
            if all((v.error or "").startswith("skipped") for v in variants):
                raise Skipped(why)
            raise PieceFailed(why)

    def _warm_up(self, name: str, v, batch, variants) -> None:
        xla = v.tags["jit_compile"]
        estimate = self.warmup_estimate(xla)
        steps = max((w.last_step_seconds or 0.0) for w in variants)
        timing = self.s.timing_steps * self.s.timing_rounds * len(variants) * steps
        if estimate is not None and not self.budget.fits(estimate + timing):
            v.error = self.short(f"skipped: budget ({self.budget.remaining():.0f} s left; warm-up estimated "
                                 f"{estimate:.0f} s + timing {timing:.0f} s)")
        else:
            self.say(f"{name}: warm-up {v.name} (build, trace{', XLA compile' if xla else ''}) ...")
            v.warm_up(batch, self.device, self.s.timing_warmup)
            if v.error is None:
                self.warmups[xla].append(v.warmup_seconds)
                self.say(f"{name}: {v.name} warm-up {v.warmup_seconds:.1f} s (first step {v.first_step_seconds:.1f} "
                         f"s)" + (f", then {v.last_step_seconds:.3f} s/step" if self.s.timing_warmup > 1 else ""))
            else:
                self.say(f"{name}: {v.name} failed: {v.error}")
        self.record_in(name, "variants", v.name, v.summary())

    def _record_timing(self, name: str, variants, rounds: int) -> None:
        by_key = {(v.tags["method"], v.tags["jit_compile"]): v for v in variants}
        ratios, speedups = {}, {}
        for xla in self.xla_values:
            h, b = by_key.get(("hdml", xla)), by_key.get(("baseline", xla))
            if h and b:
                ratios["xla" if xla else "no_xla"] = self.bm.paired_ratio(
                    h, b, target=TARGET_RATIO if (h.tags["loss"] == "npair") else None)
        for method in {v.tags["method"] for v in variants}:
            off, on = by_key.get((method, False)), by_key.get((method, True))
            if off and on:
                speedup = self.bm.paired_ratio(off, on)  # XLA-off time / XLA-on time: > 1 means XLA is faster
                if speedup:
                    speedups[method] = {"xla_speedup": speedup["wall"], "use_xla": speedup["wall"] > 1.0}
        self.record(name, variants={v.name: v.summary() for v in variants}, rounds_done=rounds,
                    hdml_over_baseline=ratios, xla=speedups)

    def _release(self) -> None:
        """Frees the timed models before the next piece builds its own."""
        import keras
        gc.collect()
        try:
            keras.backend.clear_session()
        except Exception:  # pragma: no cover - best effort
            pass
        keras.mixed_precision.set_global_policy("float32")  # build_model set the piece's policy globally

    # -------------------------------------------------------------------------------------------- data
    def scratch(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(self.s.scratch_dir) if self.s.scratch_dir else Path(
                tempfile.mkdtemp(prefix="gpu_check_"))
            self._scratch.mkdir(parents=True, exist_ok=True)
        return self._scratch

    def data(self):
        """(RunConfig of the training runs, train ImageSet, test ImageSet, description), read once."""
        if self._data is not None:
            return self._data
        import numpy as np

        from hdml_tf.config import ConfigError
        from hdml_tf.data import readers
        from hdml_tf.config import RunConfig
        dataset, data_dir = self.s.dataset, self.s.data_dir
        if dataset == "auto":
            found = next((p for p in SUBSET_CANDIDATES if p.is_dir()), None)
            dataset, data_dir = ("cub200", str(found)) if found else ("generated", None)
        generated = dataset == "generated"
        if generated:
            # N-pair needs B/2 training classes; the folder reader puts half of the classes in training.
            classes = max(8, self.s.batch_size if not self.s.max_classes else 2 * self.s.max_classes)
            data_dir = str(self.scratch() / "generated")
            self.say(f"generating {classes} classes x 8 JPEGs (320 x 400) in {data_dir}")
            self.bm.generate_image_folder(data_dir, classes=classes, per_class=8, seed=self.s.seed)
            dataset = "folder"
        splits = readers.read_dataset(dataset, data_dir)
        train, test = splits[0], splits[1]
        report = getattr(splits, "report", None)
        if self.s.max_classes:
            train = train.subset(np.flatnonzero(train.labels < self.s.max_classes)).remap()
            test = test.subset(np.flatnonzero(test.labels < self.s.max_classes)).remap()
        counts = np.bincount(train.labels, minlength=train.num_classes)
        usable = int(np.sum(counts >= 2))  # an N-pair anchor class needs two images
        batch = min(self.s.batch_size, 2 * usable)
        if batch < 4:
            raise ConfigError(f"{dataset} at {data_dir}: {usable} training classes with two images or more; the "
                              f"N-pair batch needs at least 2")
        run = RunConfig(dataset=dataset, data_dir=data_dir, backbone=self.s.backbone, image_size=self.s.image_size,
                        resize=self.s.resize, weights=self.s.weights, batch_size=batch, steps=self.s.train_steps,
                        steps_per_epoch=self.s.train_steps, eval_batch_size=self.s.eval_batch_size,
                        seed=self.s.seed, output_dir=str(self.scratch() / "train"),
                        cache=str(self.scratch() / "cache"), verbose=0, max_bad_steps=0,
                        jit_compile=self.s.train_jit_compile)
        about = {"dataset": "generated JPEGs" if generated else dataset, "data_dir": data_dir,
                 "train_images": len(train), "train_classes": train.num_classes, "test_images": len(test),
                 "test_classes": test.num_classes, "batch_size": batch,
                 "resize": run.augment().resize, "crop": run.crop_size()}
        if batch != self.s.batch_size:
            about["batch_note"] = (f"batch {batch}, not {self.s.batch_size}: N-pair needs B/2 distinct training "
                                   f"classes and {usable} have two images or more")
        if report is not None and not self.s.max_classes:
            about["counts"] = report.summary()
        self._data = (run, train, test, about)
        return self._data

    # -------------------------------------------------------------------------------------------- pipeline
    def pipeline_piece(self, name: str) -> None:
        from hdml_tf.data import pipeline
        run, train, _, about = self.data()
        self.record(name, data=about)
        batch = run.batch_size
        for mode in self.s.pipeline_modes:
            rate = self.result["pieces"][name].get("modes", {}).get("uncached", {}).get("images_per_s")
            if rate:  # decoding every image once (cache fill) + the timed batches, at the uncached rate
                needed = (len(train) if mode != "uncached" else 0) / rate + \
                    (self.s.pipeline_warmup + self.s.pipeline_steps) * batch / rate
                if not self.budget.fits(needed):
                    self.record_in(name, "modes", mode, {"skipped": self.short(
                        f"budget: {self.budget.remaining():.0f} s left, needs about {needed:.0f} s")})
                    continue
            cache = {"uncached": None, "memory": "memory", "disk": run.cache}[mode]
            start = time.perf_counter()
            ds = pipeline.make_train_dataset(train, "npair", batch, run.augment(), self.s.seed, cache=cache,
                                             verbose=0)
            if mode == "disk":  # the first build fills the cache; time a second one that only reads it
                ds = pipeline.make_train_dataset(train, "npair", batch, run.augment(), self.s.seed, cache=cache,
                                                 verbose=0)
            setup = time.perf_counter() - start
            timing = self.bm.time_dataset(ds, batch, self.s.pipeline_warmup, self.s.pipeline_steps)
            timing["setup_s"] = round(setup, 2)
            del ds
            self.record_in(name, "modes", mode, timing)
            self.say(f"pipeline {mode}: {timing['images_per_s']:.0f} images/s (setup {setup:.1f} s)")
        self.record(name, cpu_cores=os.cpu_count(),
                    what="batches pulled as fast as possible, alone; the step's consumption is in "
                         "derived.input_vs_step")

    # -------------------------------------------------------------------------------------------- training
    def train_piece(self, name: str) -> None:
        run, train, test, about = self.data()
        self.record(name, data=about, steps_requested=self.s.train_steps,
                    rule="float16 first, then float32 from the same seed for as many steps as float16 did")
        runs = {}
        for precision in ("float16", "float32"):
            steps = self.s.train_steps if precision == "float16" else runs.get("float16", {}).get(
                "steps_done") or self.s.train_steps
            share = self.budget.remaining() - self.budget.margin
            if precision == "float16" and "train_spread" in self.result["pieces"]:
                share /= 3.0
            elif precision == "float16":
                share /= 2.0
            elif "train_spread" in self.result["pieces"]:
                share /= 2.0
            try:
                runs[precision] = self.train_run(name, precision, self.s.seed, steps, share)
            except Skipped as e:
                runs[precision] = {"skipped": str(e)}
            self.record_in(name, "runs", precision, runs[precision])

    def spread_piece(self, name: str) -> None:
        reference = self.result["pieces"].get("train", {}).get("runs", {}).get("float32", {})
        steps = reference.get("steps_done") or self.s.train_steps
        self.record(name, what=f"float32 from seed {self.s.seed + 1}: the run-to-run spread of NMI and R@1")
        self.record(name, run=self.train_run(name, "float32", self.s.seed + 1, steps,
                                             self.budget.remaining() - self.budget.margin))

    def train_run(self, name: str, precision: str, seed: int, steps: int, share: float) -> dict:
        """One training run of `steps` steps (stopped early when its `share` of seconds would be exceeded), then
        NMI / Recall@K on the test classes."""
        from hdml_tf import experiment
        from hdml_tf.callbacks import TrainingDiverged
        run, train, test, _ = self.data()
        run = dataclasses.replace(run, mixed_precision=precision, seed=seed, steps=steps, steps_per_epoch=steps)
        eval_guess = self._eval_seconds or max(5.0, 0.1 * share)
        if share < eval_guess + 5.0:
            raise Skipped(self.short(f"budget: {share:.0f} s for this run, evaluation alone needs about "
                                     f"{eval_guess:.0f} s"))
        started = time.monotonic()
        deadline = started + share - eval_guess
        self.bm.reset_peak_memory(self.device)
        model = experiment.build_model(run, self.s.hdml, self.s.optim, train.num_classes)
        recorder = training_recorder(self.s.scale_every, stop_if=lambda: time.monotonic() > deadline,
                                    progress=lambda line: self.say(f"{name} {precision}: {line}"), total=steps)
        out = {"precision": precision, "seed": seed, "steps_requested": steps, "batch_size": run.batch_size,
               "jit_compile": experiment.use_xla(run.jit_compile),
               "weights": self.s.weights or "random (no ImageNet weights)"}
        self.say(f"{name}: {precision}, seed {seed}, {steps} steps of batch {run.batch_size} "
                 f"({'XLA' if out['jit_compile'] else 'no XLA'}) ...")
        try:
            experiment.fit(model, run, self.s.hdml, train, callbacks=[recorder])
        except TrainingDiverged as e:  # only with max_bad_steps > 0; recorded, the numbers so far still count
            out["diverged"] = str(e)
        out.update(recorder.report(model, run.batch_size))
        out["train_seconds"] = round(time.monotonic() - started, 1)
        out["memory"] = self.bm.memory_info(self.device)
        if recorder.stopped_early:
            out["stopped_early"] = self.short(f"budget: this run's share of {share:.0f} s")
        start = time.monotonic()
        test_ds = experiment.eval_dataset(run, test)
        metrics = experiment.evaluate_model(model, test_ds, run.ks())
        self._eval_seconds = 1.5 * (time.monotonic() - start)
        out["metrics"] = {k: round(float(v), 4) for k, v in metrics.items()}
        out["eval_seconds"] = round(time.monotonic() - start, 1)
        self.say(f"{name} {precision}: {out['steps_done']} steps, NMI {100 * out['metrics']['nmi']:.1f}, R@1 "
                 f"{100 * out['metrics']['recall@1']:.1f}; non-finite steps {out['nonfinite_steps']}, skipped "
                 f"{out['skipped_steps']}")
        del model
        self._release()
        return out


def training_recorder(every: int, stop_if: Callable[[], bool], progress: Callable[[str], None], total: int):
    """A Keras callback that records, every step, which losses and gradient routes were NaN/Inf
    (`HDMLModel.nonfinite`) and the dynamic loss scale of each LossScaleOptimizer (float16: all three), every
    `every` steps a point of the loss-scale trajectory [step, scale of each optimizer], and the step times; it
    stops `fit` when `stop_if()` says this run's share of the budget is spent. `report(model, batch_size)` gives
    the numbers. (Defined in a function so that importing this module needs no Keras.)"""
    import keras
    import numpy as np

    class _Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.every, self.stop_if, self.progress, self.total = every, stop_if, progress, total
            self.print_every = max(every, every * (total // (10 * every)))  # about ten progress lines per run
            self.step = 0
            self.times: List[float] = []
            self.trajectory: List[list] = []
            self.counts: Dict[str, int] = {}
            self.nonfinite_steps = 0
            self.changes = {"decreases": {}, "increases": {}}
            self.stopped_early = False
            self.last_logs: Dict[str, float] = {}
            self._previous = None

        def _optimizers(self):
            model = self.model
            named = (("metric", model.optimizer), ("generator", getattr(model, "generator_optimizer", None)),
                     ("classifier", getattr(model, "classifier_optimizer", None)))
            return [(n, o) for n, o in named if isinstance(o, keras.optimizers.LossScaleOptimizer)]

        def _scales(self):
            return [float(np.asarray(o.dynamic_scale)) for _, o in self._optimizers()]

        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()
            self.names = [n for n, _ in self._optimizers()]
            self._previous = self._scales()
            if self.names:
                self.trajectory.append([0] + self._previous)

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            self.times.append(time.perf_counter())
            flags = np.asarray(self.model.nonfinite.numpy()) > 0
            if flags.any():
                self.nonfinite_steps += 1
                for n in np.asarray(self.model.nonfinite_names)[flags]:
                    self.counts[str(n)] = self.counts.get(str(n), 0) + 1
            scales = self._scales()
            for n, new, old in zip(self.names, scales, self._previous or []):
                if new != old:
                    kind = "decreases" if new < old else "increases"
                    self.changes[kind][n] = self.changes[kind].get(n, 0) + 1
            self._previous = scales
            if self.step % self.every == 0 or self.step == self.total:
                if self.names:
                    self.trajectory.append([self.step] + scales)
            if self.step % self.print_every == 0 or self.step == self.total:
                rate = (self.step - 1) / (self.times[-1] - self.times[0]) if self.step > 1 else 0.0
                self.progress(f"step {self.step}/{self.total}, {rate:.2f} steps/s"
                              + (f", loss scales {', '.join(f'{s:g}' for s in scales)}" if scales else ""))
            if logs:
                self.last_logs = {k: float(v) for k, v in logs.items()}
            if self.stop_if():
                self.stopped_early = True
                self.model.stop_training = True

        def report(self, model, batch_size: int) -> dict:
            intervals = np.diff(self.times[1:]) if len(self.times) > 2 else np.array([])
            found = {"steps_done": self.step,
                     "first_step_seconds": round(self.times[0] - self.start, 2) if self.times else None,
                     "step_seconds_median": round(float(np.median(intervals)), 4) if intervals.size else None,
                     "nonfinite_steps": self.nonfinite_steps, "nonfinite_by_quantity": dict(self.counts),
                     "skipped_steps": int(float(np.asarray(model.skipped))),
                     "final_epoch_means": {k: round(v, 5) for k, v in self.last_logs.items()},
                     "final_losses_finite": bool(all(np.isfinite(v) for v in self.last_logs.values()))}
            if found["step_seconds_median"]:
                found["images_per_s"] = round(batch_size / found["step_seconds_median"], 1)
            if self.names:
                found["loss_scale"] = {"optimizers": self.names, "every": self.every,
                                       "trajectory": self.trajectory, "final": dict(zip(self.names,
                                                                                       self._scales())),
                                       **self.changes}
            else:
                found["loss_scale"] = None
            return found

    return _Recorder()


# ------------------------------------------------------------------------------------------------ summary
def _mb(value) -> str:
    return f"{value / 2 ** 20:,.0f}" if value else "-"


def summary(result: dict, output: str) -> str:
    """The human-readable table printed at the end (and when the budget or a signal stops the run)."""
    lines = []
    pieces = result["pieces"]
    facts = pieces.get("device", {}).get("facts", {})
    if result.get("numbers_are") == "CPU":
        lines.append("== gpu_check: CPU NUMBERS (TensorFlow sees no GPU): not GPU measurements ==")
    else:
        gpus = ", ".join(g["name"] for g in facts.get("gpus", [])) or "GPU"
        driver = (facts.get("nvidia_smi") or [{}])[0].get("driver_version", "?")
        lines.append(f"== gpu_check: GPU numbers, {gpus}, driver {driver} ==")
    if facts:
        cuda = facts.get("tensorflow_build", {}).get("cuda_version")
        lines.append(f"TensorFlow {facts.get('tensorflow')} (CUDA {cuda})"
                     f"; XLA usable {facts.get('xla', {}).get('usable')}; float16 usable "
                     f"{facts.get('precisions', {}).get('float16', {}).get('usable')}; bfloat16 usable "
                     f"{facts.get('precisions', {}).get('bfloat16', {}).get('usable')}")
    steps = [(n, p) for n, p in pieces.items() if n.startswith("step_") and p.get("variants")]
    if steps:
        first = steps[0][1]
        lines.append(f"train step: {first.get('backbone')}, {first.get('image_size')} px; npair "
                     f"{first.get('layout', '')}")
        memory = "peak MB" if result.get("numbers_are") == "GPU" else "RSS MB"  # CPU: the process's max RSS
        lines.append(f"{'variant':30s} {'images/s':>9s} {'s/step':>8s} {'warm-up s':>9s} {memory:>8s} "
                     f"{'HDML/base':>9s}")
        for name, piece in steps:
            ratios = piece.get("hdml_over_baseline", {})
            for key, v in piece["variants"].items():
                if "step_seconds" not in v:
                    lines.append(f"{key:30s} {v.get('error', 'not timed')}")
                    continue
                memory = v.get("memory", {})
                peak = memory.get("peak_bytes") or memory.get("max_rss_after_warmup_bytes")
                ratio = ratios.get("xla" if v.get("jit_compile") else "no_xla") if v.get("method") == "hdml" else None
                lines.append(f"{key:30s} {v['images_per_s']:9.1f} {v['step_seconds']:8.4f} "
                             f"{v.get('warmup_and_compile_seconds') or 0:9.1f} {_mb(peak):>8s} "
                             f"{(format(ratio['wall'], '.3f') if ratio else ''):>9s}")
            for method, x in piece.get("xla", {}).items():
                lines.append(f"  {name} {method}: XLA speed-up {x['xla_speedup']:.3f}")
    derived = result.get("derived", {})
    modes = pieces.get("pipeline", {}).get("modes", {})
    if modes:
        rates = ", ".join(f"{m} {t['images_per_s']:.0f}" if "images_per_s" in t else f"{m} skipped"
                          for m, t in modes.items())
        line = f"input pipeline (images/s, batch {pieces['pipeline'].get('data', {}).get('batch_size')}): {rates}"
        io = derived.get("input_vs_step")
        if io:
            line += (f"; {io['consumer']} consumes {io['consumer_images_per_s']:.0f}: cached/step "
                     f"{io['cached_ratio']}, uncached/step {io['uncached_ratio']} (target >= 2)")
        lines.append(line)
    runs = dict(pieces.get("train", {}).get("runs", {}))
    spread = pieces.get("train_spread", {}).get("run")
    if spread:
        runs["float32 seed+1"] = spread
    if runs:
        data = pieces.get("train", {}).get("data", {})
        lines.append(f"training on {data.get('dataset')} ({data.get('train_classes')} training classes, batch "
                     f"{data.get('batch_size')}), NMI and R@1 on {data.get('test_classes')} unseen classes:")
        lines.append(f"{'run':16s} {'steps':>6s} {'images/s':>9s} {'non-finite':>10s} {'skipped':>7s} "
                     f"{'metric loss scale':>18s} {'NMI':>6s} {'R@1':>6s}")
        for key, r in runs.items():
            if "metrics" not in r:
                lines.append(f"{key:16s} {r.get('skipped') or r.get('error') or 'not finished'}")
                continue
            scale = r.get("loss_scale")
            scales = (f"{scale['trajectory'][0][1]:g} -> {scale['final']['metric']:g}" if scale and
                      scale.get("trajectory") else "-")
            lines.append(f"{key:16s} {r['steps_done']:6d} {r.get('images_per_s') or 0:9.1f} "
                         f"{r['nonfinite_steps']:10d} {r['skipped_steps']:7d} {scales:>18s} "
                         f"{100 * r['metrics']['nmi']:6.1f} {100 * r['metrics']['recall@1']:6.1f}")
        agree = derived.get("float16_vs_float32")
        if agree:
            d = agree["difference_points"]
            verdict = ("within the seed spread" if agree["within_spread"] else "OUTSIDE the seed spread"
                       if agree["within_spread"] is False else "spread not measured")
            lines.append(f"float16 - float32: NMI {d['nmi']:+.2f}, R@1 {d['recall@1']:+.2f} points: {verdict}"
                         + ("" if agree["same_steps"] else " (the runs did not train the same number of steps)"))
    row = derived.get("projected_row", {})
    if row.get("fastest_hdml") or row.get("from_training_runs_minutes"):
        fast = row.get("fastest_hdml", {})
        parts = []
        if fast:
            parts.append(f"{fast['variant']} {fast['minutes']} min" + (
                f" ({fast['minutes_with_cached_input']} min with the cached pipeline)"
                if "minutes_with_cached_input" in fast else ""))
        parts += [f"training run {p} {minutes} min" for p, minutes in row.get("from_training_runs_minutes",
                                                                                   {}).items()]
        lines.append(f"projected {row['steps']} steps (one paper row, steps only): " + "; ".join(parts))
    for name, piece in pieces.items():
        if piece["status"] in ("skipped", "failed", "interrupted", "pending"):
            lines.append(f"{piece['status']}: {name} ({piece.get('reason') or piece.get('error') or ''})")
    if result.get("numbers_are") == "CPU":
        lines.append("(all numbers above are CPU numbers)")
    lines.append(f"JSON: {output} (status {result['status']}, {result['elapsed_s']:.0f} s of {result['budget_s']:g} s)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
_START = time.monotonic()


@common_flags.run_main
def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    settings = settings_from_flags()
    check = Check(settings, _START, " ".join([Path(sys.argv[0]).name] + sys.argv[1:]))
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        signal.signal(signum, lambda s, f, code=code: check.stop(
            f"interrupted by {signal.Signals(s).name}", "interrupted", code))
    result = check.run()
    print(summary(result, settings.output), flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common_flags.parse_flags)
