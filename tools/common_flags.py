"""Flags shared by the tools that train (train.py, reproduce.py, benchmark.py); the library never sees them.

Each tool calls `define_training_flags()` before `app.run`, then `configs_from_flags()` to get the plain
dataclasses the library takes. `run_main(fn)` turns a user error into one line `error: ...` and exit code 2.
"""
from __future__ import annotations

import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402

FLAGS = flags.FLAGS


def define_training_flags(defaults=None):
    d = {"dataset": "glyphs", "steps": 8000, "batch_size": 128, "steps_per_epoch": 500, **(defaults or {})}
    # What to train on
    flags.DEFINE_enum("dataset", d["dataset"], ["glyphs", "digits", "cub200", "cars196", "sop", "folder"],
                      "Data set; glyphs and digits ship with the installed packages.")
    flags.DEFINE_string("data_dir", None, "Where a photo data set is unpacked (its official layout).")
    flags.DEFINE_string("cache", None, "Cache decoded images: 'memory' or a directory.")
    flags.DEFINE_bool("strict_images", False, "Stop at the first unreadable image instead of skipping it.")
    # Network
    flags.DEFINE_enum("backbone", "inception_v1_slim", ["inception_v1_slim", "inception_v1_caffe", "resnet50"],
                      "Backbone network.")
    flags.DEFINE_string("weights", None, "ImageNet weights for the backbone (slim .ckpt, Caffe .mat, Keras .h5).")
    flags.DEFINE_bool("caffe_lrn", False, "Caffe's own LRN instead of the official HDML code's (caffe layout).")
    flags.DEFINE_integer("image_size", 0, "Crop size; 0 = 64 for glyphs/digits, else the backbone's default.")
    flags.DEFINE_integer("resize", 0, "Square resize before cropping; 0 = 256 for photos, crop size otherwise.")
    # Method
    flags.DEFINE_enum("loss", "npair", ["npair", "triplet", "contrastive"], "Metric loss J_m.")
    flags.DEFINE_bool("hdml", True, "Apply HDML (False: the plain baseline with the same everything else).")
    flags.DEFINE_bool("compare_baseline", False, "Also train the plain baseline the same way and print both.")
    flags.DEFINE_integer("embedding_size", 128, "Embedding size (128 Cars196, 256 CUB-200).")
    flags.DEFINE_float("alpha", 90.0, "alpha of the pull factor exp(-alpha/J_avg).")
    flags.DEFINE_float("beta", 1e4, "beta of the synthetic weight 1-exp(-beta/J_gen) (1e4 Cars, 5e3 CUB).")
    flags.DEFINE_float("gen_lambda", 0.5, "lambda between J_recon and J_soft.")
    flags.DEFINE_float("softmax_factor", 1e4, "Factor of J_soft (official 1e4).")
    flags.DEFINE_float("npair_l2", 3e-3, "L2 penalty of the N-pair embeddings (3e-3 Cars, 1.5e-2 CUB).")
    flags.DEFINE_float("weight_decay", 5e-3, "Weight decay of backbone and head (5e-3 Cars, 1e-3 CUB).")
    flags.DEFINE_float("triplet_margin", 1.0, "Triplet margin (squared distances).")
    flags.DEFINE_integer("window", 64, "Steps per window of the running means J_avg and J_gen.")
    # Optimization
    flags.DEFINE_float("learning_rate", 7e-5, "Adam lr of backbone + metric head (7e-5 Cars, 6e-5 CUB).")
    flags.DEFINE_float("generator_learning_rate", 1e-2, "Adam lr of the generator.")
    flags.DEFINE_float("classifier_learning_rate", 1e-3, "Adam lr of the softmax classifier.")
    flags.DEFINE_list("lr_decay_steps", ["5632", "6848"], "Steps at which the metric lr is multiplied by "
                      "--lr_decay_factor.")
    flags.DEFINE_float("lr_decay_factor", 0.5, "Learning-rate multiplier at each decay step.")
    flags.DEFINE_float("adam_epsilon", 1e-8, "epsilon of the three Adam optimizers (1e-8: TF1 AdamOptimizer's "
                       "default, which the official code used; Keras' own default is 1e-7).")
    flags.DEFINE_integer("batch_size", d["batch_size"], "Global batch size in the loss's tuple layout.")
    flags.DEFINE_integer("steps", d["steps"], "Training steps.")
    flags.DEFINE_integer("steps_per_epoch", d["steps_per_epoch"], "Steps per Keras epoch (logging granularity).")
    flags.DEFINE_integer("eval_every_epochs", 0, "Evaluate every k epochs during training (0: only at the end): the "
                         "test classes, or the validation classes with --validation_fraction; keeps the best "
                         "checkpoint by --monitor and reports it next to the last one.")
    flags.DEFINE_float("validation_fraction", 0.0, "Hold out this share of the TRAINING classes for model selection "
                       "(the fair protocol; the test classes are then only scored at the end). Needs "
                       "--eval_every_epochs.")
    flags.DEFINE_string("monitor", "recall@1", "Metric selecting the best checkpoint (recall@K, nmi, f1, map@r, "
                        "r_precision; higher is better).")
    flags.DEFINE_integer("eval_batch_size", 64, "Batch size when embedding for evaluation.")
    flags.DEFINE_list("recall_ks", [], "K of Recall@K (default per data set).")
    flags.DEFINE_integer("kmeans_restarts", 10, "k-means restarts behind NMI/F1, best inertia kept; 10 (random_state "
                         "1, k = number of classes) is the official protocol, fewer are faster but biased low.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_string("output_dir", "runs/default", "Where results, histories, plots and weights go.")
    flags.DEFINE_integer("verbose", 1, "Keras verbosity (1 progress bar, 2 one line per epoch, 0 silent).")
    define_fault_tolerance_flags()
    define_distribution_flags()


def define_fault_tolerance_flags():
    """Checkpoints / resume, determinism and the NaN guard (RunConfig's fields of the same names)."""
    flags.DEFINE_string("checkpoint_dir", None, "Checkpoint directory; the same command run again resumes from "
                        "its newest readable checkpoint (model, optimizers, running means, step, sampler).")
    flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints (0: only at the end and on SIGTERM).")
    flags.DEFINE_integer("keep_checkpoints", 3, "Newest checkpoints kept.")
    flags.DEFINE_bool("deterministic", False, "Seeds + TensorFlow op determinism: equal runs, and interrupted-and-"
                      "resumed runs, give equal weights (slower on GPU).")
    flags.DEFINE_integer("max_bad_steps", 20, "Stop after this many consecutive steps with a NaN/Inf loss or "
                         "gradient (each one is skipped); 0: never stop.")


def fault_tolerance_options():
    """RunConfig keyword arguments of the flags `define_fault_tolerance_flags` defines."""
    return dict(checkpoint_dir=FLAGS.checkpoint_dir, checkpoint_every=FLAGS.checkpoint_every,
                keep_checkpoints=FLAGS.keep_checkpoints, deterministic=FLAGS.deterministic,
                max_bad_steps=FLAGS.max_bad_steps)


def define_distribution_flags():
    """Several devices / machines and mixed precision (RunConfig's `strategy` and `mixed_precision`)."""
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                      "default: one device; mirrored: every GPU of this machine; multi_worker: every GPU of every "
                      "machine in the TF_CONFIG environment variable (run the same command on each). --batch_size "
                      "stays the global batch the losses see.")
    flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                      "XLA-compile the train step; auto = on with a GPU, off on a CPU (where it measured slower).")
    flags.DEFINE_enum("mixed_precision", "float32", ["float32", "float16", "bfloat16"],
                      "Compute precision of the backbone (float16: dynamic loss scaling on all three optimizers); "
                      "metric head, generator, classifier and losses stay float32.")


def distribution_options():
    """RunConfig keyword arguments of the flags `define_distribution_flags` defines."""
    return dict(strategy=FLAGS.strategy, mixed_precision=FLAGS.mixed_precision, jit_compile=FLAGS.jit_compile)


def _ints(values, name):
    from hdml_tf.config import ConfigError
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(f"--{name}={','.join(values)} must be a comma-separated list of integers")


def configs_from_flags():
    """(RunConfig, HDMLConfig, OptimConfig) from the parsed flags; raises ConfigError on a bad value."""
    from hdml_tf.config import HDMLConfig, OptimConfig
    from hdml_tf.experiment import RunConfig
    run = RunConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, backbone=FLAGS.backbone, image_size=FLAGS.image_size,
        resize=FLAGS.resize, weights=FLAGS.weights, caffe_lrn=FLAGS.caffe_lrn, batch_size=FLAGS.batch_size,
        steps=FLAGS.steps, steps_per_epoch=FLAGS.steps_per_epoch, eval_every_epochs=FLAGS.eval_every_epochs,
        validation_fraction=FLAGS.validation_fraction, monitor=FLAGS.monitor,
        eval_batch_size=FLAGS.eval_batch_size, recall_ks=_ints(FLAGS.recall_ks, "recall_ks"),
        kmeans_restarts=FLAGS.kmeans_restarts, seed=FLAGS.seed,
        output_dir=FLAGS.output_dir, cache=FLAGS.cache, strict_images=FLAGS.strict_images, verbose=FLAGS.verbose,
        **fault_tolerance_options(), **distribution_options())
    hdml = HDMLConfig(
        loss=FLAGS.loss, embedding_size=FLAGS.embedding_size, hdml=FLAGS.hdml, alpha=FLAGS.alpha, beta=FLAGS.beta,
        gen_lambda=FLAGS.gen_lambda, softmax_factor=FLAGS.softmax_factor, npair_l2=FLAGS.npair_l2,
        weight_decay=FLAGS.weight_decay, triplet_margin=FLAGS.triplet_margin, window=FLAGS.window)
    optim = OptimConfig(
        learning_rate=FLAGS.learning_rate, generator_learning_rate=FLAGS.generator_learning_rate,
        classifier_learning_rate=FLAGS.classifier_learning_rate,
        decay_steps=_ints(FLAGS.lr_decay_steps, "lr_decay_steps"), decay_factor=FLAGS.lr_decay_factor,
        adam_epsilon=FLAGS.adam_epsilon)
    hdml.check_batch_size(run.batch_size)
    return run, hdml, optim


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
