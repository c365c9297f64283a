"""The configuration of a run, written once: three frozen dataclasses whose fields carry their default and help.

The library never reads command-line flags. The tools derive one flag per field from these dataclasses (name, type,
default, help and choices all come from here: `tools/common_flags.py`), parse `--flagfile=configs/...` and hand the
dataclasses down. A default changed here is the command line's default too.

- `HDMLConfig`: the method (what the model computes). `HDMLConfig()` is the paper's method with the official
  Cars196 N-pair values (main_npair.py + FLAGS.py of github wzzheng/HDML).
- `OptimConfig`: the three Adam optimizers and the learning-rate schedule.
- `RunConfig`: what to train on, for how long, where results go, and how (devices, precision, checkpoints).

Each field's help text (`help(name)`, or the `metadata` of `dataclasses.fields(...)`) is its documentation.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional, Sequence, Tuple, Union

from hdml_tf.errors import ConfigError

__all__ = ["ConfigError", "HDMLConfig", "OptimConfig", "RunConfig", "option", "field_help", "choices_of"]

Choices = Union[Sequence[str], Callable[[], Sequence[str]], None]


def option(default, help: str, *, choices: Choices = None, flag: Optional[str] = None):
    """A dataclass field with its command-line documentation.

    Args:
      default: the default value (immutable).
      help: one or two sentences; the tools print it in `--help` and it is the field's documentation.
      choices: allowed string values, or a callable returning them (a registry's `names`), for `--flag` enums.
      flag: the flag's name when it differs from the field's (e.g. `lr_decay_steps` for `decay_steps`).
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def field_help(cls, name: str) -> str:
    """The help text of field `name` of a config class."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}[name]


def _layout_names():
    from hdml_tf import layouts
    return layouts.names()


def _dataset_names():
    from hdml_tf.data import datasets
    return datasets.names()


def _backbone_names():
    from hdml_tf.backbones import BACKBONES
    return tuple(BACKBONES)


#: How the pull factor of the hardness-aware augmentation is computed (HDMLConfig.pull).
PULL_MODES = ("adaptive", "fixed", "none")
#: How much gradient J_syn may send back through the generator into the embedding and the backbone
#: (HDMLConfig.syn_gradient).
SYN_GRADIENT_MODES = ("full", "capped", "none")


@dataclasses.dataclass(frozen=True)
class HDMLConfig:
    """Hyper-parameters of the method (what the model computes, not how long it trains)."""

    loss: str = option("npair", "Metric loss J_m, and with it the batch's tuple layout (hdml_tf.layouts).",
                       choices=_layout_names)
    embedding_size: int = option(128, "Size of the embedding z (official: 128 Cars196, 256 CUB-200).")
    hdml: bool = option(True, "Apply HDML; false trains the plain baseline with the same everything else.")
    alpha: float = option(90.0, "alpha of the pull factor exp(-alpha/J_avg) of the hardness-aware augmentation "
                                "(paper eq. 8; official 90).")
    pull: str = option("adaptive", "How the pull factor of the augmentation is computed: adaptive is the paper's "
                                   "exp(-alpha/J_avg); fixed uses --fixed_pull at every step; none uses 1, so the "
                                   "synthetic negatives are the generator's reconstruction of the real ones (an "
                                   "ablation).", choices=PULL_MODES)
    fixed_pull: float = option(0.5, "The constant pull factor of --pull=fixed, in [0, 1] (1: negatives stay, 0: "
                                    "they land at the positive's distance).")
    syn_gradient: str = option("full", "The gradient J_syn sends through the generator into the embeddings z (and so "
                                       "into the backbone): full is the paper's; capped scales it, each step, to at "
                                       "most --syn_gradient_cap times the norm of the real J_m's gradient at z; none "
                                       "stops it (J_syn then trains the metric head only). An option against the "
                                       "instability of from-scratch training (README), off by default.",
                               choices=SYN_GRADIENT_MODES)
    syn_gradient_cap: float = option(1.0, "The cap of --syn_gradient=capped: the norm of J_syn's gradient at z is at "
                                          "most this times that of the real J_m's.")
    beta: float = option(1e4, "beta of the synthetic weight 1 - exp(-beta/J_gen) (paper eq. 15; 1e4 Cars196, 5e3 "
                              "CUB).")
    gen_lambda: float = option(0.5, "lambda trading J_recon against J_soft in J_gen (official 0.5).")
    softmax_factor: float = option(1e4, "Factor of J_soft (the official code multiplies it by 1e4).")
    npair_l2: float = option(3e-3, "L2 penalty on the N-pair embeddings (official 3e-3 Cars196, 1.5e-2 CUB).")
    weight_decay: float = option(5e-3, "L2 weight decay (sum v^2/2) of backbone and metric-head kernels and biases, "
                                       "part of J_m as in main_npair.py (official 5e-3 Cars196, 1e-3 CUB).")
    triplet_margin: float = option(1.0, "Margin of the triplet loss on squared distances (official 1.0).")
    contrastive_margin: float = option(1.0, "Margin of the contrastive loss on squared distances (official 1.0).")
    window: int = option(64, "Steps per window of the running means J_avg and J_gen (official data_collector: 64).")
    running_init: float = option(1e6, "Value of the running means before their first window closes (official "
                                      "1e6).")
    generator_hidden: int = option(512, "Width of the generator's hidden layer (official 512).")
    skip_nonfinite: bool = option(True, "A step whose loss or gradient is NaN/Inf applies no update (the official "
                                        "code zeroes a NaN loss; here weights and optimizer state stay untouched).")

    def __post_init__(self):
        self.layout()  # raises ConfigError for an unknown loss
        for name in ("embedding_size", "alpha", "beta", "window", "running_init", "generator_hidden"):
            _positive(name, getattr(self, name))
        if not 0.0 <= self.gen_lambda <= 1.0:
            raise ConfigError(f"gen_lambda={self.gen_lambda} must lie in [0, 1]")
        if self.pull not in PULL_MODES:
            raise ConfigError(f"pull={self.pull!r} is unknown; expected one of {', '.join(PULL_MODES)}")
        if not 0.0 <= self.fixed_pull <= 1.0:
            raise ConfigError(f"fixed_pull={self.fixed_pull} must lie in [0, 1]")
        if self.syn_gradient not in SYN_GRADIENT_MODES:
            raise ConfigError(f"syn_gradient={self.syn_gradient!r} is unknown; expected one of "
                              f"{', '.join(SYN_GRADIENT_MODES)}")
        if self.syn_gradient_cap < 0:
            raise ConfigError(f"syn_gradient_cap={self.syn_gradient_cap} must be >= 0")
        for name in ("softmax_factor", "npair_l2", "weight_decay", "triplet_margin", "contrastive_margin"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")

    def layout(self):
        """The `hdml_tf.layouts.Layout` of `loss` with this config's hyper-parameters (margins, N-pair L2)."""
        from hdml_tf import layouts
        return layouts.get(self.loss, self)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizers and schedule (official Cars196 defaults, main_npair.py)."""

    learning_rate: float = option(7e-5, "Adam learning rate of backbone + metric head, J_metric (7e-5 Cars196, "
                                        "6e-5 CUB).")
    generator_learning_rate: float = option(1e-2, "Adam learning rate of the generator, J_gen.")
    classifier_learning_rate: float = option(1e-3, "Adam learning rate of the softmax classifier, J_ce.")
    decay_steps: Tuple[int, ...] = option((5632, 6848), "Steps at which the metric learning rate is multiplied by "
                                                        "--lr_decay_factor.", flag="lr_decay_steps")
    decay_factor: float = option(0.5, "Learning-rate multiplier at each decay step (official 0.5).",
                                 flag="lr_decay_factor")
    adam_epsilon: float = option(1e-8, "Epsilon of all three Adam optimizers; 1e-8 is TF1 AdamOptimizer's default, "
                                       "which the official code used (Keras' Adam defaults to 1e-7).")

    def __post_init__(self):
        for name in ("learning_rate", "generator_learning_rate", "classifier_learning_rate", "decay_factor",
                     "adam_epsilon"):
            _positive(name, getattr(self, name))
        if list(self.decay_steps) != sorted(self.decay_steps) or any(s <= 0 for s in self.decay_steps):
            raise ConfigError(f"decay_steps={self.decay_steps} must be positive and increasing")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to train on and for how long, where results go, and on what (the method itself is HDMLConfig)."""

    # What to train on
    dataset: str = option("glyphs", "Data set (hdml_tf.data.datasets); glyphs and digits ship with the installed "
                                    "packages.", choices=_dataset_names)
    data_dir: Optional[str] = option(None, "Where a photo data set is unpacked, in its official layout.")
    cache: Optional[str] = option(None, "Cache decoded images: 'memory' or a directory.")
    strict_images: bool = option(False, "Stop at the first unreadable image instead of skipping and listing it.")
    # Network and images
    backbone: str = option("inception_v1_slim", "Backbone network.", choices=_backbone_names)
    weights: Optional[str] = option(None, "ImageNet weights for the backbone (TF-Slim .ckpt, Caffe .mat, Keras "
                                          ".h5); none trains from random initialization.")
    caffe_lrn: bool = option(False, "Caffe's own LRN instead of the official HDML code's (inception_v1_caffe).")
    image_size: int = option(0, "Crop fed to the backbone; 0: 64 for the embedded data sets, else the backbone's "
                                "ImageNet size (227 Caffe, 224 slim / ResNet-50).")
    resize: int = option(0, "Side of the square every image is squashed to before cropping; 0: the crop itself for "
                            "the embedded sets, the official 256/227 (or 256/224) proportion for photos.")
    flip: Optional[bool] = option(None, "Random horizontal flips in training; unset: on for photos, off for glyphs "
                                        "and digits (a mirrored letter is another class).")
    # Schedule
    batch_size: int = option(128, "Global batch size, a whole number (>= 2) of the loss's tuples.")
    steps: int = option(8000, "Training steps.")
    steps_per_epoch: int = option(500, "Steps per Keras epoch (logs, curves, evaluation granularity).")
    # Evaluation
    eval_every_epochs: int = option(0, "Evaluate every k epochs during training (0: only at the end): the test "
                                       "classes, or the validation classes with --validation_fraction; keeps the "
                                       "best checkpoint by --monitor and reports it next to the last one.")
    validation_fraction: float = option(0.0, "Hold out this share of the TRAINING classes for model selection (the "
                                             "fair protocol; the test classes are then only scored at the end). "
                                             "Needs --eval_every_epochs.")
    monitor: str = option("recall@1", "Metric selecting the best checkpoint (recall@K, nmi, f1, map@r, "
                                      "r_precision; higher is better).")
    eval_batch_size: int = option(64, "Batch size when embedding for evaluation.")
    recall_ks: Tuple[int, ...] = option((), "K of Recall@K (empty: the data set's own list).")
    kmeans_restarts: int = option(10, "k-means restarts behind NMI/F1 (the best inertia is kept); 10 with "
                                      "random_state 1 is the official protocol, fewer trade a biased-low, noisier "
                                      "NMI/F1 for time (SOP's 11,316 clusters).")
    seed: int = option(0, "Seeds sampling, augmentation and initialization.")
    output_dir: str = option("", "Where results, histories, plots and weights go; empty: runs/<run_name>, or a new "
                                 "runs/<dataset>_<loss>_<method>/version_<N> per run (with --checkpoint_dir, the "
                                 "directory of the run those checkpoints belong to). A directory holding another run "
                                 "is refused unless --overwrite.")
    run_name: Optional[str] = option(None, "Name of the run: its default output directory is runs/<run_name>, so "
                                           "the same command finds the same run again.")
    overwrite: bool = option(False, "Replace another run's files in --output_dir (and its checkpoints in "
                                    "--checkpoint_dir), or train a complete run again, instead of refusing / "
                                    "reporting it. Only the run's own files are removed.")
    verbose: int = option(1, "0: no progress lines; 1: progress lines (into a file: a line per epoch and per "
                             "minute); 2: also TensorFlow's own log lines (C++ start-up, devices).")
    # Fault tolerance
    checkpoint_dir: Optional[str] = option(None, "Checkpoint directory; the same command run again resumes from "
                                                 "its newest readable checkpoint (model, optimizers, running means, "
                                                 "step, sampler).")
    checkpoint_every: int = option(500, "Steps between checkpoints (0: only at the end and on SIGTERM).")
    keep_checkpoints: int = option(3, "Newest checkpoints kept.")
    deterministic: bool = option(False, "Seeds + TensorFlow op determinism: equal runs, and interrupted-and-resumed "
                                        "runs, give equal weights (slower on GPU).")
    max_bad_steps: int = option(20, "Stop after this many consecutive steps with a NaN/Inf loss or gradient (each "
                                    "one is skipped); 0: never stop.")
    # Devices
    strategy: str = option("default", "default: one device; mirrored: every GPU of this machine; multi_worker: "
                                      "every GPU of every machine in TF_CONFIG (run the same command on each). "
                                      "--batch_size stays the global batch the losses see.",
                           choices=lambda: _distribute().STRATEGIES)
    mixed_precision: str = option("float32", "Compute precision of the backbone (float16: dynamic loss scaling on "
                                             "all three optimizers); metric head, generator, classifier and losses "
                                             "stay float32.", choices=lambda: _distribute().PRECISIONS)
    jit_compile: str = option("auto", "XLA-compile the train step; auto: on with a GPU, off on a CPU (where it "
                                      "measured slower).", choices=("auto", "true", "false"))

    def __post_init__(self):
        from hdml_tf.backbones import BACKBONES
        from hdml_tf.data import datasets
        spec = datasets.get(self.dataset)
        if not spec.embedded:
            if not self.data_dir:
                raise ConfigError(f"dataset={self.dataset} needs --data_dir (where its archive is unpacked)")
            if not os.path.isdir(self.data_dir):
                raise ConfigError(f"data_dir={self.data_dir} is not a directory")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone={self.backbone!r} is unknown; expected one of {', '.join(BACKBONES)}")
        if self.weights and self.weights != "imagenet" and not os.path.exists(self.weights) and not (
                os.path.exists(self.weights + ".index")):
            raise ConfigError(f"weights={self.weights} does not exist")
        if self.run_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name):
            raise ConfigError(f"run_name={self.run_name!r} must be a plain name (letters, digits, '.', '_', '-'), "
                              "not a path; use --output_dir for a path")
        for name in ("steps", "steps_per_epoch", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        smallest = BACKBONES[self.backbone].min_image_size
        if self.image_size and self.image_size < smallest:
            raise ConfigError(f"image_size={self.image_size} must be >= {smallest} for {self.backbone} (or 0 for the "
                              f"default)")
        if any(k <= 0 for k in self.recall_ks):
            raise ConfigError(f"recall_ks={self.recall_ks} must be positive")
        for name, low in (("checkpoint_every", 0), ("keep_checkpoints", 1), ("max_bad_steps", 0),
                          ("kmeans_restarts", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= {low}")
        for name in ("strategy", "mixed_precision", "jit_compile"):
            choices = choices_of(_field(RunConfig, name))
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is unknown; expected one of {', '.join(choices)}")
        self._check_selection()

    def _check_selection(self) -> None:
        if self.eval_every_epochs < 0:
            raise ConfigError(f"eval_every_epochs={self.eval_every_epochs} must be >= 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"validation_fraction={self.validation_fraction} must lie in [0, 1)")
        if self.validation_fraction > 0 and self.eval_every_epochs <= 0:
            raise ConfigError(f"validation_fraction={self.validation_fraction} selects a checkpoint on the "
                              "validation classes; it needs eval_every_epochs > 0")
        choices = ["nmi", "f1", "map@r", "r_precision"] + [f"recall@{k}" for k in self.ks()]
        if self.monitor_key not in choices:
            raise ConfigError(f"monitor={self.monitor!r} is not computed; choose one of {', '.join(choices)}")

    @property
    def embedded(self) -> bool:
        """True for the data sets that ship with the installed packages."""
        from hdml_tf.data import datasets
        return datasets.get(self.dataset).embedded

    @property
    def monitor_key(self) -> str:
        """`monitor` without a "val_" prefix."""
        return self.monitor[len("val_"):] if self.monitor.startswith("val_") else self.monitor

    def augment(self):
        """The run's image geometry, `hdml_tf.data.images.Augment(resize, crop, flip)` (`datasets.geometry`)."""
        from hdml_tf.data import datasets
        return datasets.geometry(self.dataset, self.backbone, self.image_size, self.resize, self.flip)

    def crop_size(self) -> int:
        """Side of the crop fed to the backbone."""
        return self.augment().crop

    def ks(self) -> Tuple[int, ...]:
        """K of Recall@K: `recall_ks`, or the data set's own list."""
        from hdml_tf.data import datasets
        return tuple(self.recall_ks) or datasets.recall_ks(self.dataset)


def choices_of(field: dataclasses.Field) -> Optional[Tuple[str, ...]]:
    """The allowed values of a field (its `choices`, called if it is a registry's `names`), or None."""
    choices = field.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def _distribute():
    from hdml_tf import distribute
    return distribute


def _field(cls, name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(cls)}[name]


def _positive(name, value):
    if not value > 0:
        raise ConfigError(f"{name}={value} must be > 0")
