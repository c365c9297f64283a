"""Training on several devices and machines with `tf.distribute`, keeping HDML's global-batch semantics.

HDML's losses and its hardness-aware synthesis are in-batch: every anchor's negatives are the other tuples of the
batch. Plain data parallelism would silently change the method (each replica would only see its slice), so:

1. **Data.** The input pipeline builds the same GLOBAL batch as on one device (same sampler, same seed), in the
   tuple layout of the loss, and replica r receives its r-th consecutive slice, rows r·B/R .. (r+1)·B/R − 1 --
   what Keras' own split of a batched dataset under MirroredStrategy gives, and what `distribute_dataset` gives
   on one or several machines. A slice need not hold whole tuples.
2. **Losses.** After the backbone and the metric head, `gather_global_batch` all-gathers features, embeddings and
   labels in replica order, which restores the global batch row for row (all anchors, then all positives in the
   same order, ...), so every replica computes the identical global-batch losses, synthesis and running means
   J_avg / J_gen.
3. **Gradients.** Each replica differentiates loss / R (R = replicas in sync). The gradient of `all_gather` sums
   the upstream gradient over replicas and keeps the local slice, and the Keras optimizer SUMS the per-replica
   gradients, so the applied gradient is Σ_r ∂(L/R)/∂θ through every replica's part = ∂L/∂θ, the single-device
   gradient of the global-batch loss (see `loss_scale_for_replicas`).
4. **BatchNorm.** Layers that see per-replica rows (backbone, metric head) are switched to synchronized batch
   statistics (`synchronize_batch_norm`), so the statistics, the output and the moving averages are those of the
   global batch. The generator only ever sees the gathered global batch and needs no synchronization.

Mixed precision (`set_mixed_precision`, `loss_scale_optimizers`) lives here too: it is the other knob users turn
when they scale out.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from hdml_tf import layouts
from hdml_tf.errors import ConfigError

#: Names accepted by `make_strategy` (and the tools' --strategy flag).
STRATEGIES = ("default", "mirrored", "multi_worker")
#: Names accepted by `set_mixed_precision` (and the tools' --mixed_precision flag).
PRECISIONS = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------ strategy
def make_strategy(name: str = "default", devices: Optional[Sequence[str]] = None) -> tf.distribute.Strategy:
    """A `tf.distribute.Strategy` from its name.

    Args:
      name: "default" (one device, TensorFlow's default strategy), "mirrored" (all local GPUs of this machine, or
        `devices`; synchronous, in-graph) or "multi_worker" (MultiWorkerMirroredStrategy: every GPU of every
        machine listed in the TF_CONFIG environment variable, as TensorFlow documents; each machine runs the same
        command with its own `task.index`).
      devices: for "mirrored", the devices to use (default: every GPU, else the CPU).
    Raises:
      ConfigError: an unknown name, or multi_worker without a usable TF_CONFIG.

    Must be called before TensorFlow creates its devices (before any tensor op) for multi_worker.
    """
    if name not in STRATEGIES:
        raise ConfigError(f"strategy={name!r} is unknown; expected one of {', '.join(STRATEGIES)}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=list(devices) if devices else None)
    tf_config = os.environ.get("TF_CONFIG")
    if not tf_config:
        raise ConfigError("strategy=multi_worker needs the TF_CONFIG environment variable (cluster and task, see "
                          "README, Several GPUs and several machines)")
    try:
        spec = json.loads(tf_config)
        workers = spec["cluster"].get("worker", []) + spec["cluster"].get("chief", [])
        _ = (spec["task"]["type"], spec["task"]["index"])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON with 'cluster' and 'task' ({e!r})") from None
    if not workers:
        raise ConfigError("TF_CONFIG lists no 'worker' (or 'chief') in its cluster")
    return tf.distribute.MultiWorkerMirroredStrategy()


_CREATED: Dict[str, tf.distribute.Strategy] = {}


def get_strategy(name: str = "default") -> tf.distribute.Strategy:
    """`make_strategy(name)`, created once per process and reused (TensorFlow allows one
    MultiWorkerMirroredStrategy per process, created before other ops; a run that builds two models -- HDML and
    the baseline -- must share it)."""
    if name == "default":
        return make_strategy(name)
    if name not in _CREATED:
        _CREATED[name] = make_strategy(name)
    return _CREATED[name]


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Machines taking part (1 unless multi-worker)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return max(1, len(spec.get("worker", [])) + len(spec.get("chief", [])))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True on the one process that writes results (always True off multi-worker), as TensorFlow's convention:
    the 'chief' task if there is one, else worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type in (None, "worker") and not has_chief and (task_id or 0) == 0


def check_global_batch(strategy: tf.distribute.Strategy, batch_size: int, loss: str) -> int:
    """Per-replica batch size of a global batch; raises ConfigError unless it splits evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        k = layouts.get(loss).size
        step = math.lcm(k, replicas)
        fits = max(step * (batch_size // step), step * -(-2 * k // step))  # whole tuples, >= 2 of them
        raise ConfigError(f"batch_size={batch_size} does not split evenly over {replicas} replicas "
                          f"(e.g. batch_size={fits})")
    return batch_size // replicas


def describe(strategy: tf.distribute.Strategy, batch_size: int, loss: str) -> str:
    """One line for the start of a run: strategy, replicas, per-replica and global batch sizes."""
    replicas = strategy.num_replicas_in_sync
    per_replica = check_global_batch(strategy, batch_size, loss)
    k = layouts.get(loss).size
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        kind = f"MultiWorkerMirroredStrategy over {num_workers(strategy)} workers"
    elif isinstance(strategy, tf.distribute.MirroredStrategy):
        kind = "MirroredStrategy"
    else:
        kind = "default strategy (one device)"
    return (f"distribution: {kind}, {replicas} replica(s); per-replica batch {per_replica}; global batch "
            f"{batch_size} ({batch_size // k} {loss} tuples, what the losses see)")


# ------------------------------------------------------------------------------------------------ data
def replica_slices(tensor: tf.Tensor, replicas: int, first: int = 0, count: Optional[int] = None) -> tf.Tensor:
    """Global batch [B, ...] → [count, B / replicas, ...]: the consecutive slices of replicas first .. first+count−1.

    `gather_global_batch` (all replicas' slices concatenated in replica order) is its inverse.
    """
    count = replicas if count is None else count
    shape = tf.shape(tensor)
    slices = tf.reshape(tensor, tf.concat([[replicas, -1], shape[1:]], 0))   # [R, B/R, ...]
    return slices[first:first + count]


def distribute_dataset(strategy: tf.distribute.Strategy, make_dataset: Callable[[], tf.data.Dataset]):
    """A dataset of GLOBAL batches (tuple layout) → what `model.fit` takes under `strategy`.

    Every input pipeline (one per worker) builds the same stream of global batches -- the sampler is a pure
    function of (seed, step) -- and keeps its own replicas' consecutive slices (`replica_slices`), so replica r
    receives rows r·B/R .. (r+1)·B/R − 1 and the gathered batch is exactly the single-device global batch. On one
    machine this is what Keras' own split does too (so `model.fit` of the plain dataset under MirroredStrategy is
    also right); across machines Keras' automatic sharding would interleave workers, hence this function. Under
    the default strategy the dataset is returned unchanged.

    Args:
      strategy: the strategy the model was built under.
      make_dataset: () → tf.data.Dataset of (images [B, ...], labels [B]) global batches, B a multiple of the
        replicas (`check_global_batch`).
    """
    if not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)):
        return make_dataset()
    replicas = strategy.num_replicas_in_sync

    def dataset_fn(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def slices(*batch):
            return tuple(replica_slices(t, replicas, first, local) for t in batch)

        ds = make_dataset().map(slices, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Consecutive elements go to this worker's replicas in order (round robin), one per replica and step.
        return ds.unbatch().prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


# ------------------------------------------------------------------------------------------------ in the step
def in_replica_of_strategy() -> bool:
    """True inside `strategy.run` of a real strategy (Mirrored or MultiWorker, even with one replica)."""
    return tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context()


def gather_global_batch(tensors: Sequence[tf.Tensor]) -> List[tf.Tensor]:
    """All-gathers the replicas' consecutive slices [B/R, ...] into the global batch [B, ...] (replica order).

    Identity outside a distributed step. The gradient of `ReplicaContext.all_gather` sums the upstream gradient
    across replicas and returns the local slice, so with every replica minimizing L / R the summed gradients are
    those of L.

    Args:
      tensors: per-replica [B/R, ...] tensors sharing the row order (features, embeddings, labels).
    """
    ctx = tf.distribute.get_replica_context()
    if not in_replica_of_strategy() or ctx.num_replicas_in_sync == 1:
        return list(tensors)
    # One collective for all tensors: rows flattened to float32 columns and concatenated (integer labels travel
    # as float32, exact below 2^24; `all_gather` of a list of differently shaped tensors has no gradient).
    widths = [int(np.prod(t.shape[1:])) for t in tensors]
    rows = tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1, w]) for t, w in zip(tensors, widths)], axis=1)
    gathered = ctx.all_gather(rows, axis=0)                                           # [B, Σw]
    return [tf.cast(tf.reshape(g, [-1] + t.shape[1:].as_list()), t.dtype)
            for t, g in zip(tensors, tf.split(gathered, widths, axis=1))]


def loss_scale_for_replicas() -> float:
    """1 / replicas in sync inside a distributed step, else 1.

    Every replica computes the same global loss L. `optimizer.apply` (Keras 3, TensorFlow backend) all-reduces
    the per-replica gradients with SUM, and the gather's gradient already sums over replicas, so replica r must
    differentiate L / R for the applied gradient to be ∂L/∂θ (Keras' own `scale_loss_for_distribution` is the
    same factor for per-replica mean losses).
    """
    if not in_replica_of_strategy():
        return 1.0
    return 1.0 / tf.distribute.get_replica_context().num_replicas_in_sync


def any_replica(flags: tf.Tensor) -> tf.Tensor:
    """bool [F] per replica → bool [F]: True where the flag is True on at least one replica (one small all-reduce)."""
    ctx = tf.distribute.get_replica_context()
    if not in_replica_of_strategy() or ctx.num_replicas_in_sync == 1:
        return flags
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(flags, tf.float32)) > 0.0


def sum_over_replicas(value: tf.Tensor) -> tf.Tensor:
    """The sum of `value` over the replicas (one all-reduce; `value` itself on one device)."""
    ctx = tf.distribute.get_replica_context()
    if not in_replica_of_strategy() or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def reducible_logs(logs: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
    """A step's logs as Keras can reduce them across workers.

    Keras 3 reduces multi-worker step outputs with `strategy.reduce(MEAN, v, axis=0)`, which rejects scalars; the
    logs are identical on every replica, so [1] vectors reduce to the same scalars. Unchanged elsewhere.
    """
    if not isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return logs
    return {k: tf.reshape(v, [1]) for k, v in logs.items()}


def synchronize_batch_norm(*models) -> int:
    """Switches every BatchNormalization layer (nested models included) to synchronized statistics.

    Keras reads `layer.synchronized` at call time (TensorFlow backend: the batch sums, squared sums and counts
    are all-reduced across replicas), so the flag can be set on built layers without rebuilding them or touching
    the modules that build them. Returns the number of layers switched.
    """
    count = 0
    for model in models:
        for layer in layers_recursive(model):
            if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
                layer.synchronized = True
                count += 1
    return count


def layers_recursive(layer) -> List[keras.layers.Layer]:
    """Every layer inside `layer` (nested models included), depth first."""
    found = []
    for sub in getattr(layer, "layers", []) or []:
        found.append(sub)
        found.extend(layers_recursive(sub))
    return found


# ------------------------------------------------------------------------------------------------ precision
def set_mixed_precision(precision: str = "float32") -> str:
    """Sets Keras' global dtype policy before a model is built; returns the policy's name.

    float16 / bfloat16 give "mixed_float16" / "mixed_bfloat16": variables stay float32, the backbone computes in
    the low precision. HDMLModel builds its metric head, generator and classifier in float32 (`float32_layers`)
    and casts features, embeddings, losses, distances and the hardness-aware augmentation to float32 (J_soft
    carries a 1e4 factor whose float16 gradients would overflow).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"mixed_precision={precision!r} is unknown; expected one of {', '.join(PRECISIONS)}")
    policy = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}[precision]
    keras.mixed_precision.set_global_policy(policy)
    return policy


@contextlib.contextmanager
def float32_layers():
    """Layers built inside compute in float32 whatever the global mixed-precision policy.

    HDMLModel builds its metric head, generator and classifier this way (tiny layers: float32 costs nothing
    measurable). J_soft carries the official 1e4 factor and J_recon is a sum over rows and features: their
    gradients at the generator reach ~1e4, ~4e8 under the initial loss scale 2^15, far beyond float16's
    65504. The head keeps the embeddings, and so every distance, at full precision.
    """
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def loss_scale_optimizers(optimizers: Dict[str, keras.optimizers.Optimizer],
                          precision: str = "float32") -> Dict[str, keras.optimizers.Optimizer]:
    """Wraps every optimizer in a dynamic `keras.optimizers.LossScaleOptimizer` for float16 (else unchanged).

    All three HDML optimizers (metric, generator, classifier) get their own loss scale; `HDMLModel.train_step`
    multiplies each loss by `opt.scale_loss` and the optimizer unscales, skips non-finite steps and adapts.
    """
    if precision != "float16":
        return dict(optimizers)
    return {name: opt if isinstance(opt, keras.optimizers.LossScaleOptimizer)
            else keras.optimizers.LossScaleOptimizer(opt, name=f"{opt.name}_loss_scale")
            for name, opt in optimizers.items()}
