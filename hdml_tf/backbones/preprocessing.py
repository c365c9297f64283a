"""Input normalization bound to a backbone layout, as Keras layers that sit first inside the backbone.

Every pipeline hands the backbone float32 RGB images with values in 0..255 (see docs/ARCHITECTURE.md). Each layout
expects those pixels normalized the way its ImageNet weights were trained, so the normalization lives inside the
backbone model and a user cannot pair weights with the wrong preprocessing:

- TF-Slim `inception_v1` (slim `inception_preprocessing`): RGB scaled to [-1, 1], x / 127.5 - 1.
  Hand-worked: 0 -> -1, 127.5 -> 0, 255 -> 1.
- Caffe BVLC GoogLeNet as the official HDML code feeds it (lib/nn_Ops.py `batch_data` reverses the channels to BGR,
  then subtracts FLAGS.py `image_mean` = (104, 117, 123) in BGR order). Hand-worked: RGB pixel (R, G, B) ->
  (B - 104, G - 117, R - 123).
- keras.applications ResNet-50 (`resnet50.preprocess_input`, "caffe" mode): the same BGR flip with the means
  (103.939, 116.779, 123.68).

Both layers compute in float32 whatever the input dtype (uint8 or float) and return the layer's compute dtype, so
they work under a Keras mixed-precision policy without rounding 0..255 pixels to float16 first.
"""
from __future__ import annotations

import keras
from keras import ops

from hdml_tf.errors import HDMLError

# FLAGS.py of the official code: image_mean (123, 117, 104) RGB, reordered to BGR before subtraction.
CAFFE_GOOGLENET_MEAN_BGR = (104.0, 117.0, 123.0)
# keras.applications.imagenet_utils, mode "caffe" (used by ResNet50.preprocess_input).
KERAS_RESNET_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="hdml_tf")
class SlimPreprocessing(keras.layers.Layer):
    """RGB 0..255 -> RGB in [-1, 1], as TF-Slim's inception preprocessing.

    Input `[B, H, W, 3]` (uint8 or float, RGB, 0..255); output `[B, H, W, 3]` = x / 127.5 - 1.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("autocast", False)  # keep 0..255 in float32 until normalized
        super().__init__(**kwargs)

    def call(self, images):
        x = ops.cast(images, "float32")
        return ops.cast(x / 127.5 - 1.0, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="hdml_tf")
class CaffePreprocessing(keras.layers.Layer):
    """RGB 0..255 -> BGR minus a per-channel mean, as Caffe models expect.

    Input `[B, H, W, 3]` (uint8 or float, RGB, 0..255); output `[B, H, W, 3]` with channel 0 = B - mean_bgr[0],
    channel 1 = G - mean_bgr[1], channel 2 = R - mean_bgr[2].

    Args:
        mean_bgr: the three means in BGR order; the default is the official HDML code's (104, 117, 123).
    """

    def __init__(self, mean_bgr=CAFFE_GOOGLENET_MEAN_BGR, **kwargs):
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if len(mean_bgr) != 3:
            raise HDMLError(f"CaffePreprocessing needs 3 means in BGR order, got {tuple(mean_bgr)}")
        self.mean_bgr = tuple(float(m) for m in mean_bgr)

    def call(self, images):
        x = ops.cast(images, "float32")
        bgr = ops.flip(x, axis=-1)  # lib/nn_Ops.py batch_data: channels [2, 1, 0]
        mean = ops.convert_to_tensor(self.mean_bgr, dtype="float32")
        return ops.cast(bgr - mean, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean_bgr": list(self.mean_bgr)}


def preprocessing_layer(layout: str, name: str = "preprocess") -> keras.layers.Layer:
    """The normalization layer of a layout: "slim", "caffe" (BVLC GoogLeNet) or "keras_resnet"."""
    if layout == "slim":
        return SlimPreprocessing(name=name)
    if layout == "caffe":
        return CaffePreprocessing(CAFFE_GOOGLENET_MEAN_BGR, name=name)
    if layout == "keras_resnet":
        return CaffePreprocessing(KERAS_RESNET_MEAN_BGR, name=name)
    raise HDMLError(f"unknown preprocessing layout {layout!r}; expected one of slim, caffe, keras_resnet")
