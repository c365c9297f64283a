"""ResNet-50 features from keras.applications, with its Caffe-style preprocessing inside the model.

Shapes: images `[B, S, S, 3]` RGB 0..255 -> features `[B, 2048]` float32 (global average pool of the last stage).
The keras.applications network is a nested sub-model named "resnet50" whose own layer names (`conv1_conv`,
`conv2_block1_1_conv`, ...) are Keras' published ones, so Keras' weight files load into it unchanged.
"""
from __future__ import annotations

import keras

from hdml_tf.backbones.preprocessing import preprocessing_layer
from hdml_tf.errors import HDMLError

FEATURE_DIM = 2048
LAYOUT = "keras_resnet"
INNER_NAME = "resnet50"
NOTOP_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/" + NOTOP_FILE


def _keras_resnet50(image_size: int, weights):
    """keras.applications.ResNet50 without its classifier; any fetch failure becomes one HDMLError."""
    try:
        return keras.applications.ResNet50(include_top=False, weights=weights, pooling="avg",
                                           input_shape=(image_size, image_size, 3), name=INNER_NAME)
    except Exception as e:  # noqa: BLE001 - Keras raises a bare Exception when the download fails
        if weights != "imagenet":
            raise
        reason = " ".join(str(e).split())[:200]
        raise HDMLError(
            f"could not fetch the ImageNet weights of ResNet-50 ({reason}); on a machine with internet download "
            f"{NOTOP_URL} (or save keras.applications.ResNet50(include_top=False).save_weights('r50.weights.h5')) "
            f"and pass weights=PATH to that .h5 / .weights.h5 file (--weights=PATH on the command line)") from None


def resnet50_graph(image_size: int, weights=None):
    """The ResNet-50 feature graph.

    Args:
        image_size: S of the `[B, S, S, 3]` input (S >= 32, Keras' minimum).
        weights: None (random) or "imagenet" (fetched by Keras into ~/.keras/models; offline without a cached copy
            this raises one HDMLError saying how to pass a local file). A file path is loaded by
            `hdml_tf.backbones.load_backbone_weights`, not here.

    Returns:
        (images, features): the Keras input RGB 0..255 `[B, S, S, 3]` and the float32 `[B, 2048]` output, for
        `hdml_tf.backbones.Backbone` to wrap.
    """
    if weights not in (None, "imagenet"):
        raise HDMLError(f"build_resnet50 takes weights=None or 'imagenet', got {weights!r}")
    images = keras.Input((image_size, image_size, 3), name="images")
    x = preprocessing_layer(LAYOUT)(images)  # keras.applications.resnet50.preprocess_input, inside the model
    x = _keras_resnet50(image_size, weights)(x)
    features = keras.layers.Activation("linear", dtype="float32", name="features")(x)
    return images, features
