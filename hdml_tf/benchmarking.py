"""Measuring training speed, memory and input pipelines: what tools/benchmark.py, tools/benchmark_input.py and
tools/gpu_check.py share.

- `make_batch`: a random batch in the tuple layout of a loss, so a train step can be timed without data.
- `TimedVariant` + `time_interleaved`: the train step of several models timed in blocks of steps, in an order
  rotated every round, so that drift (other processes, clocks, thermals) falls on all of them alike;
  `paired_ratio` compares two of them round by round.
- `accelerator`, `reset_peak_memory`, `memory_info`, `cpu_seconds`: peak memory of the GPU
  (`tf.config.experimental.get_memory_info`) or, on a CPU, the process's max resident size.
- `describe_machine`, `device_facts`: what the numbers were measured on (and whether XLA and the 16-bit policies
  run there).
- `time_dataset`, `time_train_steps`, `generate_image_folder`: the input pipeline against the train step.
- `Budget`, `write_json_atomic`: measurements under a wall-clock budget whose results survive a kill.

Nothing here reads flags; the tools pass plain values.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf



# ------------------------------------------------------------------------------------------------ inputs
def make_batch(loss: str, batch_size: int, image_size: int, num_classes: int,
               seed: int = 0) -> Tuple[tf.Tensor, tf.Tensor]:
    """A random batch in the tuple layout of `loss` (docs/ARCHITECTURE.md), for timing a train step.

    Args:
      loss: "npair", "triplet" or "contrastive".
      batch_size: B, a multiple of the tuple size with at least 2 tuples.
      image_size: S.
      num_classes: training classes of the model's classifier; the labels used must lie below it.
      seed: NumPy seed of the pixels.

    Returns:
      (images float32 [B, S, S, 3] uniform in 0..255, labels int32 [B]): the labels of batch 0 that the real
      sampler draws from `num_classes` classes (`hdml_tf.data.sampler.example_labels`).

    Raises:
      ConfigError: the batch does not fit the layout. DataError: it needs more than `num_classes` classes.
    """
    from hdml_tf.data.sampler import example_labels
    labels = example_labels(loss, batch_size, num_classes, seed=seed)  # as the sampler lays a batch out
    images = np.random.default_rng(seed).uniform(0, 255, (batch_size, image_size, image_size, 3)).astype(np.float32)
    return tf.constant(images), tf.constant(labels.astype(np.int32))


def generate_image_folder(root, classes: int = 16, per_class: int = 24, height: int = 320, width: int = 400,
                          seed: int = 0) -> Path:
    """Writes `classes` x `per_class` JPEGs (smooth random colour patterns, quality 90) as a class-folder tree.

    Stands in for a photo data set where none is at hand: decoding cost is that of real JPEGs of that size.
    Returns `root` (`hdml_tf.data.readers.read_image_folder` reads it).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            small = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            image = tf.cast(tf.image.resize(small, [height, width]), tf.uint8)
            tf.io.write_file(str(folder / f"{i:03d}.jpg"), tf.io.encode_jpeg(image, quality=90))
    return root


# ------------------------------------------------------------------------------------------------ memory
def accelerator() -> Optional[str]:
    """"GPU:0" when TensorFlow sees a GPU, else None (a CPU run)."""
    return "GPU:0" if tf.config.list_physical_devices("GPU") else None


def reset_peak_memory(device: Optional[str]) -> None:
    """Starts a new peak-memory window on `device` (nothing on a CPU: max RSS cannot be reset)."""
    if device:
        tf.config.experimental.reset_memory_stats(device)


def memory_info(device: Optional[str]) -> Dict[str, int]:
    """{'peak_bytes', 'current_bytes'} of the GPU since the last reset, or {'max_rss_bytes'} of this process.

    The process's max RSS (`resource.getrusage`) is process-wide and only grows: on a CPU, a later model's value
    includes every earlier one.
    """
    if device:
        info = tf.config.experimental.get_memory_info(device)
        return {"peak_bytes": int(info["peak"]), "current_bytes": int(info["current"])}
    return {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (steadier than wall time on a shared machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------------ machine
def describe_machine() -> dict:
    """Platform, CPU model and cores, GPUs TensorFlow sees (name, compute capability), library versions, load."""
    import keras
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = []
    for d in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(d)
        gpus.append({"name": details.get("device_name", d.name),
                     "compute_capability": details.get("compute_capability")})
    return {"platform": platform.platform(), "cpu": cpu, "cpu_cores": os.cpu_count(), "gpus": gpus,
            "tensorflow": tf.__version__, "keras": keras.__version__, "python": platform.python_version(),
            "load_average_start": [round(x, 2) for x in os.getloadavg()]}


def _memory_total_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def nvidia_smi(timeout: float = 15.0) -> Optional[List[Dict[str, str]]]:
    """One dict per GPU from `nvidia-smi --query-gpu` (name, driver, memory, compute capability, power limit, max
    SM clock), or None when nvidia-smi is absent or fails (no NVIDIA driver). An older driver that does not know
    a field is asked again for the basic fields only."""
    for fields in (("name", "driver_version", "memory.total", "compute_cap", "power.limit", "clocks.max.sm"),
                   ("name", "driver_version", "memory.total")):
        try:
            proc = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.SubprocessError):
            return None
        if proc.returncode == 0:
            return [dict(zip(fields, (part.strip() for part in line.split(","))))
                    for line in proc.stdout.strip().splitlines() if line.strip()]
    return None


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = (str(error).strip().splitlines() or [""])[0][:limit]
    return f"{type(error).__name__}: {text}"


def _probe(dtype: str, jit_compile: bool, device: str) -> dict:
    """Runs a small conv + matmul in `dtype` on `device` (XLA-compiled or not) and compares it with plain float32."""
    def compute(x, kernel):
        y = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
        flat = tf.reshape(y, [tf.shape(y)[0], -1])
        return tf.reduce_sum(tf.cast(tf.matmul(flat, flat, transpose_b=True), tf.float32))

    try:
        with tf.device(device):
            x = tf.random.stateless_uniform([8, 16, 16, 8], [1, 2])
            kernel = tf.random.stateless_uniform([3, 3, 8, 8], [3, 4]) / 8.0
            reference = float(tf.function(compute)(x, kernel))
            start = time.perf_counter()
            value = float(tf.function(compute, jit_compile=jit_compile)(tf.cast(x, dtype), tf.cast(kernel, dtype)))
            seconds = time.perf_counter() - start
    except Exception as e:  # an unsupported dtype or a missing XLA backend: report, do not stop
        return {"usable": False, "error": _one_line(e)}
    return {"usable": bool(np.isfinite(value)), "first_call_seconds": round(seconds, 3),
            "relative_error_vs_float32": float(f"{abs(value - reference) / abs(reference):.3g}")}


def _fast_precisions(compute_capability) -> Dict[str, Optional[bool]]:
    """Whether the GPU has tensor cores for the 16-bit types: float16 from compute capability 7.0 (Volta),
    bfloat16 from 8.0 (Ampere). None when unknown (no GPU, or no capability reported)."""
    if not compute_capability:
        return {"float16": None, "bfloat16": None}
    major_minor = tuple(int(v) for v in compute_capability)
    return {"float16": major_minor >= (7, 0), "bfloat16": major_minor >= (8, 0)}


def device_facts(probe: bool = True) -> dict:
    """What the measurements run on: `describe_machine()` plus TensorFlow's CUDA build, the NVIDIA driver
    (nvidia-smi), GPU memory, and with `probe` whether XLA and float16 / bfloat16 compute run on the device.

    `accelerator` is "GPU" or "CPU"; `gpu_not_used` explains a machine whose driver sees a GPU that TensorFlow
    does not (typically a TensorFlow without its CUDA libraries: `pip install 'tensorflow[and-cuda]'`).
    """
    facts = describe_machine()
    build = dict(tf.sysconfig.get_build_info())
    facts["tensorflow_build"] = {k: build.get(k) for k in ("is_cuda_build", "cuda_version", "cudnn_version",
                                                          "cuda_compute_capabilities")}
    facts["nvidia_smi"] = nvidia_smi()
    facts["ram_bytes"] = _memory_total_bytes()
    gpu = accelerator()
    facts["accelerator"] = "GPU" if gpu else "CPU"
    if not gpu and facts["nvidia_smi"]:
        facts["gpu_not_used"] = (f"nvidia-smi sees {facts['nvidia_smi'][0].get('name')} but TensorFlow sees no GPU: "
                                 f"is_cuda_build={build.get('is_cuda_build')}; install the CUDA libraries "
                                 f"(pip install 'tensorflow[and-cuda]=={tf.__version__}') or check "
                                 f"CUDA_VISIBLE_DEVICES")
    if gpu:
        facts["gpu_memory"] = memory_info(gpu)
    capability = facts["gpus"][0]["compute_capability"] if facts["gpus"] else None
    fast = _fast_precisions(capability)
    if probe:
        device = f"/{gpu}" if gpu else "/CPU:0"
        facts["xla"] = _probe("float32", True, device)
        facts["precisions"] = {p: dict(_probe(p, False, device), tensor_cores=fast[p])
                               for p in ("float16", "bfloat16")}
    return facts


# ------------------------------------------------------------------------------------------------ timing
class TimedVariant:
    """One model whose train step is timed: built by `build`, warmed up, then timed in blocks of steps.

    Args:
      name: key of the variant in results.
      build: () -> a compiled keras.Model (e.g. `HDMLModel`) whose `train_on_batch(images, labels)` is timed.
      batch_size: rows per step (for images/s).
      **tags: plain values copied into `summary()` (method, jit_compile, precision, ...).

    A failure (an op XLA cannot compile, out of memory) is recorded in `error`; the model is dropped and the
    other variants go on.
    """

    def __init__(self, name: str, build: Callable[[], object], batch_size: int, **tags):
        self.name, self.build, self.batch_size, self.tags = name, build, int(batch_size), tags
        self.model = None
        self.error: Optional[str] = None
        self.blocks: List[Tuple[float, float]] = []  # (wall s/step, CPU s/step) per timed block
        self.memory: Dict[str, int] = {}
        self.build_seconds: Optional[float] = None
        self.first_step_seconds: Optional[float] = None
        self.warmup_seconds: Optional[float] = None
        self.last_step_seconds: Optional[float] = None

    def step(self, batch, n: int) -> float:
        """n train steps on `batch`; returns the last loss as a Python float (so the steps have finished)."""
        logs = None
        for _ in range(n):
            logs = self.model.train_on_batch(*batch, return_dict=True)
        return float(logs["loss"])

    def _fail(self, error: BaseException) -> None:
        self.error = _one_line(error)
        self.model = None

    def warm_up(self, batch, device: Optional[str], steps: int = 2) -> None:
        """Builds the model and runs `steps` (>= 1) untimed steps: tracing, XLA compilation, autotuning.

        Records build_seconds, first_step_seconds (trace/compile + one step), warmup_seconds (all of it),
        last_step_seconds (the mean of the later steps; None with steps=1) and memory: on a GPU
        `warmup_peak_bytes` (the first steps' peak, autotuning scratch included); on a CPU
        `max_rss_after_warmup_bytes`.
        """
        reset_peak_memory(device)
        start = time.perf_counter()
        try:
            self.model = self.build()
            built = time.perf_counter()
            self.step(batch, 1)
            first = later = time.perf_counter()
            if steps > 1:
                self.step(batch, steps - 1)
                later = time.perf_counter()
        except Exception as e:
            self._fail(e)
            return
        self.build_seconds = round(built - start, 3)
        self.first_step_seconds = round(first - built, 3)
        self.warmup_seconds = round(later - start, 3)
        # A step's time after tracing; unknown after a single (tracing) step.
        self.last_step_seconds = (later - first) / (steps - 1) if steps > 1 else None
        if device:
            self.memory = {"warmup_peak_bytes": memory_info(device)["peak_bytes"]}
        else:
            self.memory = {"max_rss_after_warmup_bytes": memory_info(None)["max_rss_bytes"]}

    def time_block(self, batch, device: Optional[str], steps: int) -> None:
        """Times `steps` steps; on a GPU also their peak memory and what they add above the memory in use."""
        if self.model is None:
            return
        reset_peak_memory(device)
        before = memory_info(device) if device else {}
        cpu, wall = cpu_seconds(), time.perf_counter()
        try:
            self.step(batch, steps)
        except Exception as e:
            self._fail(e)
            return
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        self.blocks.append((wall / steps, cpu / steps))
        self.last_step_seconds = wall / steps
        if device:
            after = memory_info(device)
            self.memory["peak_bytes"] = max(self.memory.get("peak_bytes", 0), after["peak_bytes"])
            self.memory["step_bytes"] = max(self.memory.get("step_bytes", 0),
                                            after["peak_bytes"] - before["current_bytes"])

    @property
    def step_seconds(self) -> Optional[float]:
        """Median wall seconds per step over the timed blocks (None before any)."""
        return statistics.median(w for w, _ in self.blocks) if self.blocks else None

    def summary(self) -> dict:
        """Plain values: the tags, the warm-up (once done), the timings (once timed: else `timed` False) and the
        error, if any."""
        found = dict(self.tags, batch_size=self.batch_size)
        if self.warmup_seconds is not None:
            found.update(warmup_and_compile_seconds=self.warmup_seconds, build_seconds=self.build_seconds,
                         first_step_seconds=self.first_step_seconds, memory=dict(self.memory))
        if self.blocks:
            step = self.step_seconds
            found.update(step_seconds=round(step, 4), images_per_s=round(self.batch_size / step, 2),
                         cpu_seconds_per_step=round(statistics.median(c for _, c in self.blocks), 4),
                         block_step_seconds=[round(w, 4) for w, _ in self.blocks])
        if self.error:
            found["error"] = self.error
        elif not self.blocks:
            found["timed"] = False
        return found


def time_interleaved(variants: Sequence[TimedVariant], batch, device: Optional[str], steps: int, rounds: int, *,
                     fits: Optional[Callable[[float], bool]] = None,
                     progress: Optional[Callable[[str], None]] = None) -> int:
    """Times warmed-up variants in `rounds` rounds of one block of `steps` steps each, the order rotated by one
    every round; returns the number of rounds done.

    One untimed step of each variant comes first, in turn (the first block after another model's steps runs
    slow). With `fits`, a round starts only if `fits(estimated seconds of the round)` says it fits the budget,
    the estimate coming from each variant's latest step time.
    """
    live = [v for v in variants if v.model is not None]
    for v in live:
        try:
            start = time.perf_counter()
            v.step(batch, 1)
            v.last_step_seconds = time.perf_counter() - start
        except Exception as e:
            v._fail(e)
    done = 0
    for r in range(rounds):
        live = [v for v in live if v.model is not None]
        if not live:
            break
        if fits is not None and not fits(sum(steps * (v.last_step_seconds or 0.0) for v in live)):
            break
        order = live[r % len(live):] + live[:r % len(live)]
        for v in order:
            v.time_block(batch, device, steps)
        done += 1
        if progress is not None:
            progress(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{v.name} {v.blocks[-1][0]:.3f} s/step" for v in order if v.model is not None and v.blocks))
    return done


def paired_ratio(numerator: TimedVariant, denominator: TimedVariant, target: Optional[float] = None):
    """Median over rounds of numerator's block step time / denominator's block in the same round (wall and CPU).

    Blocks of the same round ran back to back, so the ratio of each pair is free of slow drift. None when either
    variant failed or was not timed. With `target`, also whether the wall ratio is at most the target.
    """
    if numerator.error or denominator.error or not numerator.blocks or not denominator.blocks:
        return None
    pairs = list(zip(numerator.blocks, denominator.blocks))
    cpu = (round(statistics.median(a[1] / b[1] for a, b in pairs), 3) if all(b[1] > 0 for _, b in pairs)
           else None)  # None: no measurable CPU time (a block too short for the clock's resolution)
    found = {"wall": round(statistics.median(a[0] / b[0] for a, b in pairs), 3), "cpu": cpu, "rounds": len(pairs)}
    if target is not None:
        found.update(target=target, meets_target=found["wall"] <= target)
    return found


# ------------------------------------------------------------------------------------------------ input pipeline
def time_dataset(dataset, batch_size: int, warmup: int, steps: int) -> dict:
    """images/s of a dataset of (images, labels) batches pulled as fast as possible, after `warmup` batches.

    Returns {'images_per_s', 'seconds', 'steps'}; the last batch is copied to NumPy, so it was really produced.
    """
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    images = None
    for _ in range(steps):
        images, _ = next(iterator)
    if images is not None:
        _ = images.numpy()
    seconds = time.perf_counter() - start
    return {"images_per_s": round(steps * batch_size / seconds, 1), "seconds": round(seconds, 3), "steps": steps}


def time_train_steps(model, batch, warmup: int, steps: int) -> dict:
    """images/s of `model.train_on_batch` on one batch already in memory, after `warmup` untimed calls.

    Returns {'images_per_s', 'seconds', 'steps', 'step_seconds'}.
    """
    images, labels = batch
    for _ in range(warmup):
        model.train_on_batch(images, labels)
    start = time.perf_counter()
    logs = None
    for _ in range(steps):
        logs = model.train_on_batch(images, labels, return_dict=True)
    if logs is not None:
        float(logs["loss"])  # waits for the last step
    seconds = time.perf_counter() - start
    rows = int(labels.shape[0])
    return {"images_per_s": round(steps * rows / seconds, 1), "seconds": round(seconds, 3), "steps": steps,
            "step_seconds": round(seconds / max(steps, 1), 4)}


# ------------------------------------------------------------------------------------------------ budget, results
class Budget:
    """A wall-clock budget: what is left, and whether an estimated piece of work still fits.

    Args:
      seconds: the whole budget, counted from construction.
      margin: seconds kept back at the end (for writing results) when judging whether work fits.
      clock: monotonic clock in seconds (replaceable in tests).
    """

    def __init__(self, seconds: float, margin: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.margin, self.clock = float(seconds), float(margin), clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, estimate: float) -> bool:
        """True when `estimate` seconds of work end before the budget minus the margin."""
        return self.remaining() - self.margin >= estimate


def write_json_atomic(path, obj) -> None:
    """Writes `obj` as indented JSON so that `path` always holds a complete file: a temporary file in the same
    directory, flushed and fsync'ed, then renamed over `path` (atomic on POSIX), then the directory fsync'ed.
    A kill at any moment leaves either the previous complete file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, default=_json_default) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(str(path.parent), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover - file systems that refuse fsync on directories
        pass
    finally:
        os.close(dir_fd)


def _json_default(value):
    """NumPy scalars and arrays as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
