#!/usr/bin/env python
"""Kill a deterministic training run at many random points, resume it, and check it ends bit-identical.

    python tools/stress_resume.py --trials=10 --output=runs/stress_resume.json          # inception_v1_slim, glyphs
    python tools/stress_resume.py --trials=2 --steps=6 --checkpoint_every=2 --steps_per_epoch=4   # a quick check

What it does. One uninterrupted run (or `--references` of them, to see whether two uninterrupted runs agree at
all) trains `--steps` steps with `--deterministic` and keeps every checkpoint. Then each trial starts the same
training in a new checkpoint directory and SIGKILLs it `--kills` times at random moments: at a random step,
after a random fraction of that step's time (so a kill lands inside a step, inside a checkpoint save, at an epoch
end, ...), each time starting it again with the same command, which resumes from its newest readable checkpoint;
the last start runs to the end. Every checkpoint the trial and the reference both hold (the same global step) must
be bit-identical in every array (weights, BatchNorm statistics, running means, the three optimizers). The report
(stdout and `--output`, JSON) lists per trial the kill steps, the steps each start resumed from, and the first step
whose checkpoint differs with the number of differing arrays.

The training is `hdml_tf.experiment.fit`, exactly what tools/train.py runs, on the embedded glyphs (or digits) with
`RunConfig(deterministic=True)` and, like tools/train.py --deterministic, TensorFlow's oneDNN CPU kernels off
(`--onednn` turns them on: that is how this tool found why one resume in five differed, README "Runs, resuming,
and what is never lost"); each start is a new process (`--worker`, this same file). Exit code 0 when every trial
matched, 1 when one differed; errors print one line and exit 2.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common_flags  # noqa: E402
from hdml_tf import atomic  # noqa: E402
from hdml_tf.errors import HDMLError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("trials", 5, "Kill-and-resume trials.")
flags.DEFINE_integer("kills", 1, "SIGKILLs per trial (each followed by a resume).")
flags.DEFINE_integer("references", 1, "Uninterrupted runs; with 2 or more they are also compared with each other.")
flags.DEFINE_integer("steps", 40, "Training steps.")
flags.DEFINE_integer("steps_per_epoch", 10, "Steps per Keras epoch.")
flags.DEFINE_integer("checkpoint_every", 10, "Steps between checkpoints.")
flags.DEFINE_string("dataset", "glyphs", "An embedded data set (glyphs or digits).")
flags.DEFINE_string("backbone", "inception_v1_slim", "Backbone.")
flags.DEFINE_integer("image_size", 32, "Crop size.")
flags.DEFINE_integer("batch_size", 16, "Batch size (N-pair: 2 x tuples).")
flags.DEFINE_integer("embedding_size", 16, "Embedding size.")
flags.DEFINE_bool("hdml", True, "HDML (false: the baseline).")
flags.DEFINE_integer("window", 4, "Running-mean window (small, so J_avg / J_gen move within the run).")
flags.DEFINE_integer("seed", 0, "Seed of the training (and, + 1, of the kill points).")
flags.DEFINE_string("work_dir", None, "Where the checkpoint directories go (default: a temporary folder, removed).")
flags.DEFINE_string("output", None, "JSON report (atomic).")
flags.DEFINE_float("timeout_s", 900.0, "Longest one start of the training may take.")
flags.DEFINE_bool("onednn", False, "Run the trainings with TensorFlow's oneDNN CPU kernels (TF_ENABLE_ONEDNN_OPTS=1). "
                  "Off is what tools/train.py --deterministic does; on reproduces the cross-process differences "
                  "this tool found (README).")
flags.DEFINE_bool("fresh_cache", False, "Reference 0 renders the glyphs into an empty cache (the others read it): "
                  "the situation in which two runs differed with oneDNN on.")
# Worker mode (the tool starting itself): one start of the training.
flags.DEFINE_bool("worker", False, "Internal: run the training once into --checkpoint_dir.")
flags.DEFINE_string("checkpoint_dir", None, "Internal (--worker): checkpoint directory.")

STEP_MARK = "STRESS_STEP "
READY_MARK = "STRESS_READY"


# ------------------------------------------------------------------------------------------------ worker
def _configs(checkpoint_dir):
    from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig
    run = RunConfig(dataset=FLAGS.dataset, backbone=FLAGS.backbone, image_size=FLAGS.image_size,
                    batch_size=FLAGS.batch_size, steps=FLAGS.steps, steps_per_epoch=FLAGS.steps_per_epoch,
                    seed=FLAGS.seed, verbose=0, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=FLAGS.checkpoint_every, keep_checkpoints=10 ** 6, deterministic=True)
    hdml = HDMLConfig(embedding_size=FLAGS.embedding_size, hdml=FLAGS.hdml, window=FLAGS.window)
    # A learning-rate decay inside the run, so the schedule's position (optimizer.iterations) matters.
    optim = OptimConfig(learning_rate=1e-3, decay_steps=(FLAGS.steps // 2,))
    return run, hdml, optim


def worker() -> int:
    """One start of the training: resumes from --checkpoint_dir, prints a line per finished step."""
    import keras

    from hdml_tf import experiment
    from hdml_tf.callbacks import TrainingInterrupted

    class Report(keras.callbacks.Callback):
        def __init__(self, start):
            super().__init__()
            self.step = start

        def on_train_begin(self, logs=None):
            print(READY_MARK, flush=True)

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            print(f"{STEP_MARK}{self.step}", flush=True)

    run, hdml, optim = _configs(FLAGS.checkpoint_dir)
    experiment.enable_determinism(run.seed)
    train, _ = experiment.load_splits(run)
    model = experiment.build_model(run, hdml, optim, train.num_classes)
    manager = experiment.checkpoint_manager(run, hdml)
    start = manager.latest_step or 0  # what fit will resume from (a damaged newest file only lowers it)
    try:
        experiment.fit(model, run, hdml, train, callbacks=[Report(start)])
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    return 0


# ------------------------------------------------------------------------------------------------ driver
def _start(checkpoint_dir: Path, log, cache_home=None):
    command = [sys.executable, os.path.abspath(__file__), "--worker", f"--checkpoint_dir={checkpoint_dir}"]
    command += [f"--{name}={FLAGS[name].value}" for name in
                ("steps", "steps_per_epoch", "checkpoint_every", "dataset", "backbone", "image_size", "batch_size",
                 "embedding_size", "window", "seed")]
    command.append("--hdml" if FLAGS.hdml else "--nohdml")
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1" if FLAGS.onednn else "0"}
    if cache_home:
        env["XDG_CACHE_HOME"] = str(cache_home)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1, env=env)


def run_to_end(checkpoint_dir: Path, log, cache_home=None) -> float:
    """One start that must finish; returns its wall time."""
    start = time.time()
    proc = _start(checkpoint_dir, log, cache_home)
    try:
        for _ in proc.stdout:
            pass
        code = proc.wait(timeout=FLAGS.timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    if code != 0:
        raise HDMLError(f"a training start in {checkpoint_dir} failed with exit code {code}; see {log.name}")
    return time.time() - start


def run_and_kill(checkpoint_dir: Path, kill_step: int, fraction: float, step_seconds: float, log) -> dict:
    """Starts the training and SIGKILLs it `fraction` of a step's time after step `kill_step - 1` finished."""
    proc = _start(checkpoint_dir, log)
    resumed_from, last = None, None
    try:
        for line in proc.stdout:
            line = line.strip()
            if line == READY_MARK:
                continue
            if line.startswith(STEP_MARK):
                last = int(line[len(STEP_MARK):])
                if resumed_from is None:
                    resumed_from = last - 1
                if last >= kill_step - 1:
                    time.sleep(fraction * step_seconds)
                    break
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"kill_after_step": last, "fraction_of_a_step": round(fraction, 3), "resumed_from": resumed_from,
            "exit": proc.returncode}


def checkpoints(directory: Path) -> dict:
    """{step: path} of the published checkpoints of the run's variant directory."""
    found = {}
    for variant in ("hdml", "baseline"):
        for p in sorted((directory / variant).glob("ckpt-*.npz")):
            found[int(p.name[5:13])] = p
    return found


def compare(trial: Path, reference: Path) -> dict:
    """Every checkpoint both runs hold, array by array; the first differing step and how many arrays differ."""
    import numpy as np

    from hdml_tf.checkpointing import read_checkpoint
    ours, theirs = checkpoints(trial), checkpoints(reference)
    common = sorted(set(ours) & set(theirs))
    result = {"compared_steps": common, "first_differing_step": None, "differing_arrays": 0, "arrays": 0}
    for step in common:
        _, a = read_checkpoint(ours[step])
        _, b = read_checkpoint(theirs[step])
        differing = sorted(k for k in b if k not in a or not np.array_equal(a[k], b[k]))
        result["arrays"] = len(b)
        if differing:
            result.update(first_differing_step=step, differing_arrays=len(differing), examples=differing[:8])
            break
    return result


def main(argv):
    if len(argv) > 1:
        raise HDMLError(f"unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    if FLAGS.worker:
        if not FLAGS.checkpoint_dir:
            raise HDMLError("--worker needs --checkpoint_dir")
        return worker()
    for name in ("references", "steps", "checkpoint_every"):
        if FLAGS[name].value < 1:
            raise HDMLError(f"--{name}={FLAGS[name].value} must be >= 1")
    for name in ("trials", "kills"):
        if FLAGS[name].value < 0:
            raise HDMLError(f"--{name}={FLAGS[name].value} must be >= 0")
    work = Path(FLAGS.work_dir or tempfile.mkdtemp(prefix="stress_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(FLAGS.seed + 1)
    report = {"settings": {name: FLAGS[name].value for name in
                           ("trials", "kills", "references", "steps", "steps_per_epoch", "checkpoint_every",
                            "dataset", "backbone", "image_size", "batch_size", "embedding_size", "hdml", "window",
                            "seed", "onednn", "fresh_cache")},
              "environment": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")},
              "references": [], "trials": []}
    started = time.time()
    with open(work / "workers.log", "a") as log:
        references = []
        for r in range(FLAGS.references):
            directory = work / f"reference_{r}"
            seconds = run_to_end(directory, log, work / "fresh_cache" if FLAGS.fresh_cache and r == 0 else None)
            references.append(directory)
            entry = {"seconds": round(seconds, 1)}
            if r:
                entry["against_reference_0"] = compare(directory, references[0])
            report["references"].append(entry)
            print(f"reference {r}: {seconds:.1f} s" + (f", against reference 0: {entry['against_reference_0']}"
                                                       if r else ""), flush=True)
        # A step's time, for kill points inside a step: the reference's whole time over-estimates it (start-up
        # and tracing included), which only spreads the kills further.
        step_seconds = report["references"][0]["seconds"] / FLAGS.steps
        for t in range(FLAGS.trials):
            directory = work / f"trial_{t}"
            starts = []
            for _ in range(FLAGS.kills):
                starts.append(run_and_kill(directory, rng.randint(1, FLAGS.steps), rng.random(), step_seconds, log))
            seconds = run_to_end(directory, log)
            result = compare(directory, references[0])
            entry = {"kills": starts, "final_start_seconds": round(seconds, 1), **result,
                     "identical": result["first_differing_step"] is None and FLAGS.steps in result["compared_steps"]}
            report["trials"].append(entry)
            kills = ", ".join(f"after step {k['kill_after_step']} (+{k['fraction_of_a_step']:.2f} step)"
                              for k in starts)
            print(f"trial {t}: killed {kills}; " + ("identical at every checkpoint" if entry["identical"] else
                  f"DIFFERS from step {result['first_differing_step']} ({result['differing_arrays']} of "
                  f"{result['arrays']} arrays)"), flush=True)
            if FLAGS.output:
                atomic.write_json(FLAGS.output, report)
    report["seconds"] = round(time.time() - started, 1)
    report["all_identical"] = all(t["identical"] for t in report["trials"]) and all(
        r.get("against_reference_0", {}).get("first_differing_step") is None for r in report["references"])
    if FLAGS.output:
        Path(FLAGS.output).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(FLAGS.output, report)
    if not FLAGS.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'all identical' if report['all_identical'] else 'DIFFERENCES FOUND'}: {FLAGS.trials} trials x "
          f"{FLAGS.kills} kills, {report['seconds']:.0f} s" + (f"; report {FLAGS.output}" if FLAGS.output else ""))
    return 0 if report["all_identical"] else 1


if __name__ == "__main__":
    app.run(common_flags.run_main(main), flags_parser=common_flags.parse_flags)
