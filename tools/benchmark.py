#!/usr/bin/env python
"""Training speed of HDML against the plain baseline: images/s, HDML/baseline step-time ratio, XLA, peak memory.

    python tools/benchmark.py                                    # the paper's N-pair batch: 128 = 64 anchors x 64
                                                                 # synthetic negatives each, 227 px, Caffe GoogLeNet
    python tools/benchmark.py --batch_size=32 --image_size=64 --steps=5 --output=runs/benchmark_cpu.json   # a CPU

Every variant (HDML, baseline) x (XLA off, on) is an `HDMLModel` with the same backbone, loss, batch, image size and
embedding size, trained with `train_on_batch` on one fixed random batch in the loss's tuple layout that is already in
memory (the input pipeline is `tools/benchmark_input.py`'s business). After `--warmup` untimed steps per variant
(tracing, XLA compilation) and one more untimed step of each in turn, `--rounds` rounds each time a block of
`--steps` steps of every variant, in an order rotated every round, so that drift (other processes, clocks, thermals)
falls on all variants alike. Per variant the step time is the median over its blocks; the HDML/baseline ratio is the
median of the per-round ratios (paired blocks of the same round). On a shared CPU, `cpu_seconds_per_step` (this
process's CPU time) is steadier than wall time. On a small CPU, XLA's compilation of the train step takes minutes:
`--xla=false` skips it.

Peak memory: on a GPU, `tf.config.experimental.get_memory_info` peak over each variant's timed blocks (statistics
reset before every block; `warmup_peak_bytes` is the warm-up's own peak, autotuning scratch included); on a CPU,
the process's max RSS (`resource.getrusage`), which is process-wide and only grows, so its per-variant value is the
max RSS after that variant's warm-up (variants warm up in the order listed).

`--breakdown` (on by default) times the pieces HDML adds after the backbone, each forward + backward on its own:
the pulling of the N x N synthetic negatives (eq. 8), the generator on B + N^2 rows, the second metric-head pass on
the synthetic rows, the classifier on them (J_soft), against the backbone's forward + backward. The JSON is printed
and, with `--output`, written. The timing itself lives in `hdml_tf.benchmarking` (shared with
tools/benchmark_input.py and tools/gpu_check.py).
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import common_flags  # noqa: E402  (run_main: one-line errors)
from hdml_tf import benchmarking  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("backbone", "inception_v1_caffe", ["inception_v1_caffe", "inception_v1_slim", "resnet50"],
                  "Backbone (random weights: speed does not depend on them).")
flags.DEFINE_enum("loss", "npair", ["npair", "triplet", "contrastive"], "Metric loss and batch layout.")
flags.DEFINE_integer("batch_size", 128, "Global batch in the loss's tuple layout (paper: 128 N-pair, 120 triplet).")
flags.DEFINE_integer("image_size", 227, "Crop size fed to the backbone (paper: 227).")
flags.DEFINE_integer("embedding_size", 128, "Embedding size (paper: 128 Cars196, 256 CUB-200).")
flags.DEFINE_integer("num_classes", 100, "Training classes of the softmax classifier (CUB-200: 100, Cars196: 98).")
flags.DEFINE_integer("steps", 10, "Timed steps per block.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds (each times one block of every variant).")
flags.DEFINE_integer("warmup", 2, "Untimed steps per variant before the rounds (tracing, XLA compilation).")
flags.DEFINE_list("xla", ["false", "true"], "jit_compile settings to time (compile(jit_compile=...)).")
flags.DEFINE_list("methods", ["baseline", "hdml"], "Methods to time: baseline, hdml.")
flags.DEFINE_bool("breakdown", True, "Also time HDML's added pieces (pulling, generator, second head pass, "
                  "classifier) and the backbone alone.")
flags.DEFINE_integer("breakdown_steps", 3, "Timed calls per breakdown piece (median).")
flags.DEFINE_integer("seed", 0, "Seed of the random batch and the weights.")
flags.DEFINE_string("output", "", "JSON file to write (the JSON is printed either way).")

#: The issue's target: HDML's step at most this many times the baseline's (paper batch, GPU).
TARGET_RATIO = 1.10


# ------------------------------------------------------------------------------------------------ variants
def make_variant(method: str, xla: bool) -> benchmarking.TimedVariant:
    """One model (method x jit_compile) with the flags' backbone, loss, sizes and seed."""
    def build():
        import keras

        from hdml_tf.backbones import build_backbone
        from hdml_tf.config import HDMLConfig
        from hdml_tf.model import HDMLModel, make_optimizers
        keras.utils.set_random_seed(FLAGS.seed)
        config = HDMLConfig(loss=FLAGS.loss, embedding_size=FLAGS.embedding_size, hdml=method == "hdml")
        model = HDMLModel(build_backbone(FLAGS.backbone, FLAGS.image_size), FLAGS.num_classes, config)
        # HDMLModel.compile passes jit_compile through to keras.Model.compile.
        model.compile(**make_optimizers(hdml=config.hdml), jit_compile=xla)
        return model

    return benchmarking.TimedVariant(f"{method}{'_xla' if xla else ''}", build, FLAGS.batch_size, method=method,
                                     jit_compile=xla)


# ------------------------------------------------------------------------------------------------ breakdown
def breakdown(batch, xla: bool) -> dict:
    """Milliseconds (median of --breakdown_steps) of each piece HDML adds after the backbone, forward + backward.

    Pieces, on the shapes of one step (N-pair: N anchors, N^2 synthetic negatives):
      backbone: features of the batch and their gradient w.r.t. the backbone (shared by both methods);
      metric_head_and_loss: z = head(y), J_m, gradient (the baseline's whole tail);
      pulling: eq. 8 on the N x N anchor/negative grid (`Layout.synthesize`) and its gradient;
      generator: the generator on [z; z_hat] (B + N + N^2 rows) and its gradient;
      second_head_pass: the metric head on the synthetic features and J_m on them (J_syn), gradient;
      classifier_soft: the classifier on the synthetic features (J_soft) and on y (J_ce), gradient;
      hdml_tail: everything after the backbone in HDML's step (`HDMLModel.forward_step` on fixed features).
    """
    import keras
    import tensorflow as tf

    from hdml_tf import hardness
    from hdml_tf.backbones import build_backbone
    from hdml_tf.config import HDMLConfig
    from hdml_tf.model import HDMLModel

    keras.utils.set_random_seed(FLAGS.seed)
    cfg = HDMLConfig(loss=FLAGS.loss, embedding_size=FLAGS.embedding_size)
    images, labels = batch
    rows = int(images.shape[0])
    net = build_backbone(FLAGS.backbone, FLAGS.image_size)
    feature_dim = int(net.output_shape[-1])
    # HDML's tail alone: an HDMLModel whose "backbone" passes fixed features y through.
    features = keras.Input((feature_dim,))
    model = HDMLModel(keras.Model(features, keras.layers.Identity()(features)), FLAGS.num_classes, cfg)
    y = tf.random.normal([rows, feature_dim], seed=FLAGS.seed)
    model(y[:2])
    z = tf.math.l2_normalize(tf.random.normal([rows, cfg.embedding_size], seed=FLAGS.seed), -1)
    j_avg = tf.constant(5.0)  # pulls most negatives: the costly case
    layout, factor = cfg.layout(), hardness.pull_factor(j_avg, cfg.alpha)
    z_hat, _ = layout.synthesize(z, factor)
    y_syn = model.generator_net(tf.concat([z, z_hat], 0))[rows:]
    syn_labels = layout.synthetic_labels(labels)
    head, gen, clf = model.metric_head, model.generator_net, model.classifier_net
    clf(y[:2])  # build every layer outside tf.function

    def fn(body):
        return tf.function(body, jit_compile=xla)

    @fn
    def backbone():
        with tf.GradientTape() as tape:
            out = tf.reduce_sum(net(images, training=True))
        return tape.gradient(out, net.trainable_variables)

    @fn
    def head_and_loss():
        with tf.GradientTape() as tape:
            tape.watch(y)
            loss = layout.metric_loss(head(y, training=True), labels)
        return tape.gradient(loss, [y] + head.trainable_variables)

    @fn
    def pulling():
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = tf.reduce_sum(layout.synthesize(z, factor)[0])
        return tape.gradient(out, z)

    @fn
    def generator():
        inputs = tf.concat([z, z_hat], 0)
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out = tf.reduce_sum(tf.square(gen(inputs, training=True)))
        return tape.gradient(out, [inputs] + gen.trainable_variables)

    @fn
    def second_head_pass():
        with tf.GradientTape() as tape:
            tape.watch(y_syn)
            loss = layout.synthetic_loss(head(y_syn, training=True), labels)
        return tape.gradient(loss, [y_syn] + head.trainable_variables)

    @fn
    def classifier_soft():
        with tf.GradientTape() as tape:
            logits = clf(y_syn, training=True)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(syn_labels, logits)) + \
                tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, clf(y, training=True)))
        return tape.gradient(loss, clf.trainable_variables)

    @fn
    def hdml_tail():
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(y)
            out = model.forward_step(y, labels, training=True).losses
        return [tape.gradient(out["loss"], [y] + head.trainable_variables),
                tape.gradient(out["j_gen"], gen.trainable_variables),
                tape.gradient(out["j_ce"], clf.trainable_variables)]

    pieces = {"backbone": backbone, "metric_head_and_loss": head_and_loss, "pulling": pulling,
              "generator": generator, "second_head_pass": second_head_pass, "classifier_soft": classifier_soft,
              "hdml_tail": hdml_tail}
    found = {}
    for name, f in pieces.items():
        try:
            tf.nest.map_structure(lambda t: t.numpy() if t is not None else None, f())  # trace / compile
            times = []
            for _ in range(FLAGS.breakdown_steps):
                start = time.perf_counter()
                tf.nest.map_structure(lambda t: t.numpy() if t is not None else None, f())
                times.append(time.perf_counter() - start)
            found[name] = round(1000 * statistics.median(times), 2)
        except Exception as e:
            found[name] = f"{type(e).__name__}: {str(e).strip()[-600:]}"
    synthetic = int(y_syn.shape[0])  # N-pair: N anchors + N^2 pulled negatives
    result = {"milliseconds": found, "jit_compile": xla, "generator_rows": rows + synthetic,
              "synthetic_rows": synthetic}
    if all(isinstance(found[k], float) for k in ("backbone", "metric_head_and_loss", "hdml_tail")):
        # The step-time ratio these pieces predict: backbone + HDML's tail over backbone + the baseline's tail.
        result["predicted_ratio"] = round((found["backbone"] + found["hdml_tail"])
                                          / (found["backbone"] + found["metric_head_and_loss"]), 3)
    return result


def run() -> dict:
    from hdml_tf.config import ConfigError
    for name, low in (("batch_size", 1), ("steps", 1), ("rounds", 1), ("warmup", 0), ("image_size", 32)):
        if getattr(FLAGS, name) < low:
            raise ConfigError(f"--{name}={getattr(FLAGS, name)} must be >= {low}")
    xla_values = []
    for value in FLAGS.xla:
        if value.lower() not in ("true", "false", "1", "0", "on", "off"):
            raise ConfigError(f"--xla={','.join(FLAGS.xla)}: expected a list of true/false")
        xla_values.append(value.lower() in ("true", "1", "on"))
    methods = list(FLAGS.methods)
    if not methods or any(m not in ("baseline", "hdml") for m in methods):
        raise ConfigError(f"--methods={','.join(methods)}: expected baseline and/or hdml")

    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    result = {"settings": {k: FLAGS[k].value for k in ("backbone", "loss", "batch_size", "image_size",
                                                         "embedding_size", "num_classes", "steps", "rounds",
                                                         "warmup", "seed")},
              "machine": benchmarking.describe_machine()}
    if FLAGS.loss == "npair":
        n = FLAGS.batch_size // 2
        result["settings"]["layout"] = f"{n} anchors x {n} synthetic negatives each ({n * n} synthetic rows)"
    device = benchmarking.accelerator()
    result["memory_source"] = ("tf.config.experimental.get_memory_info (GPU:0), statistics reset per block" if device
                               else "resource.getrusage max RSS of the process (process-wide, only grows)")
    batch = benchmarking.make_batch(FLAGS.loss, FLAGS.batch_size, FLAGS.image_size, FLAGS.num_classes, FLAGS.seed)
    if device:  # keep the batch in GPU memory: no host-to-device copy inside the timed steps
        with tf.device(device):
            batch = tuple(tf.identity(t) for t in batch)

    variants = [make_variant(m, x) for x in xla_values for m in methods]
    for v in variants:
        print(f"warm-up {v.name} ...", file=sys.stderr, flush=True)
        v.warm_up(batch, device, max(1, FLAGS.warmup))
        if v.error:
            print(f"  {v.name} failed: {v.error}", file=sys.stderr)
    benchmarking.time_interleaved(variants, batch, device, FLAGS.steps, FLAGS.rounds,
                                  progress=lambda line: print(line, file=sys.stderr, flush=True))

    result["variants"] = {v.name: v.summary() for v in variants}
    by_key = {(v.tags["method"], v.tags["jit_compile"]): v for v in variants}
    ratios, speedups = {}, {}
    for x in xla_values:
        if ("hdml", x) in by_key and ("baseline", x) in by_key:
            ratios["xla" if x else "no_xla"] = benchmarking.paired_ratio(
                by_key[("hdml", x)], by_key[("baseline", x)], target=TARGET_RATIO)
    for m in methods:
        off, on = by_key.get((m, False)), by_key.get((m, True))
        speedup = benchmarking.paired_ratio(off, on) if off and on else None  # XLA-off time / XLA-on time
        if speedup:
            speedups[m] = {"xla_speedup": speedup["wall"], "use_xla": speedup["wall"] > 1.0}
    result["hdml_over_baseline_step_time"] = ratios
    result["xla"] = speedups
    if FLAGS.breakdown and "hdml" in methods:
        result["breakdown"] = {}
        for x in xla_values:
            print(f"breakdown (jit_compile={x}) ...", file=sys.stderr, flush=True)
            result["breakdown"]["xla" if x else "no_xla"] = breakdown(batch, x)
    result["memory_at_end"] = benchmarking.memory_info(device)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


@common_flags.run_main
def main(argv):
    if len(argv) > 1:
        raise SystemExit(f"error: unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    result = run()
    text = json.dumps(result, indent=2)
    print(text)
    if FLAGS.output:
        benchmarking.write_json_atomic(FLAGS.output, result)


if __name__ == "__main__":
    app.run(main)
