"""Backbones: images `[B, S, S, 3]` RGB 0..255 -> features `[B, D]` float32, preprocessing inside the model.

    from hdml_tf.backbones import build_backbone
    net = build_backbone("inception_v1_caffe", 227, weights="tf_ckpt_from_caffe.mat")  # the paper's network
    features = net(images)                                                              # [B, 1024]

Names (`BACKBONES`):
- "inception_v1_caffe": the BVLC GoogLeNet the paper used, computed as the official HDML code does (LRN, 5x5
  branches, biases, no BatchNorm); ImageNet weights: the Caffe `.mat` of the official code. D = 1024, 227 px.
- "inception_v1_slim": TF-Slim's inception_v1 (BatchNorm, 3x3 in the "5x5" branch); ImageNet weights: slim's
  `inception_v1.ckpt` (inception_v1_2016_08_28). D = 1024, 224 px.
- "resnet50": keras.applications ResNet-50 (weights="imagenet" is fetched by Keras when online). D = 2048, 224 px.

Layer names follow the source files so loading is a name map (`load_backbone_weights`, tools/convert_weights.py).
"""
from __future__ import annotations

import dataclasses

import keras

from hdml_tf.backbones import inception_v1, resnet
from hdml_tf.backbones.weights import LoadReport, WeightSource, detect_format, load_backbone_weights, read_weights
from hdml_tf.errors import HDMLError

__all__ = ["BACKBONES", "Backbone", "BackboneInfo", "build_backbone", "default_image_size", "load_backbone_weights",
           "detect_format", "read_weights", "LoadReport", "WeightSource", "MIN_IMAGE_SIZE"]

#: The smallest input any backbone takes (keras.applications' minimum for ResNet-50); see BackboneInfo.min_image_size.
MIN_IMAGE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a backbone: feature size D, ImageNet input size S, layout of its weights, the smallest
    input it takes, the Keras model name, and where its ImageNet weights come from."""
    feature_dim: int
    image_size: int
    layout: str
    weights_hint: str
    min_image_size: int = MIN_IMAGE_SIZE
    model_name: str = ""


BACKBONES = {
    "inception_v1_caffe": BackboneInfo(
        inception_v1.FEATURE_DIM, 227, inception_v1.CAFFE,
        "the BVLC GoogLeNet .mat of the official HDML code (tf_ckpt_from_caffe.mat)",
        min_image_size=35, model_name="inception_v1_caffe"),  # 34 px: VALID pools shrink a map below 1 x 1
    "inception_v1_slim": BackboneInfo(
        inception_v1.FEATURE_DIM, 224, inception_v1.SLIM,
        "TF-Slim's inception_v1.ckpt (inception_v1_2016_08_28.tar.gz)", model_name="inception_v1_slim"),
    "resnet50": BackboneInfo(
        resnet.FEATURE_DIM, 224, resnet.LAYOUT,
        "weights='imagenet' (fetched by Keras) or a keras.applications ResNet50 notop .h5 / .weights.h5",
        model_name="resnet50_backbone"),
}


def _info(name: str) -> BackboneInfo:
    if name not in BACKBONES:
        raise HDMLError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def default_image_size(name: str) -> int:
    """The input size the ImageNet weights were trained at: 227 (inception_v1_caffe), 224 (slim, resnet50)."""
    return _info(name).image_size


@keras.saving.register_keras_serializable(package="hdml_tf")
class Backbone(keras.Model):
    """A feature network that knows what it is: images `[B, S, S, 3]` RGB 0..255 → features `[B, D]` float32.

    A functional model built from its name (as keras-hub's backbones are), so its config is just its constructor
    arguments: a `.keras` file or `keras.saving.serialize_keras_object` round-trip gives back a `Backbone` with the
    same `backbone_name`, `weights_layout` and `image_size`, and loading foreign weights stays a name map.

    Args:
      backbone_name: one of `BACKBONES`.
      image_size: S, >= the backbone's `min_image_size`.
      caffe_lrn: inception_v1_caffe only (see `build_backbone`).
      imagenet_download: resnet50 only: let Keras fetch its ImageNet weights while building.
    """

    def __init__(self, backbone_name: str, image_size: int, caffe_lrn: bool = False,
                 imagenet_download: bool = False, **kwargs):
        info = _info(backbone_name)
        trainable = kwargs.pop("trainable", True)
        kwargs.setdefault("name", info.model_name)
        if backbone_name == "resnet50":
            inputs, outputs = resnet.resnet50_graph(image_size, "imagenet" if imagenet_download else None)
        else:
            inputs, outputs = inception_v1.inception_v1_graph(info.layout, image_size, caffe_lrn=caffe_lrn)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.backbone_name = backbone_name
        self.weights_layout = info.layout
        self.image_size = int(image_size)
        self.caffe_lrn = bool(caffe_lrn)
        self.trainable = trainable

    def get_config(self):
        return {"backbone_name": self.backbone_name, "image_size": self.image_size, "caffe_lrn": self.caffe_lrn,
                "name": self.name, "trainable": self.trainable}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config)

def build_backbone(name: str, image_size: int, weights=None, caffe_lrn: bool = False, trainable: bool = True):
    """Build a backbone and optionally load its ImageNet weights.

    Args:
        name: one of `BACKBONES`.
        image_size: S of the `[B, S, S, 3]` input, >= 32 (tested from 64 up).
        weights: None (random initialization); a path to a weights file, loaded by name and verified
            (`load_backbone_weights`, format detected from the file); or "imagenet" for resnet50 (downloaded by Keras).
        caffe_lrn: inception_v1_caffe only. False (default) uses the official HDML code's LRN (depth_radius 5,
            alpha 1e-4, beta 0.75, bias 1), which reproduces the paper; True uses Caffe's own LRN (radius 2,
            alpha 2e-5).
        trainable: False freezes every layer (BatchNorm then runs in inference mode).

    Returns:
        `Backbone` mapping float32 (or uint8) `[B, S, S, 3]` RGB 0..255 to float32 `[B, D]`, D =
        `BACKBONES[name].feature_dim`; attributes `backbone_name`, `weights_layout`, `image_size` and, when a file
        was loaded, `weights_report` (a LoadReport).

    Raises:
        HDMLError: unknown name, bad image size or option; WeightsError for a weights file that does not fit.
    """
    info = _info(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < info.min_image_size:
        raise HDMLError(f"image_size must be an integer >= {info.min_image_size} for {name}, got {image_size!r}")
    if caffe_lrn and name != "inception_v1_caffe":
        raise HDMLError(f"caffe_lrn applies to inception_v1_caffe only, not {name}")
    if weights == "imagenet" and name != "resnet50":
        raise HDMLError(f"{name} has no automatic ImageNet download; pass weights=PATH to {info.weights_hint}")
    model = Backbone(name, image_size, caffe_lrn=caffe_lrn, imagenet_download=weights == "imagenet")
    if weights not in (None, "imagenet"):
        model.weights_report = load_backbone_weights(model, weights)
    model.trainable = trainable
    return model
