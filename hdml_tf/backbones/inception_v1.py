"""InceptionV1 (GoogLeNet, Szegedy et al. 2015) without auxiliary heads, in the two layouts ImageNet weights come in.

`caffe` is the BVLC GoogLeNet that the paper used, computed as the official HDML code computes it
(lib/GoogleNet_Model.py `forward`): explicit zero paddings before every VALID convolution and pooling, biases, ReLU
after every convolution, no BatchNorm, a true 5x5 convolution in the third branch, and local response normalization
after pool1 and after conv2/3x3. `slim` is TF-Slim's `inception_v1` (nets/inception_v1.py `inception_v1_base`): SAME
padding, convolutions without bias followed by BatchNorm (scale=False, epsilon 0.001) and ReLU, a 3x3 convolution in
the "5x5" branch and a 2x2 MaxPool_5a.

Both are one table (`ARCHITECTURE`: stem units, pools, Inception blocks) walked by one builder. Every layer carries
the name of its source variable scope with "/" written as "." (Keras 3 forbids "/" in layer names), e.g.
`Mixed_5b.Branch_2.Conv2d_0a_3x3` or `inception_3a.5x5_reduce`, so loading foreign weights is a name map
(hdml_tf/backbones/weights.py).

Shapes: images `[B, S, S, 3]` RGB 0..255 -> features `[B, 1024]` float32 (global average of the last 1024-channel
map; at the official 227 px Caffe input that map is 7x7, so this equals the official 7x7 average pool).
"""
from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from hdml_tf.backbones.preprocessing import preprocessing_layer
from hdml_tf.errors import HDMLError

CAFFE = "caffe"
SLIM = "slim"
LAYOUTS = (CAFFE, SLIM)
FEATURE_DIM = 1024
# TF-Slim inception_arg_scope: batch_norm_epsilon=0.001, batch_norm_scale=False. Slim trained with decay 0.9997;
# we keep Keras' 0.99 so moving statistics follow short fine-tuning schedules (the moving values are loaded anyway).
SLIM_BN_EPSILON = 1e-3
SLIM_BN_MOMENTUM = 0.99
# Official code: tf.nn.local_response_normalization(depth_radius=5, alpha=0.0001, beta=0.75) with TF's bias=1.
OFFICIAL_LRN = dict(depth_radius=5, alpha=1e-4, beta=0.75, bias=1.0)
# Caffe's own LRN layer in BVLC GoogLeNet: local_size 5, alpha 1e-4, beta 0.75, k 1; Caffe divides alpha by
# local_size and its window of 5 channels is a TF depth_radius of 2.
CAFFE_LRN = dict(depth_radius=2, alpha=1e-4 / 5, beta=0.75, bias=1.0)


def layer_name(source_name: str) -> str:
    """Keras layer name of a source scope: "Mixed_3b/Branch_1/Conv2d_0b_3x3" -> "Mixed_3b.Branch_1.Conv2d_0b_3x3"."""
    return source_name.replace("/", ".")


def source_name(keras_layer_name: str) -> str:
    """Inverse of `layer_name`: "inception_3a.5x5" -> "inception_3a/5x5"."""
    return keras_layer_name.replace(".", "/")


# ---------------------------------------------------------------------------------------------------------------
# The architecture table. Slim and Caffe share channel counts; they differ in names, padding, LRN and MaxPool_5a.
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Conv:
    """A stem convolution: `filters` outputs, square `kernel`, `stride`."""
    slim: str
    caffe: str
    filters: int
    kernel: int
    stride: int = 1


@dataclasses.dataclass(frozen=True)
class Pool:
    """A stride-2 max pool. Slim pads SAME; Caffe (official code) pads `caffe_pad` (top/left, bottom/right) then
    pools VALID, which reproduces Caffe's ceil-mode output size."""
    slim: str
    caffe: str
    slim_size: int = 3
    caffe_pad: int = 1  # 1: pad bottom/right by one (tf.pad [[0, 1], [0, 1]]); 0: no padding


@dataclasses.dataclass(frozen=True)
class LRN:
    """Local response normalization; Caffe layout only (slim has none)."""
    caffe: str


@dataclasses.dataclass(frozen=True)
class Block:
    """An Inception module: filters = (1x1; 3x3 reduce, 3x3; 5x5 reduce, 5x5; pool projection)."""
    slim: str
    caffe: str
    filters: tuple


ARCHITECTURE = (
    Conv("Conv2d_1a_7x7", "conv1/7x7_s2", 64, 7, stride=2),
    Pool("MaxPool_2a_3x3", "pool1/3x3_s2", caffe_pad=1),
    LRN("pool1/norm1"),
    Conv("Conv2d_2b_1x1", "conv2/3x3_reduce", 64, 1),
    Conv("Conv2d_2c_3x3", "conv2/3x3", 192, 3),
    LRN("conv2/norm2"),
    Pool("MaxPool_3a_3x3", "pool2/3x3_s2", caffe_pad=0),  # the official code pools conv2 without padding
    Block("Mixed_3b", "inception_3a", (64, 96, 128, 16, 32, 32)),
    Block("Mixed_3c", "inception_3b", (128, 128, 192, 32, 96, 64)),
    Pool("MaxPool_4a_3x3", "pool3/3x3_s2", caffe_pad=1),
    Block("Mixed_4b", "inception_4a", (192, 96, 208, 16, 48, 64)),
    Block("Mixed_4c", "inception_4b", (160, 112, 224, 24, 64, 64)),
    Block("Mixed_4d", "inception_4c", (128, 128, 256, 24, 64, 64)),
    Block("Mixed_4e", "inception_4d", (112, 144, 288, 32, 64, 64)),
    Block("Mixed_4f", "inception_4e", (256, 160, 320, 32, 128, 128)),
    Pool("MaxPool_5a_2x2", "pool4/3x3_s2", slim_size=2, caffe_pad=1),
    Block("Mixed_5b", "inception_5a", (256, 160, 320, 32, 128, 128)),
    Block("Mixed_5c", "inception_5b", (384, 192, 384, 48, 128, 128)),
)

# The six convolutions of a block, in `Block.filters` order: (name in slim, name in Caffe, kernel size per layout).
_BRANCH_CONVS = (
    ("Branch_0/Conv2d_0a_1x1", "1x1", {SLIM: 1, CAFFE: 1}),
    ("Branch_1/Conv2d_0a_1x1", "3x3_reduce", {SLIM: 1, CAFFE: 1}),
    ("Branch_1/Conv2d_0b_3x3", "3x3", {SLIM: 3, CAFFE: 3}),
    ("Branch_2/Conv2d_0a_1x1", "5x5_reduce", {SLIM: 1, CAFFE: 1}),
    ("Branch_2/Conv2d_0b_3x3", "5x5", {SLIM: 3, CAFFE: 5}),  # slim replaced Caffe's 5x5 by a 3x3
    ("Branch_3/Conv2d_0b_1x1", "pool_proj", {SLIM: 1, CAFFE: 1}),
)
# TF-Slim (nets/inception_v1.py) scopes Mixed_5b's Branch_2 3x3 convolution "Conv2d_0a_3x3", so its checkpoints do too.
_SLIM_NAME_QUIRKS = {"Mixed_5b/Branch_2/Conv2d_0b_3x3": "Mixed_5b/Branch_2/Conv2d_0a_3x3"}
_SLIM_BRANCH_POOL = "Branch_3/MaxPool_0a_3x3"
_CAFFE_BRANCH_POOL = "pool"


def block_conv_names(block: Block, layout: str) -> tuple:
    """Source names of the six convolutions of `block`, e.g. ("Mixed_3b/Branch_0/Conv2d_0a_1x1", ...)."""
    if layout == SLIM:
        names = tuple(f"{block.slim}/{slim}" for slim, _, _ in _BRANCH_CONVS)
        return tuple(_SLIM_NAME_QUIRKS.get(n, n) for n in names)
    return tuple(f"{block.caffe}/{caffe}" for _, caffe, _ in _BRANCH_CONVS)


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="hdml_tf")
class LocalResponseNormalization(keras.layers.Layer):
    """Across-channel LRN, `tf.nn.local_response_normalization`, computed in float32.

    out[..., c] = x[..., c] / (bias + alpha * sum_{c' = c - r}^{c + r} x[..., c']^2) ** beta, r = depth_radius.
    The defaults are the official HDML code's call (`OFFICIAL_LRN`); `LocalResponseNormalization.caffe()` gives
    Caffe's own LRN (`CAFFE_LRN`). Input and output `[B, H, W, C]`.
    """

    def __init__(self, depth_radius=5, alpha=1e-4, beta=0.75, bias=1.0, **kwargs):
        kwargs.setdefault("autocast", False)  # float16 LRN is not available on every device; cast ourselves
        super().__init__(**kwargs)
        self.depth_radius = int(depth_radius)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.bias = float(bias)

    @classmethod
    def caffe(cls, **kwargs):
        """Caffe's LRN (local_size 5 -> radius 2, alpha / 5)."""
        return cls(**CAFFE_LRN, **kwargs)

    def call(self, x):
        y = tf.nn.local_response_normalization(
            tf.cast(x, tf.float32), depth_radius=self.depth_radius, bias=self.bias, alpha=self.alpha,
            beta=self.beta)
        return tf.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "depth_radius": self.depth_radius, "alpha": self.alpha,
                "beta": self.beta, "bias": self.bias}


def _pad(x, amount, name):
    """Zero padding as the official code's tf.pad: int -> symmetric; ((t, b), (l, r)) as given."""
    return keras.layers.ZeroPadding2D(amount, name=name)(x)


def _conv(x, source, filters, kernel, stride, layout):
    """One convolution unit, named after `source`.

    Caffe: pad kernel // 2 on every side (official tf.pad), VALID conv with bias, ReLU.
    Slim: SAME conv without bias, BatchNorm(scale=False) named `<source>/BatchNorm`, ReLU.
    """
    name = layer_name(source)
    if layout == CAFFE:
        if kernel > 1:
            x = _pad(x, kernel // 2, name + ".pad")
        x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="valid", use_bias=True, name=name)(x)
        return keras.layers.ReLU(name=name + ".relu")(x)
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=name)(x)
    x = keras.layers.BatchNormalization(scale=False, epsilon=SLIM_BN_EPSILON, momentum=SLIM_BN_MOMENTUM,
                                        name=name + ".BatchNorm")(x)
    return keras.layers.ReLU(name=name + ".Relu")(x)


def _pool(x, unit: Pool, layout):
    if layout == SLIM:
        return keras.layers.MaxPooling2D(unit.slim_size, strides=2, padding="same", name=layer_name(unit.slim))(x)
    name = layer_name(unit.caffe)
    if unit.caffe_pad:
        x = _pad(x, ((0, unit.caffe_pad), (0, unit.caffe_pad)), name + ".pad")
    return keras.layers.MaxPooling2D(3, strides=2, padding="valid", name=name)(x)


def _inception_block(x, block: Block, layout):
    """Four parallel branches concatenated on channels: 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 (slim: 3x3) | pool -> 1x1.

    `[B, H, W, C_in]` -> `[B, H, W, sum(filters[0, 2, 4, 5])]`.
    """
    names = block_conv_names(block, layout)
    kernels = [k[layout] for _, _, k in _BRANCH_CONVS]
    f = block.filters

    def unit(inputs, i):
        return _conv(inputs, names[i], f[i], kernels[i], 1, layout)

    branch_0 = unit(x, 0)
    branch_1 = unit(unit(x, 1), 2)
    branch_2 = unit(unit(x, 3), 4)
    if layout == SLIM:
        pooled = keras.layers.MaxPooling2D(3, strides=1, padding="same",
                                           name=layer_name(f"{block.slim}/{_SLIM_BRANCH_POOL}"))(x)
        out_name = block.slim
    else:
        pool_name = layer_name(f"{block.caffe}/{_CAFFE_BRANCH_POOL}")
        pooled = keras.layers.MaxPooling2D(3, strides=1, padding="valid", name=pool_name)(
            _pad(x, 1, pool_name + ".pad"))
        out_name = f"{block.caffe}/output"
    branch_3 = unit(pooled, 5)
    return keras.layers.Concatenate(axis=-1, name=layer_name(out_name))([branch_0, branch_1, branch_2, branch_3])


def inception_v1_graph(layout: str, image_size: int, caffe_lrn: bool = False):
    """The InceptionV1 feature graph, randomly initialized (load weights with `load_backbone_weights`).

    Args:
        layout: "caffe" (BVLC GoogLeNet as the official HDML code runs it) or "slim" (TF-Slim inception_v1).
        image_size: S of the `[B, S, S, 3]` input; any S >= 32 gives a valid network (64 and up is tested).
        caffe_lrn: Caffe layout only. False (default): the official code's LRN (radius 5, alpha 1e-4), which is what
            reproduces the paper; True: Caffe's own LRN (radius 2, alpha 2e-5).

    Returns:
        (images, features): the Keras input RGB 0..255 `[B, S, S, 3]` and the float32 `[B, 1024]` output, for
        `hdml_tf.backbones.Backbone` to wrap. The layout's preprocessing is the first layer.
    """
    if layout not in LAYOUTS:
        raise HDMLError(f"unknown InceptionV1 layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if caffe_lrn and layout != CAFFE:
        raise HDMLError("caffe_lrn applies to inception_v1_caffe only (TF-Slim's InceptionV1 has no LRN)")
    lrn = CAFFE_LRN if caffe_lrn else OFFICIAL_LRN

    images = keras.Input((image_size, image_size, 3), name="images")
    x = preprocessing_layer(layout)(images)
    for unit in ARCHITECTURE:
        if isinstance(unit, Conv):
            x = _conv(x, getattr(unit, layout), unit.filters, unit.kernel, unit.stride, layout)
        elif isinstance(unit, Pool):
            x = _pool(x, unit, layout)
        elif isinstance(unit, LRN):
            if layout == CAFFE:
                x = LocalResponseNormalization(**lrn, name=layer_name(unit.caffe))(x)
        else:
            x = _inception_block(x, unit, layout)
    # Official: avg_pool 7x7 VALID on the 7x7 map of a 227 px input, reshaped to [B, 1024]; global pooling is the
    # same there and stays valid at other sizes. float32 output under mixed precision.
    features = keras.layers.GlobalAveragePooling2D(name="global_pool", dtype="float32")(x)
    return images, features
