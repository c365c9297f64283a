"""Tuple layouts: everything that depends on how a metric loss lays out its batch, in one object per loss.

A training batch is a stack of tuples, written part by part (rows first). `NPair` (N-pair loss): N anchors of N
distinct classes, then their N positives in the same class order (B = 2N). `Triplet`: T anchors, T positives, T
negatives (B = 3T). `Contrastive`: P left and P right sides of positive pairs, then the P left and P right sides of
negative pairs (B = 4P).

A layout answers every question that depends on this arrangement, so that the model (`hdml_tf.model`), the sampler
(`hdml_tf.data.sampler`), distribution (`hdml_tf.distribute`) and configuration (`hdml_tf.config`) never branch on
a loss name:

- `size`, `tuples(B)`, `check_batch_size(B)`: which batch sizes are legal;
- `split(t)`: the parts of a batch;
- `metric_loss(z, labels)`: J_m of a real batch (without weight decay);
- `synthesize(z, factor)`: the hardness-aware synthetic tuples ẑ (paper eq. 8, `hardness.pull`), with the row
  order the other synthetic methods expect; `synthetic_labels`, `synthetic_loss` (J_m of z̃ = head(generator(ẑ))),
  `softmax_loss` (the cross-entropy of J_soft, paper eq. 13), `pulled_fraction`;
- `sample(draws, n)`: the rows of one batch, from the sampler's class-balanced primitives.

The maths stays in `hdml_tf.losses` and `hdml_tf.hardness` (pure functions); a layout only arranges rows. A new
loss is one subclass registered with `register`; `get(name)` and `names()` are what the rest of the package asks.
"""
from __future__ import annotations

from typing import ClassVar, Dict, List, Tuple, Type

import tensorflow as tf

from hdml_tf import hardness, losses
from hdml_tf.errors import ConfigError

_REGISTRY: Dict[str, Type["Layout"]] = {}


def register(cls: Type["Layout"]) -> Type["Layout"]:
    """Class decorator: makes a layout known under `cls.name` (config validation, `get`, flags)."""
    if not cls.name or cls.size < 1:
        raise TypeError(f"{cls.__name__} needs a name and a size >= 1")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forgets a layout registered with `register` (for tests that add a toy one)."""
    _REGISTRY.pop(name, None)


def names() -> Tuple[str, ...]:
    """Names of the registered layouts, in registration order ("npair", "triplet", "contrastive", ...)."""
    return tuple(_REGISTRY)


def get(name: str, config=None) -> "Layout":
    """The layout of loss `name`, with its hyper-parameters taken from `config` (an HDMLConfig; None: defaults).

    Raises:
      ConfigError: `name` is not a registered layout.
    """
    if name not in _REGISTRY:
        raise ConfigError(f"loss={name!r} is unknown; expected one of {', '.join(_REGISTRY)}")
    cls = _REGISTRY[name]
    return cls() if config is None else cls.from_config(config)


class Layout:
    """Base class of a tuple layout; subclasses set `name`, `size` and implement the methods below.

    Attributes:
      name: the loss's name ("npair"), as in HDMLConfig.loss and the `--loss` flag.
      size: rows per tuple (2, 3, 4).
      parts: the names of the `size` parts, in row order (for messages and docs).
    """

    name: ClassVar[str] = ""
    size: ClassVar[int] = 0
    parts: ClassVar[Tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, config) -> "Layout":
        """The layout with the hyper-parameters of an HDMLConfig (default: none)."""
        return cls()

    # ------------------------------------------------------------------------------------------- batch sizes
    def tuples(self, batch_size: int) -> int:
        """Number of tuples in a batch of `batch_size` rows."""
        return int(batch_size) // self.size

    def check_batch_size(self, batch_size: int) -> None:
        """Raises ConfigError unless `batch_size` is a whole number of tuples, at least 2 of them."""
        k = self.size
        if batch_size <= 0 or batch_size % k or batch_size // k < 2:
            raise ConfigError(
                f"batch_size={batch_size} does not fit the {self.name} layout: expected a multiple of "
                f"{k} with at least 2 tuples (e.g. {4 * k})")

    def split(self, tensor: tf.Tensor) -> List[tf.Tensor]:
        """[B, ...] → `size` tensors [B / size, ...], the parts in row order."""
        return tf.split(tensor, self.size, axis=0)

    # ------------------------------------------------------------------------------------------- losses
    def metric_loss(self, embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """J_m of a real batch [B, E] with labels int [B], without weight decay: float32 scalar."""
        raise NotImplementedError

    def synthesize(self, embeddings: tf.Tensor, factor: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
        """Hardness-aware synthetic tuples ẑ of a batch [B, E] and which negatives were pulled.

        Args:
          embeddings: float [B, E] in this layout.
          factor: the pull factor e^(−α/J_avg) (float32 scalar; 1 keeps negatives, 0 pulls them to distance d⁺).
        Returns:
          (z_hat float32 [M, E], was_pulled bool [...]); M and the row order are the layout's.
        """
        raise NotImplementedError

    def synthetic_labels(self, labels: tf.Tensor) -> tf.Tensor:
        """Labels int [M] of the rows of `synthesize`'s ẑ: every synthetic point keeps its source's class."""
        return labels

    def synthetic_loss(self, synthetic: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """J_m of the synthetic tuples z̃ [M, E] (rows as `synthesize` returns them), labels of the REAL batch."""
        return self.metric_loss(synthetic, labels)

    def softmax_loss(self, logits: tf.Tensor, synthetic_labels: tf.Tensor) -> tf.Tensor:
        """Cross-entropy part of J_soft: the classifier's logits [M, C] of the synthetic features must still
        name each source class (paper eq. 13); one mean over the rows unless the layout says otherwise."""
        return losses.mean_cross_entropy(synthetic_labels, logits)

    def pulled_fraction(self, was_pulled: tf.Tensor) -> tf.Tensor:
        """Share of the negatives that the augmentation moved (float32 scalar in [0, 1])."""
        return tf.reduce_mean(tf.cast(was_pulled, tf.float32))

    # ------------------------------------------------------------------------------------------- sampling
    def sample(self, draws: "ClassDraws", n: int, seed: tf.Tensor) -> tf.Tensor:
        """Rows int64 [B] of one batch of `n` tuples, in this layout, from the sampler's primitives.

        Args:
          draws: the sampler (`data.sampler.TupleSampler`).
          n: tuples per batch.
          seed: int64 [2], the batch's seed; the batch must be a pure function of it (`batch_seeds` splits it).
        """
        raise NotImplementedError

    def min_classes(self, n: int) -> Tuple[int, int]:
        """(classes with >= 2 images, classes in all) that a batch of `n` tuples needs."""
        return n, 1


class ClassDraws:
    """The class-balanced primitives a layout samples a batch from (implemented by `data.sampler.TupleSampler`).

    Every method is a pure function of its `seed` (int64 [2], stateless random ops) and returns int64 tensors:
    rows of the data set, or class positions.
    """

    def distinct_classes(self, n: int, seed) -> tf.Tensor:  # pragma: no cover - interface
        """[n] distinct classes having >= 2 images (anchors)."""
        raise NotImplementedError

    def two_rows(self, classes, seed) -> Tuple[tf.Tensor, tf.Tensor]:  # pragma: no cover - interface
        """Two different rows of each class [n] → ([n], [n])."""
        raise NotImplementedError

    def one_row(self, classes, seed) -> tf.Tensor:  # pragma: no cover - interface
        """One row of each class [n] → [n]."""
        raise NotImplementedError

    def other_classes(self, classes, seed) -> tf.Tensor:  # pragma: no cover - interface
        """For each class [n], a class drawn uniformly among the other classes → [n]."""
        raise NotImplementedError

    def distinct_others(self, taken, seed) -> tf.Tensor:  # pragma: no cover - interface
        """As many classes as `taken` [n], distinct, none of them in `taken`, uniformly without replacement → [n]."""
        raise NotImplementedError

    def any_classes(self, n: int, seed) -> tf.Tensor:  # pragma: no cover - interface
        """[n] classes drawn uniformly (with replacement) among all classes."""
        raise NotImplementedError


def batch_seeds(seed: tf.Tensor, count: int) -> List[tf.Tensor]:
    """`count` independent int64 [2] seeds from a batch's seed (stateless)."""
    # At least five: the built-in layouts keep the random streams they were written with.
    return tf.unstack(tf.random.experimental.stateless_split(seed, max(5, count)))[:count]


# --------------------------------------------------------------------------------------------------- N-pair
@register
class NPair(Layout):
    """N-pair (Sohn, NIPS 2016): rows 0..N−1 anchors of N distinct classes, N..2N−1 their positives.

    Synthesis pulls, for anchor i and every class j, the positive of class j towards anchor i (j = i keeps the
    positive itself, since d⁺ = d⁻): ẑ = [N anchors; N·N pulled points], row N + i·N + j, as the official code
    tiles them. J_m of ẑ scores anchor i against its own N candidates (official `new_npair_loss`).

    Args:
      l2_reg: λ of the official N-pair L2 penalty on the embeddings (3e-3 Cars196, 1.5e-2 CUB).
    """

    name = "npair"
    size = 2
    parts = ("anchors", "positives")

    def __init__(self, l2_reg: float = 3e-3):
        self.l2_reg = float(l2_reg)

    @classmethod
    def from_config(cls, config) -> "NPair":
        return cls(config.npair_l2)

    def metric_loss(self, embeddings, labels):
        anchors, positives = self.split(embeddings)
        _, positive_labels = self.split(labels)
        # The official code scores both sides with the positives' labels (they are the anchors' labels).
        return losses.npair_loss(anchors, positives, positive_labels, positive_labels, self.l2_reg)

    def synthesize(self, embeddings, factor):
        anchors, positives = self.split(tf.cast(embeddings, tf.float32))
        d_pos = losses.safe_norm(anchors - positives)  # [N]
        n = tf.shape(anchors)[0]
        anchor_grid = tf.repeat(anchors[:, None, :], n, axis=1)  # [N, N, E]: anchor i on row i
        negative_grid = tf.repeat(positives[None, :, :], n, axis=0)  # [N, N, E]: class j in column j
        d_pos_grid = tf.repeat(d_pos[:, None], n, axis=1)  # [N, N]
        pulled, was_pulled = hardness.pull(anchor_grid, negative_grid, d_pos_grid, factor)
        z_hat = tf.concat([anchors, tf.reshape(pulled, [-1, tf.shape(embeddings)[1]])], axis=0)
        return z_hat, was_pulled  # [N + N², E], [N, N]

    def synthetic_labels(self, labels):
        anchor_labels, positive_labels = self.split(labels)
        n = tf.shape(positive_labels)[0]
        return tf.concat([anchor_labels, tf.tile(positive_labels, [n])], axis=0)

    def synthetic_loss(self, synthetic, labels):
        anchor_labels, positive_labels = self.split(labels)
        n = tf.shape(anchor_labels)[0]
        candidates = tf.reshape(synthetic[n:], [n, n, tf.shape(synthetic)[1]])  # anchor i's N candidates
        return losses.npair_loss(synthetic[:n], candidates, anchor_labels, positive_labels, self.l2_reg)

    def softmax_loss(self, logits, synthetic_labels):
        # The official genSoftmax averages the N anchors and the N² pulled points separately and adds the means.
        n = tf.cast(tf.round((tf.sqrt(4.0 * tf.cast(tf.shape(synthetic_labels)[0], tf.float32) + 1.0) - 1.0) / 2.0),
                    tf.int32)  # M = N + N²
        return (losses.mean_cross_entropy(synthetic_labels[:n], logits[:n])
                + losses.mean_cross_entropy(synthetic_labels[n:], logits[n:]))

    def pulled_fraction(self, was_pulled):
        # The diagonal (anchor i against its own positive) is not a negative.
        n = tf.cast(tf.shape(was_pulled)[0], tf.float32)
        return tf.reduce_sum(tf.cast(was_pulled, tf.float32)) / tf.maximum(n * (n - 1.0), 1.0)

    def sample(self, draws, n, seed):
        s = batch_seeds(seed, 2)
        first, second = draws.two_rows(draws.distinct_classes(n, s[0]), s[1])
        return tf.concat([first, second], 0)


# --------------------------------------------------------------------------------------------------- triplet
@register
class Triplet(Layout):
    """Triplets: rows 0..T−1 anchors, T..2T−1 positives (same class as the anchor), 2T..3T−1 negatives.

    As the official TripletLossScheme, a batch holds 2T distinct classes: T anchor classes (>= 2 images each) and T
    other classes, one negative each.

    Synthesis pulls negative t towards anchor t (d⁺ from positive t): ẑ = [anchors; positives; pulled negatives].

    Args:
      margin: of the hinge on squared distances (official 1.0).
    """

    name = "triplet"
    size = 3
    parts = ("anchors", "positives", "negatives")

    def __init__(self, margin: float = 1.0):
        self.margin = float(margin)

    @classmethod
    def from_config(cls, config) -> "Triplet":
        return cls(config.triplet_margin)

    def metric_loss(self, embeddings, labels):
        return losses.triplet_loss(*self.split(embeddings), margin=self.margin)

    def synthesize(self, embeddings, factor):
        anchors, positives, negatives = self.split(tf.cast(embeddings, tf.float32))
        pulled, was_pulled = hardness.pull(anchors, negatives, losses.safe_norm(anchors - positives), factor)
        return tf.concat([anchors, positives, pulled], axis=0), was_pulled  # [3T, E], [T]

    def sample(self, draws, n, seed):
        s = batch_seeds(seed, 4)
        anchor_classes = draws.distinct_classes(n, s[0])
        first, second = draws.two_rows(anchor_classes, s[1])
        negatives = draws.one_row(draws.distinct_others(anchor_classes, s[2]), s[3])
        return tf.concat([first, second, negatives], 0)

    def min_classes(self, n):
        return n, 2 * n


# --------------------------------------------------------------------------------------------------- contrastive
@register
class Contrastive(Layout):
    """Pairs: rows 0..P−1 with P..2P−1 are positive pairs (P distinct classes); 2P..3P−1 with 3P..4P−1 negative pairs.

    Synthesis pulls the right side of negative pair i towards its left side, with d⁺ taken from positive pair i (the
    official code defines no contrastive pulling; this pairing is ours): ẑ = [both positive sides; negative left
    sides; pulled right sides].

    Args:
      margin: of the hinge on squared distances of negative pairs (official 1.0).
    """

    name = "contrastive"
    size = 4
    parts = ("positive left", "positive right", "negative left", "negative right")

    def __init__(self, margin: float = 1.0):
        self.margin = float(margin)

    @classmethod
    def from_config(cls, config) -> "Contrastive":
        return cls(config.contrastive_margin)

    def metric_loss(self, embeddings, labels):
        return losses.contrastive_loss(*self.split(embeddings), margin=self.margin)

    def synthesize(self, embeddings, factor):
        pos_left, pos_right, neg_left, neg_right = self.split(tf.cast(embeddings, tf.float32))
        pulled, was_pulled = hardness.pull(neg_left, neg_right, losses.safe_norm(pos_left - pos_right), factor)
        return tf.concat([pos_left, pos_right, neg_left, pulled], axis=0), was_pulled  # [4P, E], [P]

    def sample(self, draws, n, seed):
        s = batch_seeds(seed, 5)
        first, second = draws.two_rows(draws.distinct_classes(n, s[0]), s[1])
        left_classes = draws.any_classes(n, s[2])
        right_classes = draws.other_classes(left_classes, s[3])
        return tf.concat([first, second, draws.one_row(left_classes, s[4]),
                          draws.one_row(right_classes, tf.random.experimental.stateless_fold_in(s[4], 1))], 0)

    def min_classes(self, n):
        return n, 2

