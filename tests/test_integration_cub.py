"""A few training steps on the real CUB-200-2011 photographs in ../shared, evaluated on its unseen test classes.

Skipped cleanly where ../shared/data is absent (a user's clone).
"""
import numpy as np
import pytest

from conftest import cub_subset_dir

CUB = cub_subset_dir()

pytestmark = pytest.mark.skipif(CUB is None or not CUB.is_dir(),
                                reason="../shared/data/cub200_subset is absent (only the project's CI has it)")


def test_train_few_steps_on_real_birds_and_evaluate_unseen_classes(tmp_path):
    from hdml_tf.config import HDMLConfig, OptimConfig, RunConfig
    from hdml_tf import experiment

    run = RunConfig(dataset="cub200", data_dir=str(CUB), backbone="inception_v1_slim", image_size=64,
                               resize=72, batch_size=8, steps=3, steps_per_epoch=3, eval_batch_size=64,
                               output_dir=str(tmp_path), verbose=0)
    hdml = HDMLConfig(loss="npair", embedding_size=16)
    train, test = experiment.load_splits(run)
    # The subset keeps the official class ids: classes 1-100 train, 101-200 test, none shared.
    assert (train.num_classes, len(train)) == (58, 3428)
    assert (test.num_classes, len(test)) == (42, 2474)
    assert set(train.original_class_ids).isdisjoint(test.original_class_ids)
    assert max(train.original_class_ids) <= 100 < min(test.original_class_ids)

    model = experiment.build_model(run, hdml, OptimConfig(learning_rate=1e-4, decay_steps=()), train.num_classes)
    history = experiment.fit(model, run, hdml, train)
    assert all(np.isfinite(v[-1]) for v in history.history.values())
    assert model.skipped.numpy() == 0

    # Evaluate on a class-complete slice of the unseen test classes (8 classes) to keep the test short.
    keep = np.isin(test.labels, np.arange(8))
    metrics = experiment.evaluate_model(model, experiment.eval_dataset(run, test.subset(np.flatnonzero(keep))),
                                        (1, 2, 4, 8))
    for key in ("nmi", "f1", "recall@1", "recall@8", "map@r"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert metrics["recall@8"] >= metrics["recall@1"]
