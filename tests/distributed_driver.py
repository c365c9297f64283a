"""Subprocess driver for tests/test_distribute.py (TensorFlow's device set-up must happen before it initializes,
so each distributed check runs in a fresh process).

    python tests/distributed_driver.py mirrored OUT.json REF.npz [--naive]   # 2 logical CPUs
    python tests/distributed_driver.py worker OUT.npz                          # one MultiWorkerMirrored worker

`mirrored` writes a JSON report (single-device vs MirroredStrategy runs) and, in REF.npz, the weights of its
single-device N-pair run, which the multi-worker run repeats (same seed, batches and SGD steps) -- so the test
needs no third TensorFlow process; `worker` (TF_CONFIG set by the caller) writes every model weight after the run.
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from conftest import layout_batch  # noqa: E402

IMAGE = 16
TUPLES = 4  # global tuples per batch
STEPS = 2


def split_cpu(n=2):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
    return [f"/cpu:{i}" for i in range(n)]


def bn_backbone(seed=0):
    """conftest's tiny backbone with a BatchNormalization layer, so backbone statistics are exercised too."""
    import keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((IMAGE, IMAGE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    # No bias before a BatchNorm: its true gradient is 0, and the float noise Adam would amplify is no signal.
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(x)
    x = keras.layers.BatchNormalization(name="conv_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(32, use_bias=False, name="fc")(x)  # the metric head starts with BatchNorm
    return keras.Model(inputs, x, name="bn_backbone")


def batches(loss, steps, seed=0, nan_step=None):
    """`steps` global batches in the tuple layout: images [B, 16, 16, 3] float32, labels int32 [B]."""
    images, labels = (np.stack(parts) for parts in zip(*[layout_batch(loss, TUPLES, IMAGE, seed=seed + step)
                                                          for step in range(steps)]))
    if nan_step is not None:
        images[nan_step, 1, 0, 0, 0] = np.nan  # a row that lands on the second replica
    return images, np.asarray(labels, "int32")


def build(loss, strategy, seed=0):
    import keras
    from hdml_tf.config import HDMLConfig
    from hdml_tf.model import HDMLModel
    with strategy.scope():
        backbone = bn_backbone(seed)
        keras.utils.set_random_seed(seed)
        model = HDMLModel(backbone, num_classes=8,
                          config=HDMLConfig(loss=loss, embedding_size=8, window=1))
        # SGD moves weights by lr·gradient: a wrong gradient scale shows (Adam's normalized steps would hide it).
        opts = (keras.optimizers.SGD(1e-2), keras.optimizers.SGD(1e-6), keras.optimizers.SGD(1e-2))
        model.compile(metric_optimizer=opts[0], generator_optimizer=opts[1], classifier_optimizer=opts[2])
    return model


def fit(model, strategy, images, labels, keras_split=False):
    """model.fit on these global batches; keras_split: hand Keras the plain dataset (its own split) instead of
    `distribute.distribute_dataset`'s."""
    import tensorflow as tf
    from hdml_tf import distribute

    def make():
        return tf.data.Dataset.from_tensor_slices((images, labels))
    ds = make() if keras_split else distribute.distribute_dataset(strategy, make)
    history = model.fit(ds, epochs=1, steps_per_epoch=len(images), verbose=0)
    return {k: float(v[-1]) for k, v in history.history.items()}


def variables(model):
    """Every model weight (first replica's copy), keyed by position and path without the model's own name (a
    second model in one process gets uniquified names)."""
    return {f"{i:03d}:{v.path.split('/', 1)[-1]}": np.array(v.numpy()) for i, v in enumerate(model.weights)}


def trainable(model):
    ids = {id(v) for v in model.trainable_weights}
    return {k: v for (k, v), w in zip(variables(model).items(), model.weights) if id(w) in ids}


def replica_copies_identical(model):
    """Largest difference between the per-replica copies of any model weight."""
    worst = 0.0
    for v in model.weights:
        copies = getattr(v.value, "values", None)
        if copies:
            ref = copies[0].numpy()
            worst = max([worst] + [float(np.max(np.abs(c.numpy() - ref))) for c in copies[1:]])
    return worst


def compare(single, mirrored, start):
    """Per trainable variable: |Δ_mirrored − Δ_single| / |Δ_single| (Δ: change over the run), and the ratio of
    the update norms |Δ_mirrored| / |Δ_single|; plus the largest difference of any weight (trainable or not: BatchNorm
    statistics, running means), relative to max(1, the weight's largest magnitude)."""
    rel, ratios, absolute, norms = {}, {}, 0.0, {}
    for path, s in single.items():
        m = mirrored[path]
        if s.size:  # relative to the variable's scale (J_gen's running mean is ~1e4)
            absolute = max(absolute, float(np.max(np.abs(m - s)) / max(1.0, np.max(np.abs(s)))))
        if path in start:
            ds, dm = s - start[path], m - start[path]
            norm = float(np.linalg.norm(ds))
            norms[path] = (norm, float(np.linalg.norm(dm - ds)))
            if norm > 0:
                rel[path] = float(np.linalg.norm(dm - ds) / norm)
                ratios[path] = float(np.linalg.norm(dm) / norm)
    return rel, ratios, absolute, norms


def run_mirrored(out_path, reference_path=None, naive=False):
    devices = split_cpu(2)
    import tensorflow as tf
    from hdml_tf import distribute
    if naive:  # what happens without the 1/R factor (evidence for the report, not a supported mode)
        distribute.loss_scale_for_replicas = lambda: 1.0
    report = {}
    default = tf.distribute.get_strategy()
    mirrored = distribute.make_strategy("mirrored", devices)
    report["describe"] = distribute.describe(mirrored, 8, "npair")
    for loss in ("npair", "triplet"):
        images, labels = batches(loss, 1 if naive else STEPS)
        single = build(loss, default)
        start = trainable(single)
        logs_single = fit(single, default, images, labels)
        if reference_path and loss == "npair":
            np.savez(reference_path, __logs__=json.dumps(logs_single), **variables(single))
        model = build(loss, mirrored)
        start_m = trainable(model)
        init_diff = max(float(np.max(np.abs(start_m[p] - start[p]))) for p in start)
        logs_mirrored = fit(model, mirrored, images, labels, keras_split=loss == "triplet")
        vs, vm = variables(single), variables(model)
        rel, ratios, absolute, norms = compare(vs, vm, start)
        r = {"init_diff": init_diff, "logs_single": logs_single, "logs_mirrored": logs_mirrored,
             "max_rel_update_error": max(rel.values()), "worst_variable": max(rel, key=rel.get), "rel": rel,
             "norms": norms,
             "update_norm_ratio_min": min(ratios.values()), "update_norm_ratio_max": max(ratios.values()),
             "max_rel_diff_all_variables": absolute, "replica_copies_max_diff": replica_copies_identical(model),
             "synchronized_bn": sum(bool(getattr(layer, "synchronized", False))
                                    for m in (model.backbone, model.metric_head) for layer in m.layers)}
        if not naive and loss == "npair":
            # A step with a NaN pixel on the second replica: skipped everywhere, nothing changes.
            before = variables(model)
            bad_images, bad_labels = batches(loss, 1, seed=1, nan_step=0)
            fit(model, mirrored, bad_images, bad_labels)
            after = variables(model)
            r["nan_step_skipped"] = float(model.skipped.numpy())
            r["nan_step_changed"] = [p for p in before if "skipped" not in p and "tracker" not in p
                                     and not np.array_equal(before[p], after[p])]
        report[loss] = r
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def run_worker(out_path, steps=STEPS):
    """One worker of a MultiWorkerMirroredStrategy run (TF_CONFIG set by the caller): the N-pair run of
    `run_mirrored`, one replica per process."""
    from hdml_tf import distribute
    strategy = distribute.make_strategy("multi_worker")
    print(distribute.describe(strategy, 2 * TUPLES, "npair"), flush=True)
    images, labels = batches("npair", steps)
    model = build("npair", strategy)
    logs = fit(model, strategy, images, labels)
    np.savez(out_path, __logs__=json.dumps(logs), __chief__=distribute.is_chief(strategy),
             __replicas__=strategy.num_replicas_in_sync,
             **variables(model))


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "mirrored":
        run_mirrored(out, sys.argv[3] if len(sys.argv) > 3 and not sys.argv[3].startswith("--") else None,
                     naive="--naive" in sys.argv)
    elif mode == "worker":
        run_worker(out)
    else:
        raise SystemExit(f"unknown mode {mode}")
