"""HDMLModel: generator losses vs the official values, one step end to end, gradient routing, NaN skip."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import layout_batch, tiny_backbone
from hdml_tf import layouts, losses
from hdml_tf.config import HDMLConfig, OptimConfig
from hdml_tf.model import HDMLModel


def test_generator_losses_match_official(official):
    labels = official["npair/labels"]
    logits = np.concatenate([official["npair/logits_anc"], official["npair/logits_negtile"]])
    npair = layouts.get("npair")
    syn_labels = npair.synthetic_labels(tf.constant(labels))
    got = losses.label_preserving_softmax(npair.softmax_loss(tf.constant(logits, tf.float32), syn_labels))
    np.testing.assert_allclose(got.numpy(), official["npair/j_soft"], rtol=1e-5)
    rec = losses.reconstruction_loss(official["recon/y_rec"], official["recon/y"], 0.5)
    np.testing.assert_allclose(rec.numpy(), official["recon/j_recon"], rtol=1e-5)


def _batch(loss, tuples=4, size=16, seed=0):
    return layout_batch(loss, tuples, size, seed)


def _model(loss="npair", hdml=True, lrs=(1e-3, 1e-2, 1e-3), **cfg):
    model = HDMLModel(tiny_backbone(), num_classes=8, config=HDMLConfig(loss=loss, embedding_size=8, hdml=hdml,
                                                                         **cfg))
    names = ("metric_optimizer", "generator_optimizer", "classifier_optimizer")
    model.compile(**{name: keras.optimizers.Adam(lr) for name, lr in zip(names, lrs)})
    return model


def _snapshot(variables):
    return [v.numpy().copy() for v in variables]


def _changed(before, variables):
    return [not np.array_equal(b, v.numpy()) for b, v in zip(before, variables)]


def _np_npair(z, labels, reg):
    a, p = z[: len(z) // 2], z[len(z) // 2:]
    lab = labels[len(z) // 2:]
    logits = a @ p.T
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    target = (lab[:, None] == lab[None, :]).astype(float)
    target /= target.sum(1, keepdims=True)
    return -(target * logp).sum(1).mean() + 0.25 * reg * ((a ** 2).sum(1).mean() + (p ** 2).sum(1).mean())


@pytest.mark.parametrize("hdml", [False, True])
def test_one_step_end_to_end_matches_numpy(hdml):
    model = _model(hdml=hdml)
    images, labels = _batch("npair")
    # Training-mode forward before the update: BatchNorm uses batch statistics, so this is the step's z.
    z = model.metric_head(model.backbone(images, training=True), training=True).numpy().astype(np.float64)
    wd = 5e-3 * sum((v.numpy().astype(np.float64) ** 2).sum() / 2 for v in model._decay_vars)
    j_m = _np_npair(z, labels, 3e-3) + wd
    logs = model.train_on_batch(images, labels, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    if not hdml:
        assert logs["loss"] == pytest.approx(j_m, rel=1e-4)
    else:
        real_weight = np.exp(-1e4 / 1e6)  # J_gen's running mean starts at 1e6
        assert logs["j_m"] == pytest.approx(real_weight * j_m, rel=1e-4)
        assert logs["syn_weight"] == pytest.approx(1 - real_weight, rel=1e-4)
        assert logs["pull_factor"] == pytest.approx(np.exp(-90 / 1e6), rel=1e-6)
        assert logs["loss"] == pytest.approx(logs["j_m"] + logs["j_syn"], rel=1e-5)
        assert logs["j_gen"] == pytest.approx(logs["j_recon"] + logs["j_soft"], rel=1e-5)
        # With J_avg = 1e6 the pull is negligible: J_syn is J_m of the generated copies, weighted by 1 - e^-0.01.
        assert 0 < logs["j_syn"] < logs["j_m"]


@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
def test_other_layouts_train(loss):
    model = _model(loss=loss, window=1)
    images, labels = _batch(loss)
    for _ in range(3):
        logs = model.train_on_batch(images, labels, return_dict=True)
    assert all(np.isfinite(v) for v in logs.values())
    assert model.j_avg.value.numpy() < 1e6  # the window of 1 has closed: J_avg now tracks the loss


def _tape_grads(model, images, labels, loss_key, variables):
    with tf.GradientTape() as tape:
        loss = model.forward_step(images, labels, training=True).losses[loss_key]
    return [g for g in tape.gradient(loss, variables) if g is not None]


@pytest.mark.parametrize("active", ["metric", "generator", "classifier"])
def test_gradient_routing(active):
    """Each loss changes only its own variables, even where its gradient reaches other variables."""
    lrs = {"metric": (1e-2, 0.0, 0.0), "generator": (0.0, 1e-2, 0.0), "classifier": (0.0, 0.0, 1e-2)}[active]
    # Adam with learning rate 0 leaves a variable exactly where it was.
    model = _model(lrs=lrs)
    images, labels = _batch("npair")
    groups = {"metric": model.metric_variables, "generator": model.generator_net.trainable_variables,
              "classifier": model.classifier_net.trainable_variables}
    loss_key = {"metric": "loss", "generator": "j_gen", "classifier": "j_ce"}[active]
    # The gradients exist beyond the route: J_metric reaches the generator, J_gen reaches the backbone.
    if active == "metric":
        assert any(np.abs(g.numpy()).sum() > 0 for g in _tape_grads(model, images, labels, "loss",
                                                                    groups["generator"]))
    if active == "generator":
        assert any(np.abs(g.numpy()).sum() > 0 for g in _tape_grads(model, images, labels, "j_gen",
                                                                    groups["metric"]))
    before = {k: _snapshot(v) for k, v in groups.items()}
    model.train_on_batch(images, labels)
    for name, variables in groups.items():
        changed = _changed(before[name], variables)
        if name == active:
            assert sum(changed) >= len(changed) // 2, f"{loss_key} did not update {name}"
        else:
            assert not any(changed), f"{loss_key}'s step changed {name} variables"


def test_nonfinite_step_changes_nothing():
    model = _model()
    images, labels = _batch("npair")
    model.train_on_batch(images, labels)  # a good step first, so optimizer moments are non-zero
    every = model.variables + model.optimizer.variables + model.generator_optimizer.variables + \
        model.classifier_optimizer.variables
    every = [v for v in every if "skipped_steps" not in v.path]
    before = _snapshot(every)
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    logs = model.train_on_batch(bad, labels, return_dict=True)
    assert model.skipped.numpy() == 1.0
    assert not any(_changed(before, every)), [v.path for v, c in zip(every, _changed(before, every)) if c]
    logs = model.train_on_batch(images, labels, return_dict=True)
    assert np.isfinite(logs["loss"])


def test_predict_is_l2_normalized_and_state_is_saved(tmp_path):
    model = _model()
    images, labels = _batch("npair")
    emb = model.predict(images, verbose=0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.embedder()(images).numpy(), emb, rtol=1e-5, atol=1e-6)
    paths = [v.path for v in model.weights]
    assert any("j_avg" in p for p in paths) and any("j_gen_avg" in p for p in paths)


def test_config_errors_are_one_line():
    from hdml_tf.config import ConfigError
    with pytest.raises(ConfigError, match="loss='arc' is unknown"):
        HDMLConfig(loss="arc")
    with pytest.raises(ConfigError, match="batch_size=9 does not fit the npair layout"):
        HDMLConfig(loss="npair").layout().check_batch_size(9)
    with pytest.raises(ConfigError, match="learning_rate=-1"):
        OptimConfig(learning_rate=-1)
