"""Plain configuration objects passed from the tools into the library.

The library never reads command-line flags: `tools/*.py` parse absl flags, build one of these frozen
dataclasses and hand it down. Every field has the paper's / official code's default (Cars196 N-pair,
main_npair.py + FLAGS.py of github wzzheng/HDML) so `HDMLConfig()` is the paper's method.
"""
from __future__ import annotations

import dataclasses
from typing import Tuple

from hdml_tf.errors import HDMLError

LOSSES = ("npair", "triplet", "contrastive")


class ConfigError(HDMLError, ValueError):
    """A configuration value is invalid; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class HDMLConfig:
    """Hyper-parameters of the method (what the model computes, not how long it trains).

    Attributes:
      loss: metric loss J_m: "npair" (batch = N anchors then their N positives), "triplet"
        (batch = B/3 anchors, B/3 positives, B/3 negatives) or "contrastive" (batch = B/4
        positive-pair left sides, B/4 right sides, B/4 negative-pair left, B/4 right).
      embedding_size: size of z (official: 128 Cars196, 256 CUB-200).
      hdml: False gives the plain baseline (same backbone, loss, data and schedule).
      alpha: α of the hardness-aware augmentation, e^(−α/J_avg) (paper eq. 8; official 90).
      beta: β of the synthetic weight 1 − e^(−β/J_gen) (paper eq. 15; 1e4 Cars196, 5e3 CUB).
      gen_lambda: λ trading J_recon against J_soft in J_gen (official 0.5).
      softmax_factor: the official code multiplies J_soft by 1e4.
      npair_l2: L2 penalty on N-pair embeddings (official 3e-3 Cars196, 1.5e-2 CUB).
      weight_decay: L2 weight decay (Σ v²/2) on backbone and metric-head kernels and biases
        (official `Regular_factor`: 5e-3 Cars196, 1e-3 CUB). It is part of J_m as in main_npair.py.
      triplet_margin: margin of the triplet loss on squared distances (official 1.0).
      contrastive_margin: margin of the contrastive loss on squared distances (official 1.0).
      window: steps per window of the running means J_avg / J_gen (official data_collector: 64).
      running_init: value of the running means before the first window closes (official 1e6).
      generator_hidden: width of the generator's hidden layer (official 512).
      skip_nonfinite: a step whose loss or gradient is NaN/Inf applies no update (official code
        zeroes a NaN loss; we leave weights and optimizer state untouched).
    """

    loss: str = "npair"
    embedding_size: int = 128
    hdml: bool = True
    alpha: float = 90.0
    beta: float = 1e4
    gen_lambda: float = 0.5
    softmax_factor: float = 1e4
    npair_l2: float = 3e-3
    weight_decay: float = 5e-3
    triplet_margin: float = 1.0
    contrastive_margin: float = 1.0
    window: int = 64
    running_init: float = 1e6
    generator_hidden: int = 512
    skip_nonfinite: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is unknown; expected one of {', '.join(LOSSES)}")
        _positive("embedding_size", self.embedding_size)
        _positive("alpha", self.alpha)
        _positive("beta", self.beta)
        _positive("window", self.window)
        _positive("running_init", self.running_init)
        _positive("generator_hidden", self.generator_hidden)
        if not 0.0 <= self.gen_lambda <= 1.0:
            raise ConfigError(f"gen_lambda={self.gen_lambda} must lie in [0, 1]")
        for name in ("softmax_factor", "npair_l2", "weight_decay", "triplet_margin",
                     "contrastive_margin"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")

    @property
    def tuple_size(self) -> int:
        """Rows per tuple of the batch layout: 2 (N-pair), 3 (triplet), 4 (contrastive)."""
        return {"npair": 2, "triplet": 3, "contrastive": 4}[self.loss]

    def check_batch_size(self, batch_size: int) -> None:
        """Raises ConfigError unless `batch_size` fits the loss's tuple layout."""
        k = self.tuple_size
        if batch_size <= 0 or batch_size % k or batch_size // k < 2:
            raise ConfigError(
                f"batch_size={batch_size} does not fit the {self.loss} layout: expected a multiple of "
                f"{k} with at least 2 tuples (e.g. {4 * k})")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimizers and schedule (official Cars196 defaults, main_npair.py).

    Attributes:
      learning_rate: Adam lr of backbone + metric head (J_metric).
      generator_learning_rate: Adam lr of the generator (J_gen).
      classifier_learning_rate: Adam lr of the softmax classifier (J_ce).
      decay_steps: steps at which the backbone lr is multiplied by decay_factor.
      decay_factor: multiplier applied at each of decay_steps (official 0.5).
      adam_epsilon: epsilon of all three Adam optimizers; 1e-8 is TF1 `tf.train.AdamOptimizer`'s default, which
        the official code used (Keras' Adam defaults to 1e-7).
    """

    learning_rate: float = 7e-5
    generator_learning_rate: float = 1e-2
    classifier_learning_rate: float = 1e-3
    decay_steps: Tuple[int, ...] = (5632, 6848)
    decay_factor: float = 0.5
    adam_epsilon: float = 1e-8

    def __post_init__(self):
        for name in ("learning_rate", "generator_learning_rate", "classifier_learning_rate",
                     "decay_factor", "adam_epsilon"):
            _positive(name, getattr(self, name))
        if list(self.decay_steps) != sorted(self.decay_steps) or any(s <= 0 for s in self.decay_steps):
            raise ConfigError(f"decay_steps={self.decay_steps} must be positive and increasing")


def _positive(name, value):
    if not value > 0:
        raise ConfigError(f"{name}={value} must be > 0")
