"""A small training run for the resume tests, started as a subprocess so it can really be killed.

    python tests/resume_driver.py CHECKPOINT_DIR [--kill_in_save K] [--reference DIR]

Trains the tiny backbone with HDML for 10 steps (epochs of 4) on an in-memory ImageSet through
`hdml_tf.experiment.fit`, deterministic, with a checkpoint every 2 steps; started again with the same
CHECKPOINT_DIR it resumes. --kill_in_save K: SIGKILL half-way through writing the checkpoint of step K (the
process dies mid-epoch and mid-save). --reference DIR: afterwards, trains a fresh model from scratch,
uninterrupted, into DIR. Prints one JSON line at the end.
"""
import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import logging  # noqa: E402

import numpy as np  # noqa: E402

from conftest import tiny_backbone  # noqa: E402
from hdml_tf import checkpointing, experiment  # noqa: E402
from hdml_tf.callbacks import TrainingInterrupted  # noqa: E402
from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig  # noqa: E402
from hdml_tf.data.image_set import ImageSet  # noqa: E402
from hdml_tf.model import HDMLModel, make_optimizers  # noqa: E402

STEPS, EVERY, SIZE, CROP = 10, 2, 36, 32  # RunConfig crops at least 32 px


def image_set(classes=6, per_class=4, seed=0):
    """Images with a class-dependent colour and pattern plus noise, labels 0..C-1."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    base = rng.uniform(0, 255, (classes, SIZE, SIZE, 3))
    images = np.clip(base[labels] + rng.normal(0, 20, (len(labels), SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    return ImageSet(labels=labels, class_names=[str(c) for c in range(classes)], images=images, name="toy/train")


def configs(checkpoint_dir, keep=3):
    run = RunConfig(dataset="glyphs", image_size=CROP, resize=SIZE, batch_size=8, steps=STEPS, steps_per_epoch=4,
                               seed=0, verbose=0, checkpoint_dir=str(checkpoint_dir), checkpoint_every=EVERY,
                               keep_checkpoints=keep, deterministic=True, max_bad_steps=3)
    hdml = HDMLConfig(embedding_size=8, window=2)  # windows of 2 steps: J_avg / J_gen move during the run
    optim = OptimConfig(learning_rate=1e-3, decay_steps=(3, 7))  # the schedule changes during the run
    return run, hdml, optim


def build(train, hdml, optim):
    model = HDMLModel(tiny_backbone(image_size=CROP), train.num_classes, hdml)
    model.compile(**make_optimizers(optim))
    return model


def kill_while_writing(step):
    """Makes the checkpoint of `step` die half-way: some bytes reach the temporary file, then SIGKILL."""
    write = checkpointing.write_npz

    def partial_then_kill(path, arrays):
        if f"ckpt-{step:08d}" in path.name:
            with open(path, "wb") as f:
                f.write(b"PK\x03\x04 half a checkpoint")
                f.flush()
                os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        write(path, arrays)

    checkpointing.write_npz = partial_then_kill


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("--kill_in_save", type=int)
    parser.add_argument("--reference")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr)
    train = image_set()
    run, hdml, optim = configs(args.checkpoint_dir)
    experiment.enable_determinism(run.seed)
    if args.kill_in_save is not None:
        kill_while_writing(args.kill_in_save)
    model = build(train, hdml, optim)
    try:
        experiment.fit(model, run, hdml, train)
    except TrainingInterrupted as e:  # what tools/common_flags.run_main does
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    manager = experiment.checkpoint_manager(run, hdml)
    result = {"step": manager.latest_step, "skipped": float(model.skipped.numpy())}
    if args.reference:
        # The uninterrupted run: this model put back in the state a fresh build gives (weights, optimizers, running
        # means), trained from step 0. Reusing the model reuses its traced train step (seconds on a busy CPU).
        ref_run, _, _ = configs(args.reference, keep=10)
        experiment.enable_determinism(ref_run.seed)
        fresh = checkpointing.checkpoint_groups(build(train, hdml, optim))
        for group, variables in checkpointing.checkpoint_groups(model).items():
            for v, initial in zip(variables, fresh[group]):
                v.assign(initial.numpy())
        experiment.fit(model, ref_run, hdml, train)
        result["reference_step"] = experiment.checkpoint_manager(ref_run, hdml).latest_step
    print(json.dumps(result))


if __name__ == "__main__":
    main()
