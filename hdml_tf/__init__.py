"""hdml_tf: Hardness-Aware Deep Metric Learning (Zheng et al., CVPR 2019) on TensorFlow 2 / Keras 3.

The public API, for your own training script (README, "From your own training script"):

    import hdml_tf
    geometry = hdml_tf.geometry("cub200", "inception_v1_caffe")             # resize 256, crop 227, flips
    train, test = hdml_tf.load_dataset("cub200", data_dir="/data")
    config = hdml_tf.HDMLConfig(loss="npair", embedding_size=256)           # the paper's method
    model = hdml_tf.HDMLModel(hdml_tf.build_backbone("inception_v1_caffe", 227, weights="googlenet.mat"),
                              num_classes=train.num_classes, config=config)
    model.compile(**hdml_tf.make_optimizers(hdml_tf.OptimConfig()))
    model.fit(hdml_tf.make_train_dataset(train, config.loss, 128, geometry), epochs=16, steps_per_epoch=500,
              callbacks=[hdml_tf.EvaluationCallback(hdml_tf.make_eval_dataset(test, 64, geometry))])

Names are imported on first use (PEP 562), so `import hdml_tf` itself does not import TensorFlow.

- configuration: `HDMLConfig` (the method), `OptimConfig` (optimizers), `RunConfig` (a whole run, as the tools)
- model: `HDMLModel`, `make_optimizers`, `build_backbone`, `Backbone`, `load_backbone_weights`, `layouts`
- data: `load_dataset`, `geometry`, `make_train_dataset`, `make_eval_dataset`, `ImageSet`, `datasets`
- evaluation: `EvaluationCallback`, `EvaluationProtocol`, `EvaluationFiles`, `evaluate`, `embed_dataset`,
  `format_results`, `split_validation_classes`
- serving and runs: `export_saved_model`, `load_embedder`, `save_keras`, `load_keras`, `RunDir`, `run_experiment`
- diagnostics and comparisons: `StepLog` (every step's logged values), `parse_variant`, `Comparison`
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "HDMLConfig": "hdml_tf.config", "OptimConfig": "hdml_tf.config", "RunConfig": "hdml_tf.config",
    "ConfigError": "hdml_tf.errors", "HDMLError": "hdml_tf.errors", "DataError": "hdml_tf.errors",
    "WeightsError": "hdml_tf.errors",
    "HDMLModel": "hdml_tf.model", "make_optimizers": "hdml_tf.model",
    "build_backbone": "hdml_tf.backbones", "Backbone": "hdml_tf.backbones",
    "load_backbone_weights": "hdml_tf.backbones", "BACKBONES": "hdml_tf.backbones",
    "load_dataset": "hdml_tf.data.datasets", "geometry": "hdml_tf.data.datasets",
    "make_train_dataset": "hdml_tf.data.pipeline", "make_eval_dataset": "hdml_tf.data.pipeline",
    "ImageSet": "hdml_tf.data.image_set",
    "EvaluationCallback": "hdml_tf.evaluation", "EvaluationProtocol": "hdml_tf.evaluation",
    "EvaluationFiles": "hdml_tf.evaluation", "evaluate": "hdml_tf.evaluation", "embed_dataset": "hdml_tf.evaluation",
    "format_results": "hdml_tf.evaluation", "split_validation_classes": "hdml_tf.evaluation",
    "export_saved_model": "hdml_tf.serving", "load_embedder": "hdml_tf.rundir", "save_keras": "hdml_tf.rundir",
    "load_keras": "hdml_tf.rundir", "RunDir": "hdml_tf.rundir", "run_experiment": "hdml_tf.experiment",
    "StepLog": "hdml_tf.diagnostics", "parse_variant": "hdml_tf.variants", "Comparison": "hdml_tf.comparison",
}
#: Sub-modules reachable as attributes (`hdml_tf.layouts.get("triplet")`).
_MODULES = ("layouts", "losses", "hardness", "datasets")

__all__ = sorted(_EXPORTS) + list(_MODULES) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module("hdml_tf.data.datasets" if name == "datasets" else f"hdml_tf.{name}")
    else:
        raise AttributeError(f"module 'hdml_tf' has no attribute {name!r}")
    globals()[name] = value  # imported once
    return value


def __dir__():
    return __all__
