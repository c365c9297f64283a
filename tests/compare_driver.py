"""tools/compare.py with a tiny CNN in place of InceptionV1, for the end-to-end tests of tests/test_compare.py.

    python tests/compare_driver.py [tools/compare.py flags]

Everything else is the real tool: flags, the digits data set, `run_experiment` (training, evaluation, run
directories, per-step logs), the report. The tiny backbone is seeded by the run (`_build_model` seeds Keras before
building), so runs of one seed start from the same weights.
"""
import os
import runpy
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_backbone(name, image_size, weights=None, caffe_lrn=False, trainable=True):
    import keras
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(32, name="fc")(x)
    model = keras.Model(inputs, x, name="tiny_backbone")
    model.backbone_name = name
    return model


if __name__ == "__main__":
    import hdml_tf.backbones
    hdml_tf.backbones.build_backbone = tiny_backbone
    tool = os.path.join(ROOT, "tools", "compare.py")
    sys.argv = [tool] + sys.argv[1:]
    runpy.run_path(tool, run_name="__main__")
