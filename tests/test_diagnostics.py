"""Per-step diagnostics: each preset logs what its name says; per-step values agree with Keras' epoch means, the
pull rule and an independent gradient computation; the step CSV resumes; TensorBoard gets the scalars."""
import csv
import dataclasses
import glob
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import layout_batch, tiny_backbone
from hdml_tf.config import HDMLConfig
from hdml_tf.diagnostics import StepLog, read_steps
from hdml_tf.model import HDMLModel
from hdml_tf.variants import parse_variant

ALPHA, BETA = 2.0, 1e4  # alpha 2 keeps e^(-alpha/J_avg) between 0 and 1 for the tiny model's J_avg of a few units


def _model(config):
    model = HDMLModel(tiny_backbone(), num_classes=8, config=config)
    names = ("metric_optimizer", "generator_optimizer", "classifier_optimizer")
    model.compile(**{n: keras.optimizers.Adam(1e-3) for n in names})
    return model


@pytest.mark.parametrize("preset", ["baseline", "hdml", "hdml_no_hardness", "hdml_fixed_hardness", "hdml_no_softmax",
                                    "hdml_no_recon"])
def test_each_preset_logs_what_its_name_says(preset):
    config = parse_variant(preset).config(HDMLConfig(embedding_size=8, window=1, alpha=ALPHA, beta=BETA))
    model = _model(config)
    images, labels = layout_batch("npair", tuples=4, size=16)
    for step in range(3):
        j_avg, j_gen = float(model.j_avg.value), float(model.j_gen_avg.value)
        model.train_on_batch(images, labels)
        logs = model.last_step_logs()
        assert all(math.isfinite(v) for v in logs.values()), logs
        if preset == "baseline":
            assert not {"pull_factor", "syn_weight", "j_soft", "j_recon", "j_syn"} & set(logs)
            continue
        if step > 0:
            assert j_avg < 1e3  # the 1-step window has closed: the adaptive factor is not trivially 1
        # Every HDML preset keeps the synthetic weight of eq. 15.
        assert logs["syn_weight"] == pytest.approx(1 - math.exp(-BETA / j_gen), rel=1e-5)
        expected_pull = {"hdml_no_hardness": 1.0, "hdml_fixed_hardness": 0.5}.get(
            preset, math.exp(-ALPHA / j_avg))
        assert logs["pull_factor"] == pytest.approx(expected_pull, rel=1e-5)
        assert (logs["j_soft"] == 0.0) == (preset == "hdml_no_softmax")
        assert (logs["j_recon"] == 0.0) == (preset == "hdml_no_recon")
        assert logs["j_soft"] >= 0 and logs["j_recon"] >= 0
    if preset == "hdml":
        assert 0.0 < logs["pull_factor"] < 0.9  # the adaptive factor really moved negatives


def test_gradient_norms_match_an_independent_tape():
    """grad_real_norm / grad_syn_norm are ‖∂(e^(−β/J_gen)·J_m)/∂y‖ and ‖∂J_syn/∂y‖ at the backbone's output,
    recomputed here from the parts (backbone, head, layout, generator) with a tape that watches y."""
    config = HDMLConfig(embedding_size=8, alpha=ALPHA)
    model = _model(config)
    images, labels = layout_batch("npair", tuples=4, size=16)
    layout = config.layout()
    real_weight = math.exp(-config.beta / 1e6)  # the running means start at 1e6
    with tf.GradientTape(persistent=True) as tape:
        y = model.backbone(images, training=True)
        tape.watch(y)
        z = model.metric_head(y, training=True)
        z_hat, _ = layout.synthesize(z, tf.exp(-ALPHA / 1e6))
        y_syn = model.generator_net(tf.concat([z, z_hat], 0), training=True)[len(images):]
        j_syn = (1 - real_weight) * layout.synthetic_loss(model.metric_head(y_syn, training=True), labels)
        j_m = real_weight * layout.metric_loss(z, labels)
    expected_real = float(tf.norm(tape.gradient(j_m, y)))
    expected_syn = float(tf.norm(tape.gradient(j_syn, y)))
    model.train_on_batch(images, labels)
    logs = model.last_step_logs()
    assert logs["grad_real_norm"] == pytest.approx(expected_real, rel=1e-4)
    assert logs["grad_syn_norm"] == pytest.approx(expected_syn, rel=1e-4)
    assert expected_syn > 0


def test_step_log_agrees_with_epoch_means_and_the_pull_rule(tmp_path):
    model = _model(HDMLConfig(embedding_size=8, window=2, alpha=ALPHA))
    images, labels = layout_batch("npair", tuples=4, size=16)
    data = tf.data.Dataset.from_tensors((images, labels)).repeat()
    log = StepLog(tmp_path / "steps.csv", log_dir=str(tmp_path / "tb"))
    history = model.fit(data, epochs=2, steps_per_epoch=3, verbose=0, callbacks=[log])
    steps = read_steps(tmp_path / "steps.csv")
    assert steps["step"] == [1, 2, 3, 4, 5, 6]
    for key in ("j_m", "j_syn", "grad_syn_norm", "pull_factor"):
        # Keras' epoch mean (the model's Mean trackers) is the mean of the epoch's per-step values.
        assert history.history[key] == pytest.approx([np.mean(steps[key][:3]), np.mean(steps[key][3:])], rel=1e-5)
    # The logged J_avg is the running mean after the step's update; the next step's factor is e^(−α/J_avg).
    for k in range(1, 6):
        assert steps["pull_factor"][k] == pytest.approx(math.exp(-ALPHA / steps["j_avg"][k - 1]), rel=1e-5)
    tags = []
    for path in glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags += [v.tag for v in event.summary.value]
    assert tags.count("step/j_syn") == 6 and tags.count("step/grad_syn_norm") == 6


def test_step_log_resumes_at_a_checkpoint_step(tmp_path):
    path = tmp_path / "steps.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "j_m"])
        writer.writerows([[s, 10.0 - s] for s in range(1, 7)])
    log = StepLog(path, initial_step=4)  # a run resumed from the checkpoint of step 4: rows 5 and 6 are redone
    assert [r["step"] for r in log.rows] == [1, 2, 3, 4]
    log.flush()
    assert read_steps(path) == {"step": [1, 2, 3, 4], "j_m": [9.0, 8.0, 7.0, 6.0]}


def test_capped_branches_hand_worked():
    """Backward of the two copies: g_real + min(1, cap·‖g_real‖/‖g_syn‖)·g_syn."""
    from hdml_tf.model import capped_branches
    z = tf.constant([[1.0, 2.0]])
    real_weights, syn_weights = tf.constant([[3.0, 4.0]]), tf.constant([[0.0, 30.0]])  # ‖g_real‖ 5, ‖g_syn‖ 30
    for cap, scale in ((0.5, 2.5 / 30), (2.0, 10 / 30), (10.0, 1.0)):
        with tf.GradientTape() as tape:
            tape.watch(z)
            a, b = capped_branches(z, cap)
            loss = tf.reduce_sum(real_weights * a) + tf.reduce_sum(syn_weights * b)
        assert float(loss) == pytest.approx(3 + 8 + 60)  # both copies carry z's values
        np.testing.assert_allclose(tape.gradient(loss, z).numpy(), [[3.0, 4.0 + 30 * scale]], rtol=1e-6)


@pytest.mark.parametrize("mode", ["none", "capped"])
def test_synthetic_gradient_modes(mode):
    """What J_metric sends into the backbone's output y is the head's backward pass of g_real + s·g_syn at z, with
    g_real, g_syn the gradients of e^(−β/J_gen)·J_m and J_syn at z (recomputed here on a model of the paper's
    method with the same weights), s = 0 for --syn_gradient=none and min(1, cap·‖g_real‖/‖g_syn‖) for capped."""
    cap = 0.05
    config = HDMLConfig(embedding_size=8, alpha=ALPHA, syn_gradient=mode, syn_gradient_cap=cap)
    images, labels = layout_batch("npair", tuples=4, size=16)
    reference = _model(dataclasses.replace(config, syn_gradient="full"))
    layout = config.layout()
    real_weight = math.exp(-config.beta / 1e6)
    with tf.GradientTape(persistent=True) as tape:
        y = reference.backbone(images, training=True)
        tape.watch(y)
        z = reference.metric_head(y, training=True)
        z_hat, _ = layout.synthesize(z, tf.exp(-ALPHA / 1e6))
        y_syn = reference.generator_net(tf.concat([z, z_hat], 0), training=True)[len(images):]
        j_syn = (1 - real_weight) * layout.synthetic_loss(reference.metric_head(y_syn, training=True), labels)
        j_m = real_weight * layout.metric_loss(z, labels)
    g_real, g_syn = tape.gradient(j_m, z), tape.gradient(j_syn, z)
    scale = 0.0 if mode == "none" else min(1.0, cap * float(tf.norm(g_real)) / float(tf.norm(g_syn)))
    expected = tape.gradient(z, y, output_gradients=g_real + scale * g_syn)

    model = _model(config)  # tiny_backbone seeds Keras: the same initial weights as the reference
    with tf.GradientTape(persistent=True) as tape:
        step = model.forward_step(images, labels, training=True)
    np.testing.assert_allclose(tape.gradient(step.losses["loss"], step.features).numpy(), expected.numpy(),
                               rtol=1e-4, atol=1e-7)
    if mode == "capped":
        assert 0 < scale < 1  # the cap binds in this example
    # Either way J_syn still trains the metric head (through z̃ = head(ỹ)).
    head_grads = tape.gradient(step.losses["j_syn"], model.metric_head.trainable_variables)
    assert any(g is not None and float(tf.norm(g)) > 0 for g in head_grads)
