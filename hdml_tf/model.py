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
from typing import Dict, List

import keras
import tensorflow as tf

from hdml_tf import distribute, hardness
from hdml_tf.config import HDMLConfig, OptimConfig
from hdml_tf.generator import classifier, generator, metric_head
from hdml_tf.losses import (contrastive_loss, label_preserving_softmax, metric_loss, npair_loss,
                            reconstruction_loss, split_tuples, triplet_loss)
from hdml_tf.running_mean import WindowedMean

#: Quantities logged each step (means over the epoch in Keras' logs).
HDML_LOG_KEYS = ("loss", "j_m", "j_syn", "j_gen", "j_recon", "j_soft", "j_ce", "weight_decay", "pull_factor",
                 "syn_weight", "pulled_fraction", "j_avg", "j_gen_avg", "skipped_steps")
BASELINE_LOG_KEYS = ("loss", "j_m", "weight_decay", "j_avg", "skipped_steps")


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
        self.j_avg = WindowedMean(config.window, config.running_init, name="j_avg")
        self.j_gen_avg = WindowedMean(config.window, config.running_init, name="j_gen_avg")
        self.skipped = self.add_weight(shape=(), initializer="zeros", dtype="float32", trainable=False,
                                       name="skipped_steps")
        # Diagnostics of the last step for the NaN guard (hdml_tf.callbacks.NonFiniteGuard): 1.0 where a loss or a
        # route's gradient was NaN/Inf. A plain tf.Variable: not model state, so not in weights or checkpoints.
        self.nonfinite_names = self._nonfinite_names()
        self.nonfinite = tf.Variable(tf.zeros([len(self.nonfinite_names)]), trainable=False, name="nonfinite",
                                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        keys = HDML_LOG_KEYS if config.hdml else BASELINE_LOG_KEYS
        self._trackers = {k: keras.metrics.Mean(name=k) for k in keys}
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

    def compute_losses(self, images, labels, training: bool = True) -> Dict[str, tf.Tensor]:
        """All losses of one step as float32 scalars (keys as in HDML_LOG_KEYS, plus `was_pulled`)."""
        cfg = self.config
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        y = tf.cast(self.backbone(images, training=training), tf.float32)
        z = tf.cast(self.metric_head(y, training=training), tf.float32)
        y, z, labels = self._global_batch(y, z, labels)
        weight_decay = cfg.weight_decay * tf.add_n(
            [tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in self._decay_vars]) if self._decay_vars else 0.0
        j_m = metric_loss(z, labels, cfg.loss, npair_l2=cfg.npair_l2, triplet_margin=cfg.triplet_margin,
                          contrastive_margin=cfg.contrastive_margin) + weight_decay
        out = {"weight_decay": tf.convert_to_tensor(weight_decay, tf.float32)}
        if not cfg.hdml:
            out.update(loss=j_m, j_m=j_m, j_avg_input=j_m)
            return out

        z_hat, was_pulled = hardness.augment(z, cfg.loss, self.j_avg.value, cfg.alpha)
        batch = tf.shape(z)[0]
        y_gen = tf.cast(self.generator_net(tf.concat([z, z_hat], axis=0), training=training), tf.float32)
        y_rec, y_syn = y_gen[:batch], y_gen[batch:]
        z_syn = tf.cast(self.metric_head(y_syn, training=training), tf.float32)
        j_syn_core = self._synthetic_metric_loss(z_syn, labels)

        real_weight = tf.exp(-cfg.beta / self.j_gen_avg.value)  # e^(−β/J_gen), eq. 15
        j_m_weighted = real_weight * j_m
        j_syn = (1.0 - real_weight) * j_syn_core
        j_metric = j_m_weighted + j_syn

        j_ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=tf.cast(self.classifier_net(y, training=training), tf.float32)))
        j_recon = reconstruction_loss(y_rec, y, cfg.gen_lambda)
        syn_logits = self.classifier_net(y_syn, training=training)
        j_soft = label_preserving_softmax(syn_logits, hardness.synthetic_labels(labels, cfg.loss), cfg.loss,
                                          cfg.softmax_factor, cfg.gen_lambda)
        j_gen = j_recon + j_soft

        pulled = tf.cast(was_pulled, tf.float32)
        if cfg.loss == "npair":
            # The diagonal (anchor i against its own positive) is not a negative.
            n = tf.cast(tf.shape(was_pulled)[0], tf.float32)
            pulled_fraction = tf.reduce_sum(pulled) / tf.maximum(n * (n - 1.0), 1.0)
        else:
            pulled_fraction = tf.reduce_mean(pulled)
        out.update(loss=j_metric, j_m=j_m_weighted, j_syn=j_syn, j_gen=j_gen, j_recon=j_recon, j_soft=j_soft,
                   j_ce=j_ce, pull_factor=hardness.pull_factor(self.j_avg.value, cfg.alpha),
                   syn_weight=1.0 - real_weight, pulled_fraction=pulled_fraction, j_avg_input=j_m_weighted,
                   was_pulled=was_pulled)
        return out

    def _synthetic_metric_loss(self, z_syn, labels):
        """J_m on the synthetic tuples z̃ (laid out as `hardness.augment` returns them), without weight decay."""
        cfg = self.config
        if cfg.loss == "npair":
            anchor_labels, positive_labels = split_tuples(labels, "npair")
            n = tf.shape(anchor_labels)[0]
            anchors = z_syn[:n]
            candidates = tf.reshape(z_syn[n:], [n, n, tf.shape(z_syn)[1]])
            return npair_loss(anchors, candidates, anchor_labels, positive_labels, cfg.npair_l2)
        if cfg.loss == "triplet":
            return triplet_loss(*split_tuples(z_syn, "triplet"), margin=cfg.triplet_margin)
        return contrastive_loss(*split_tuples(z_syn, "contrastive"), margin=cfg.contrastive_margin)

    def _routes(self, out):
        """(loss, optimizer, variables) triples: which loss may change which weights."""
        routes = [(out["loss"], self.optimizer, self.metric_variables)]
        if self.config.hdml:
            routes.append((out["j_gen"], self.generator_optimizer, self.generator_net.trainable_variables))
            routes.append((out["j_ce"], self.classifier_optimizer, self.classifier_net.trainable_variables))
        return routes

    def train_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if distribute.in_replica_of_strategy():
            return self._distributed_train_step(images, labels)
        state = [tf.identity(v) for v in self._state_variables()] if self.config.skip_nonfinite else []
        with tf.GradientTape(persistent=True) as tape:
            out = self.compute_losses(images, labels, training=True)
            routes = self._routes(out)
            scaled = [opt.scale_loss(loss) for loss, opt, _ in routes]
        grads = [tape.gradient(s, variables) for s, (_, _, variables) in zip(scaled, routes)]
        del tape
        skip = self._skip_decision(self._nonfinite_flags(out, grads), routes)
        optimizers_and_variables = [(opt, variables) for _, opt, variables in routes]
        running = self._running_inputs(out)
        if self.config.skip_nonfinite:
            tf.cond(skip, lambda: self._restore_state(state),
                    lambda: self._apply_updates(grads, optimizers_and_variables, running))
        else:
            self._apply_updates(grads, optimizers_and_variables, running)
        return self._log(out)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Under a strategy, Keras 3 pulls one batch and `strategy.reduce`s it to build the model symbolically;
        that reduce fails under MultiWorkerMirroredStrategy (keras-team/keras#20585). The input signature is
        known (images [B, S, S, 3] float32, labels [B] int32), so build from it instead of from a batch."""
        if iterator is not None and getattr(self, "_distribute_strategy", None) is not None:
            images = tf.TensorSpec((None,) + tuple(self.backbone.input_shape[1:]), tf.float32)
            iterator, data_batch = None, (images, tf.TensorSpec((None,), tf.int32))
        return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _distributed_train_step(self, images, labels):
        """`train_step` inside `strategy.run` (Mirrored / MultiWorkerMirrored).

        Same losses (on the gathered global batch), routing and skip rule as on one device, with two changes:
        each replica differentiates loss / R (the optimizer SUMS the replicas' gradients, see
        `distribute.loss_scale_for_replicas`), and the update-or-skip decision is taken once for all replicas in
        cross-replica context: a `tf.cond` around `optimizer.apply` cannot run in replica context (the gradient
        all-reduce is a `merge_call`), so the non-finite flags are all-reduced (one small vector), then
        `merge_call` → `tf.cond` → `call_for_each_replica(apply or restore)`. Keras' LossScaleOptimizer does
        the same internally.
        """
        inverse_replicas = distribute.loss_scale_for_replicas()
        state = [tf.identity(v) for v in self._state_variables()] if self.config.skip_nonfinite else []
        with tf.GradientTape(persistent=True) as tape:
            out = self.compute_losses(images, labels, training=True)
            routes = self._routes(out)
            scaled = [opt.scale_loss(loss * inverse_replicas) for loss, opt, _ in routes]
        grads = [tape.gradient(s, variables) for s, (_, _, variables) in zip(scaled, routes)]
        del tape
        # Flags of ANY replica: a non-finite loss or gradient anywhere skips the step everywhere.
        bad = distribute.any_replica(self._nonfinite_flags(out, grads))
        n_losses = len(self.nonfinite_names) - len(grads)
        for i, (_, opt, _) in enumerate(routes):
            if isinstance(opt, keras.optimizers.LossScaleOptimizer):
                # The loss-scale optimizer judges the first replica's LOCAL gradients only: show it a NaN there
                # when any replica overflowed, so it lowers the scale and skips instead of applying an Inf.
                grads[i] = [g if g is None else tf.where(bad[n_losses + i], tf.constant(float("nan"), g.dtype), g)
                            for g in grads[i]]
        skip = self._skip_decision(bad, routes)
        running = self._running_inputs(out)
        optimizers_and_variables = [(opt, variables) for _, opt, variables in routes]

        def apply(grads, running):  # replica context
            self._apply_updates(grads, optimizers_and_variables, running)

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
        return distribute.reducible_logs(self._log(out))

    def _nonfinite_names(self):
        """Names of the `nonfinite` flags: the losses of `compute_losses`, then the gradient of each route."""
        losses = [k for k in (HDML_LOG_KEYS if self.config.hdml else BASELINE_LOG_KEYS)
                  if k not in ("j_avg", "j_gen_avg", "skipped_steps")]
        routes = ["grad(J_metric)", "grad(J_gen)", "grad(J_ce)"] if self.config.hdml else ["grad(J_metric)"]
        return tuple(losses + routes)

    def _nonfinite_flags(self, out, grads) -> tf.Tensor:
        """bool [len(nonfinite_names)]: which losses and which routes' gradients of this step are NaN or Inf.

        Also recorded in `self.nonfinite` for the NaN guard's log line (this replica's flags)."""
        def bad(tensors):
            return tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors
                                                 if t is not None] or [tf.constant(True)]))
        n_losses = len(self.nonfinite_names) - len(grads)
        flags = tf.stack([bad([out[k]]) for k in self.nonfinite_names[:n_losses]] + [bad(g) for g in grads])
        self.nonfinite.assign(tf.cast(flags, tf.float32))
        return flags

    def _skip_decision(self, flags, routes) -> tf.Tensor:
        """True when the step must not be applied: a non-finite loss, or a non-finite gradient of a route whose
        optimizer does not scale losses (a LossScaleOptimizer lowers its scale and skips by itself)."""
        if not self.config.skip_nonfinite:
            return tf.constant(False)
        n_losses = len(self.nonfinite_names) - len(routes)
        skip = tf.reduce_any(flags[:n_losses])
        for i, (_, opt, _) in enumerate(routes):
            if not isinstance(opt, keras.optimizers.LossScaleOptimizer):
                skip = tf.logical_or(skip, flags[n_losses + i])
        return skip

    def _running_inputs(self, out):
        """This step's contributions to the running means (read by the next steps)."""
        running = {"j_avg": out["j_avg_input"]}
        if self.config.hdml:
            running["j_gen"] = out["j_gen"]
        return running

    def _apply_updates(self, grads, optimizers_and_variables, running):
        """Applies each route's gradients with its optimizer and advances the running means."""
        for g, (opt, variables) in zip(grads, optimizers_and_variables):
            opt.apply(g, variables)
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

    def _log(self, out):
        for key, tracker in self._trackers.items():
            if key == "j_avg":
                tracker.update_state(self.j_avg.value)
            elif key == "j_gen_avg":
                tracker.update_state(self.j_gen_avg.value)
            elif key == "skipped_steps":
                tracker.update_state(self.skipped)
            elif key in out:
                tracker.update_state(tf.where(tf.math.is_finite(out[key]), out[key], 0.0))
        return {key: tracker.result() for key, tracker in self._trackers.items()}

    def test_step(self, data):
        """J_m (with weight decay, without HDML) on a batch in the tuple layout; no update."""
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        z = tf.cast(self.metric_head(self.backbone(images, training=False), training=False), tf.float32)
        z, labels = distribute.gather_global_batch((z, labels))  # J_m of the global batch under a strategy
        j_m = metric_loss(z, labels, self.config.loss, npair_l2=self.config.npair_l2,
                          triplet_margin=self.config.triplet_margin,
                          contrastive_margin=self.config.contrastive_margin)
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
