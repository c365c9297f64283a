"""`HDMLModel`: backbone + metric head trained with Hardness-Aware Deep Metric Learning under `model.fit`.

One training step (paper Fig. 2; official main_npair.py / main_triplet.py):

1. y = backbone(x), z = head(y)                                  features [B, D], embeddings [B, E]
2. J_m = metric loss of z + weight decay                          (official: `J_m = Loss(...) + wdLoss`)
3. ẑ = hardness-aware augmentation of z with J_avg                (eq. 8, `hardness.augment`)
4. ỹ = generator([z; ẑ]); its first B rows reconstruct y, the rest are synthetic features
5. z̃ = head(synthetic features) with the SAME head (BatchNorm in training mode on both passes, as official)
6. J_metric = e^(−β/J_gen)·J_m + (1 − e^(−β/J_gen))·J_m(z̃)       (eq. 15, J_gen its running mean)
7. J_gen = (1−λ)·Σ(ỹ_rec − y)² + softmax_factor·λ·CE(classifier(ỹ_syn), source labels)
8. J_ce = CE(classifier(y), labels)

Gradient routing, as the official code's three `minimize(var_list=...)` calls: J_metric updates backbone and
head only (its gradient reaches z through the generator, but generator weights do not move); J_gen updates the
generator only; J_ce the classifier only. Running means J_avg (of e^(−β/J_gen)·J_m, as main_npair.py feeds the
already-weighted J_m back) and J_gen are model variables, read before and updated after the step.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, NamedTuple, Optional

import keras
import tensorflow as tf

from hdml_tf import distribute, hardness
from hdml_tf.config import HDMLConfig, OptimConfig
from hdml_tf.generator import classifier, generator, metric_head
from hdml_tf.losses import label_preserving_softmax, mean_cross_entropy, reconstruction_loss
from hdml_tf.running_mean import WindowedMean

#: Quantities logged each step (means over the epoch in Keras' logs; each step's own values in `last_step_logs`).
#: Beyond the losses: "j_m_unweighted" is J_m before the factor e^(−β/J_gen) (what the baseline's "j_m" is);
#: "grad_real_norm" and "grad_syn_norm" are the norms of the gradients that e^(−β/J_gen)·J_m and J_syn send into the
#: backbone (at its output features y, the whole batch: ‖∂L/∂y‖ over [B, D]).
HDML_LOG_KEYS = ("loss", "j_m", "j_syn", "j_gen", "j_recon", "j_soft", "j_ce", "weight_decay", "pull_factor",
                 "syn_weight", "pulled_fraction", "j_avg", "j_gen_avg", "skipped_steps", "j_m_unweighted",
                 "grad_real_norm", "grad_syn_norm")
BASELINE_LOG_KEYS = ("loss", "j_m", "weight_decay", "j_avg", "skipped_steps")
#: The losses among them (the rest are diagnostics and running means); each has a non-finite flag.
LOSS_KEYS = ("loss", "j_m", "j_syn", "j_gen", "j_recon", "j_soft", "j_ce", "weight_decay")


@dataclasses.dataclass
class StepResult:
    """What the forward pass of one training step produced (float32 scalars unless said).

    Attributes:
      losses: the logged losses: "loss" (J_metric, what the backbone and head minimize), "j_m" (e^(−β/J_gen)·J_m with
        weight decay; plain J_m for the baseline), "weight_decay", and for HDML "j_syn", "j_gen", "j_recon",
        "j_soft", "j_ce".
      running: this step's inputs to the running means ("j_avg", and "j_gen" for HDML), applied only if the step is.
      diagnostics: logged quantities that are not losses: "pull_factor", "syn_weight", "pulled_fraction",
        "j_m_unweighted" (HDML; the training step adds the gradient norms "grad_real_norm", "grad_syn_norm").
      was_pulled: bool, which negatives the augmentation moved (the layout's shape); not logged.
      features: this replica's backbone features y [B, D] float32, before the global batch is gathered (the
        tensor whose gradient reaches the backbone); not logged.
    """

    losses: Dict[str, tf.Tensor]
    running: Dict[str, tf.Tensor]
    diagnostics: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)
    was_pulled: Optional[tf.Tensor] = None
    features: Optional[tf.Tensor] = None


class Route(NamedTuple):
    """One optimizer's share of a step: the gradient of `losses[loss]` moves `variables` only."""

    name: str
    loss: str
    optimizer: keras.optimizers.Optimizer
    variables: list


def make_optimizers(optim: OptimConfig = OptimConfig(), hdml: bool = True) -> Dict[str, keras.optimizers.Optimizer]:
    """Three Adam optimizers with the official learning rates and epsilon; the metric one follows the step
    schedule."""
    lr = optim.learning_rate
    if optim.decay_steps:
        values = [lr * optim.decay_factor ** i for i in range(len(optim.decay_steps) + 1)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(list(optim.decay_steps), values)
    eps = optim.adam_epsilon
    optimizers = {"metric_optimizer": keras.optimizers.Adam(lr, epsilon=eps, name="metric_adam")}
    if hdml:
        optimizers["generator_optimizer"] = keras.optimizers.Adam(optim.generator_learning_rate, epsilon=eps,
                                                                  name="generator_adam")
        optimizers["classifier_optimizer"] = keras.optimizers.Adam(optim.classifier_learning_rate, epsilon=eps,
                                                                   name="classifier_adam")
    return optimizers


def capped_branches(z: tf.Tensor, cap: float):
    """Two copies of z [B, E] whose gradients are summed on the way back, the second one's norm capped.

    The backward pass returns g_real + min(1, cap·‖g_real‖ / ‖g_syn‖)·g_syn, where g_real and g_syn are the gradients
    arriving at the first and second copy (norms over the whole batch). Used by `--syn_gradient=capped`: the
    synthetic branch never sends more than `cap` times the real J_m's gradient into the embeddings.
    """
    @tf.custom_gradient
    def branches(x):
        def grad(g_real, g_syn):
            limit = cap * tf.norm(g_real)
            scale = tf.minimum(1.0, limit / tf.maximum(tf.norm(g_syn), 1e-30))
            return g_real + scale * g_syn
        return (tf.identity(x), tf.identity(x)), grad
    return branches(tf.convert_to_tensor(z, tf.float32))


def weight_decay_variables(*models) -> List[keras.Variable]:
    """Kernels and biases of every non-BatchNorm layer (official `exclude_batch_norm`: no BN, no generator)."""
    chosen, seen = [], set()
    for model in models:
        for layer in distribute.layers_recursive(model):
            if isinstance(layer, keras.layers.BatchNormalization) or getattr(layer, "layers", None):
                continue
            for v in layer.trainable_weights:
                if id(v) not in seen:
                    seen.add(id(v))
                    chosen.append(v)
    return chosen


@keras.saving.register_keras_serializable(package="hdml_tf")
class HDMLModel(keras.Model):
    """Backbone + metric head, trained with HDML (or the plain baseline when `config.hdml` is False).

    Args:
      backbone: keras.Model, images [B, S, S, 3] RGB 0..255 → features [B, D] (normalization inside).
      num_classes: number of training classes (for the label-preserving softmax classifier).
      config: HDMLConfig.

    Calling the model returns L2-normalized embeddings [B, E] (float32), so `predict` gives what retrieval needs.
    """

    def __init__(self, backbone: keras.Model, num_classes: int, config: HDMLConfig = HDMLConfig(), **kwargs):
        super().__init__(**kwargs)
        if isinstance(config, dict):
            config = HDMLConfig(**config)
        self.config = config
        self.num_classes = int(num_classes)
        self.backbone = backbone
        feature_dim = int(backbone.output_shape[-1])
        self.feature_dim = feature_dim
        self.generator_net = None
        self.classifier_net = None
        # Mixed precision: only the backbone computes in float16/bfloat16. The head, generator and classifier are
        # tiny and stay float32: embeddings keep full precision for the distances, and the gradients of J_soft
        # (×1e4) and J_recon (a sum) at the generator's and classifier's outputs would overflow float16.
        with distribute.float32_layers():
            self.metric_head = metric_head(config.embedding_size, feature_dim)
            if config.hdml:
                self.generator_net = generator(config.embedding_size, feature_dim, config.generator_hidden)
                self.classifier_net = classifier(self.num_classes, feature_dim)
        if tf.distribute.has_strategy():
            # Built under a strategy's scope: backbone and head see per-replica rows, their BatchNorm statistics
            # must be the global batch's (the generator only sees the gathered global batch).
            distribute.synchronize_batch_norm(self.backbone, self.metric_head)
        self.layout = config.layout()
        self.j_avg = WindowedMean(config.window, config.running_init, name="j_avg")
        self.j_gen_avg = WindowedMean(config.window, config.running_init, name="j_gen_avg")
        self.skipped = self.add_weight(shape=(), initializer="zeros", dtype="float32", trainable=False,
                                       name="skipped_steps")
        keys = HDML_LOG_KEYS if config.hdml else BASELINE_LOG_KEYS
        self._trackers = {k: keras.metrics.Mean(name=k) for k in keys}
        # Each step's own values (not the epoch means) for per-step logs (hdml_tf.diagnostics.StepLog), in tracker
        # order; NaN stays NaN here. Not model state: a plain tf.Variable, not in weights or checkpoints.
        self.last_step = tf.Variable(tf.zeros([len(keys)]), trainable=False, name="last_step",
                                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # Diagnostics of the last step for the NaN guard (hdml_tf.callbacks.NonFiniteGuard): 1.0 where a loss or a
        # route's gradient was NaN/Inf. A plain tf.Variable: not model state, so not in weights or checkpoints.
        self.nonfinite_names = self._nonfinite_names()
        self.nonfinite = tf.Variable(tf.zeros([len(self.nonfinite_names)]), trainable=False, name="nonfinite",
                                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._decay_vars = weight_decay_variables(self.backbone, self.metric_head)
        self.generator_optimizer = None
        self.classifier_optimizer = None

    # ----------------------------------------------------------------------------------------------- inference
    def call(self, images, training=False):
        y = self.backbone(images, training=training)
        z = tf.cast(self.metric_head(y, training=training), tf.float32)
        return tf.math.l2_normalize(z, axis=-1)

    def embedder(self, name: str = "embedder") -> keras.Model:
        """A plain functional model images → L2-normalized embeddings sharing this model's weights (for export)."""
        inputs = keras.Input(self.backbone.input_shape[1:], name="images")
        z = self.metric_head(self.backbone(inputs, training=False), training=False)
        outputs = keras.layers.UnitNormalization(axis=-1, dtype="float32", name="l2_normalize")(
            keras.layers.Activation("linear", dtype="float32", name="to_float32")(z))
        return keras.Model(inputs, outputs, name=name)

    # ----------------------------------------------------------------------------------------------- training
    def compile(self, metric_optimizer=None, generator_optimizer=None, classifier_optimizer=None, **kwargs):
        """Takes the three optimizers by name (defaults: `make_optimizers()`, the official learning rates)."""
        defaults = make_optimizers(hdml=self.config.hdml)
        metric_optimizer = metric_optimizer or kwargs.pop("optimizer", None) or defaults["metric_optimizer"]
        super().compile(optimizer=metric_optimizer, **kwargs)
        self.optimizer.build(self.metric_variables)
        if self.config.hdml:
            self.generator_optimizer = generator_optimizer or defaults["generator_optimizer"]
            self.classifier_optimizer = classifier_optimizer or defaults["classifier_optimizer"]
            self.generator_optimizer.build(self.generator_net.trainable_variables)
            self.classifier_optimizer.build(self.classifier_net.trainable_variables)

    @property
    def metric_variables(self) -> List[keras.Variable]:
        """Variables J_metric updates: backbone and metric head."""
        return list(self.backbone.trainable_variables) + list(self.metric_head.trainable_variables)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def _state_variables(self) -> List[keras.Variable]:
        """Non-trainable state a forward pass changes (BatchNorm moving statistics)."""
        nets = [self.backbone, self.metric_head] + ([self.generator_net] if self.config.hdml else [])
        return [v for net in nets for v in net.non_trainable_variables]

    def _global_batch(self, features, embeddings, labels):
        """The global batch the losses must see: the replicas' slices all-gathered in replica order (identity on one
        device). See `hdml_tf.distribute.gather_global_batch`."""
        return tuple(distribute.gather_global_batch((features, embeddings, labels)))

    def forward_step(self, images, labels, training: bool = True) -> StepResult:
        """One forward pass of the training step: every loss, the running means' inputs and the diagnostics.

        Args:
          images: float [B, S, S, 3] in the batch layout of `config.loss` (per replica under a strategy).
          labels: int [B].
        Returns:
          StepResult; the losses are computed on the global batch under a strategy.
        """
        cfg, layout = self.config, self.layout
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        y = tf.cast(self.backbone(images, training=training), tf.float32)
        z = tf.cast(self.metric_head(y, training=training), tf.float32)
        y_local = y
        y, z, labels = self._global_batch(y, z, labels)
        weight_decay = cfg.weight_decay * tf.add_n(
            [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in self._decay_vars]) if self._decay_vars else 0.0
        weight_decay = tf.convert_to_tensor(weight_decay, tf.float32)
        if not cfg.hdml:
            j_m = layout.metric_loss(z, labels) + weight_decay  # official: J_m = Loss(...) + wdLoss
            return StepResult(losses={"loss": j_m, "j_m": j_m, "weight_decay": weight_decay}, running={"j_avg": j_m})

        z, z_source = self._synthetic_source(z)  # the same z twice; the second one's gradient may be capped
        j_m = layout.metric_loss(z, labels) + weight_decay  # official: J_m = Loss(...) + wdLoss
        factor = self.pull_factor()
        z_hat, was_pulled = layout.synthesize(z_source, factor)
        batch = tf.shape(z)[0]
        y_gen = tf.cast(self.generator_net(tf.concat([z_source, z_hat], axis=0), training=training), tf.float32)
        y_rec, y_syn = y_gen[:batch], y_gen[batch:]
        z_syn = tf.cast(self.metric_head(y_syn, training=training), tf.float32)

        real_weight = tf.exp(-cfg.beta / self.j_gen_avg.value)  # e^(−β/J_gen), eq. 15
        j_m_weighted = real_weight * j_m
        j_syn = (1.0 - real_weight) * layout.synthetic_loss(z_syn, labels)
        j_ce = mean_cross_entropy(labels, self.classifier_net(y, training=training))
        j_recon = reconstruction_loss(y_rec, y, cfg.gen_lambda)
        j_soft = label_preserving_softmax(
            layout.softmax_loss(self.classifier_net(y_syn, training=training), layout.synthetic_labels(labels)),
            cfg.softmax_factor, cfg.gen_lambda)
        j_gen = j_recon + j_soft
        return StepResult(
            losses={"loss": j_m_weighted + j_syn, "j_m": j_m_weighted, "j_syn": j_syn, "j_gen": j_gen,
                    "j_recon": j_recon, "j_soft": j_soft, "j_ce": j_ce, "weight_decay": weight_decay},
            # J_avg averages the already weighted J_m: main_npair.py feeds that value back.
            running={"j_avg": j_m_weighted, "j_gen": j_gen},
            diagnostics={"pull_factor": factor, "syn_weight": 1.0 - real_weight,
                         "pulled_fraction": layout.pulled_fraction(was_pulled), "j_m_unweighted": j_m},
            was_pulled=was_pulled, features=y_local)

    def _synthetic_source(self, z: tf.Tensor):
        """(z for the real losses, z the synthetic branch starts from): the same values; with
        `config.syn_gradient` other than "full", the synthetic branch's gradient into z is capped or stopped."""
        mode = self.config.syn_gradient
        if mode == "full":
            return z, z
        if mode == "none":
            return z, tf.stop_gradient(z)
        return capped_branches(z, self.config.syn_gradient_cap)

    def pull_factor(self) -> tf.Tensor:
        """The pull factor of this step's augmentation (float32 scalar), as `config.pull` says: the paper's
        e^(−α/J_avg) (eq. 8, "adaptive"), the constant `config.fixed_pull` ("fixed"), or 1 ("none": ẑ = z, the
        generator only reconstructs the real negatives)."""
        if self.config.pull == "none":
            return tf.constant(1.0, tf.float32)
        if self.config.pull == "fixed":
            return tf.constant(self.config.fixed_pull, tf.float32)
        return hardness.pull_factor(self.j_avg.value, self.config.alpha)

    def _route_specs(self):
        """(gradient name, loss key, optimizer attribute, network or None for backbone + head) of each route: the
        official three `minimize(var_list=...)` calls."""
        specs = [("grad(J_metric)", "loss", "optimizer", None)]
        if self.config.hdml:
            specs += [("grad(J_gen)", "j_gen", "generator_optimizer", self.generator_net),
                      ("grad(J_ce)", "j_ce", "classifier_optimizer", self.classifier_net)]
        return specs

    def _routes(self) -> List[Route]:
        """Which loss may change which weights, with which optimizer."""
        return [Route(name, loss, getattr(self, optimizer),
                      self.metric_variables if net is None else net.trainable_variables)
                for name, loss, optimizer, net in self._route_specs()]

    def _forward_and_gradients(self, images, labels, loss_factor: float = 1.0):
        """The prelude both step bodies share: BatchNorm snapshot, forward pass, each route's gradients, the
        non-finite flags.

        Args:
          loss_factor: every route differentiates loss · loss_factor (1/R under a strategy of R replicas, whose
            optimizers SUM the replicas' gradients; see `distribute.loss_scale_for_replicas`).
        Returns:
          (step, routes, grads {route name: [gradient per variable]}, flags {name: bool scalar}, BatchNorm snapshot).
        """
        state = [tf.identity(v) for v in self._state_variables()] if self.config.skip_nonfinite else []
        with tf.GradientTape(persistent=True) as tape:
            step = self.forward_step(images, labels, training=True)
            routes = self._routes()
            scaled = {r.name: r.optimizer.scale_loss(step.losses[r.loss] * loss_factor) for r in routes}
        grads = {r.name: tape.gradient(scaled[r.name], r.variables) for r in routes}
        if self.config.hdml:
            # What each part of J_metric sends into the backbone: two small backward passes (head and generator
            # only, the backbone's own backward pass is shared), for the per-step diagnostics.
            # The synthetic part is what J_metric sends beyond the real part (with --syn_gradient=capped the
            # capped gradient; otherwise ∂J_syn/∂y).
            g_real = tape.gradient(step.losses["j_m"], step.features)
            g_all = tape.gradient(step.losses["loss"], step.features)
            g_real = tf.zeros_like(step.features) if g_real is None else g_real
            g_syn = tf.zeros_like(step.features) if g_all is None else g_all - g_real
            # Under a strategy of R replicas each replica holds its slice's rows of the gradient, R times over: every
            # replica computed the same global loss and the gather's gradient sums them (hence · loss_factor = 1/R).
            # ‖·‖ over the global batch is the square root of the replicas' summed squares (the same everywhere).
            for key, g in (("grad_real_norm", g_real), ("grad_syn_norm", g_syn)):
                squares = tf.reduce_sum(tf.square(g * loss_factor))
                step.diagnostics[key] = tf.sqrt(distribute.sum_over_replicas(squares))
        del tape
        return step, routes, grads, self._nonfinite_flags(step, grads), state

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if distribute.in_replica_of_strategy():
            return self._distributed_train_step(images, labels)
        step, routes, grads, flags, state = self._forward_and_gradients(images, labels)
        if self.config.skip_nonfinite:
            tf.cond(self._skip_decision(flags, routes), lambda: self._restore_state(state),
                    lambda: self._apply_updates(grads, routes, step.running))
        else:
            self._apply_updates(grads, routes, step.running)
        return self._log(step)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Under a strategy, Keras 3 pulls one batch and `strategy.reduce`s it to build the model symbolically;
        that reduce fails under MultiWorkerMirroredStrategy (keras-team/keras#20585). The input signature is
        known (images [B, S, S, 3] float32, labels [B] int32), so build from it instead of from a batch.
        tests/test_model.py checks that Keras still has this private hook with this signature."""
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            images = tf.TensorSpec((None,) + tuple(self.backbone.input_shape[1:]), tf.float32)
            iterator, data_batch = None, (images, tf.TensorSpec((None,), tf.int32))
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _distributed_train_step(self, images, labels):
        """`train_step` inside `strategy.run` (Mirrored / MultiWorkerMirrored).

        Same prelude, losses (on the gathered global batch), routing and skip rule as on one device, with two
        changes: each replica differentiates loss / R (the optimizer SUMS the replicas' gradients), and the
        update-or-skip decision is taken once for all replicas in cross-replica context: a `tf.cond` around
        `optimizer.apply` cannot run in replica context (the gradient all-reduce is a `merge_call`), so the
        non-finite flags are all-reduced (one small vector), then `merge_call` → `tf.cond` →
        `call_for_each_replica(apply or restore)`. Keras' LossScaleOptimizer does the same internally.
        """
        step, routes, grads, flags, state = self._forward_and_gradients(
            images, labels, distribute.loss_scale_for_replicas())
        # Flags of ANY replica: a non-finite loss or gradient anywhere skips the step everywhere.
        any_flags = distribute.any_replica(tf.stack([flags[n] for n in self.nonfinite_names]))
        flags = dict(zip(self.nonfinite_names, tf.unstack(any_flags)))
        for r in routes:
            if isinstance(r.optimizer, keras.optimizers.LossScaleOptimizer):
                # The loss-scale optimizer judges the first replica's LOCAL gradients only: show it a NaN there
                # when any replica overflowed, so it lowers the scale and skips instead of applying an Inf.
                grads[r.name] = [g if g is None else tf.where(flags[r.name], tf.constant(float("nan"), g.dtype), g)
                                 for g in grads[r.name]]
        skip = self._skip_decision(flags, routes)
        running = step.running

        def apply(grads, running):  # replica context
            self._apply_updates(grads, routes, running)

        def restore(state):  # replica context
            self._restore_state(state)

        def decide(strategy, skip, grads, running, state):  # cross-replica context
            skip = strategy.experimental_local_results(skip)[0]  # the same on every replica

            def do_apply():
                strategy.extended.call_for_each_replica(apply, args=(grads, running))
                return tf.constant(0.0)

            def do_skip():
                strategy.extended.call_for_each_replica(restore, args=(state,))
                return tf.constant(1.0)
            return tf.cond(skip, do_skip, do_apply)

        tf.distribute.get_replica_context().merge_call(decide, args=(skip, grads, running, state))
        return distribute.reducible_logs(self._log(step))

    def _nonfinite_names(self):
        """Names of the non-finite flags: every logged loss of `forward_step`, then each route's gradient."""
        return tuple([k for k in self._trackers if k in LOSS_KEYS] + [spec[0] for spec in self._route_specs()])

    def _nonfinite_flags(self, step: StepResult, grads) -> Dict[str, tf.Tensor]:
        """{name: bool scalar}: which losses and which routes' gradients of this step are NaN or Inf.

        Also recorded in `self.nonfinite` (in `nonfinite_names` order) for the NaN guard's log line (this replica's
        flags)."""
        def bad(tensors):
            return tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors
                                                 if t is not None] or [tf.constant(True)]))
        flags = {name: bad([step.losses[name]]) for name in self.nonfinite_names if name in step.losses}
        flags.update({name: bad(g) for name, g in grads.items()})
        self.nonfinite.assign(tf.cast(tf.stack([flags[n] for n in self.nonfinite_names]), tf.float32))
        return flags

    def nonfinite_report(self) -> List[str]:
        """Names of the losses / gradient routes that were NaN or Inf in the last step (eager; for callbacks)."""
        values = keras.ops.convert_to_numpy(self.nonfinite)
        return [name for name, bad in zip(self.nonfinite_names, values) if bad > 0]

    def _skip_decision(self, flags: Dict[str, tf.Tensor], routes: List[Route]) -> tf.Tensor:
        """True when the step must not be applied: a non-finite loss, or a non-finite gradient of a route whose
        optimizer does not scale losses (a LossScaleOptimizer lowers its scale and skips by itself)."""
        if not self.config.skip_nonfinite:
            return tf.constant(False)
        route_names = {r.name for r in routes}
        skip = tf.reduce_any(tf.stack([f for name, f in flags.items() if name not in route_names]))
        for r in routes:
            if not isinstance(r.optimizer, keras.optimizers.LossScaleOptimizer):
                skip = tf.logical_or(skip, flags[r.name])
        return skip

    def _apply_updates(self, grads, routes: List[Route], running: Dict[str, tf.Tensor]):
        """Applies each route's gradients with its optimizer and advances the running means."""
        for r in routes:
            r.optimizer.apply(grads[r.name], r.variables)
        self.j_avg.update(running["j_avg"])
        if self.config.hdml:
            self.j_gen_avg.update(running["j_gen"])
        return tf.constant(0.0)

    def _restore_state(self, state):
        """Undoes the forward pass's BatchNorm statistics updates of a skipped step and counts it."""
        for v, saved in zip(self._state_variables(), state):
            v.assign(saved)
        self.skipped.assign_add(1.0)
        return tf.constant(1.0)

    def _log(self, step: StepResult):
        """Updates the per-epoch means; a non-finite value (of a skipped step) is logged as 0."""
        values = {**step.losses, **step.diagnostics, "j_avg": self.j_avg.value, "skipped_steps": self.skipped}
        if self.config.hdml:
            values["j_gen_avg"] = self.j_gen_avg.value
        values = {key: tf.cast(values[key], tf.float32) for key in self._trackers}
        self.last_step.assign(tf.stack(list(values.values())))
        for key, tracker in self._trackers.items():
            tracker.update_state(tf.where(tf.math.is_finite(values[key]), values[key], 0.0))
        return {key: tracker.result() for key, tracker in self._trackers.items()}

    def last_step_logs(self) -> Dict[str, float]:
        """The last training step's own value of every logged key (eager; NaN where the step's value was NaN)."""
        return dict(zip(self._trackers, (float(v) for v in self.last_step.read_value().numpy())))

    def test_step(self, data):
        """J_m (with weight decay, without HDML) on a batch in the tuple layout; no update."""
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        z = tf.cast(self.metric_head(self.backbone(images, training=False), training=False), tf.float32)
        z, labels = distribute.gather_global_batch((z, labels))  # J_m of the global batch under a strategy
        j_m = self.layout.metric_loss(z, labels)
        self._trackers["loss"].update_state(j_m)
        self._trackers["j_m"].update_state(j_m)
        return distribute.reducible_logs({"loss": self._trackers["loss"].result(),
                                          "j_m": self._trackers["j_m"].result()})

    # ----------------------------------------------------------------------------------------------- saving
    def get_config(self):
        return {"backbone": keras.saving.serialize_keras_object(self.backbone),
                "num_classes": self.num_classes, "config": dataclasses.asdict(self.config),
                "name": self.name}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"), custom_objects=custom_objects)
        hdml_config = HDMLConfig(**config.pop("config"))
        return cls(backbone=backbone, config=hdml_config, **config)

    def get_compile_config(self):
        """The three optimizers by name, so `keras.models.load_model` recompiles as `compile` was called."""
        if not self.compiled:
            return None
        optimizers = {"metric_optimizer": self.optimizer, "generator_optimizer": self.generator_optimizer,
                      "classifier_optimizer": self.classifier_optimizer}
        return {name: keras.saving.serialize_keras_object(opt) for name, opt in optimizers.items()
                if opt is not None}

    def compile_from_config(self, config):
        """Inverse of `get_compile_config`; Keras then loads the optimizers' variables from the file."""
        self.compile(**{name: keras.saving.deserialize_keras_object(c) for name, c in config.items()})
