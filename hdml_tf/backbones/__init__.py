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

from hdml_tf.backbones import inception_v1, resnet
from hdml_tf.backbones.weights import LoadReport, WeightSource, detect_format, load_backbone_weights, read_weights
from hdml_tf.errors import HDMLError

__all__ = ["BACKBONES", "BackboneInfo", "build_backbone", "default_image_size", "load_backbone_weights",
           "detect_format", "read_weights", "LoadReport", "WeightSource", "MIN_IMAGE_SIZE"]

MIN_IMAGE_SIZE = 32  # keras.applications' minimum for ResNet-50; both InceptionV1 layouts are valid from here


@dataclasses.dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a backbone: feature size D, default input size S, layout of its weights."""
    feature_dim: int
    image_size: int
    layout: str
    weights_hint: str


BACKBONES = {
    "inception_v1_caffe": BackboneInfo(
        inception_v1.FEATURE_DIM, 227, inception_v1.CAFFE,
        "the BVLC GoogLeNet .mat of the official HDML code (tf_ckpt_from_caffe.mat)"),
    "inception_v1_slim": BackboneInfo(
        inception_v1.FEATURE_DIM, 224, inception_v1.SLIM,
        "TF-Slim's inception_v1.ckpt (inception_v1_2016_08_28.tar.gz)"),
    "resnet50": BackboneInfo(
        resnet.FEATURE_DIM, 224, resnet.LAYOUT,
        "weights='imagenet' (fetched by Keras) or a keras.applications ResNet50 notop .h5 / .weights.h5"),
}


def _info(name: str) -> BackboneInfo:
    if name not in BACKBONES:
        raise HDMLError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def default_image_size(name: str) -> int:
    """The input size the ImageNet weights were trained at: 227 (inception_v1_caffe), 224 (slim, resnet50)."""
    return _info(name).image_size


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
        keras.Model mapping float32 (or uint8) `[B, S, S, 3]` RGB 0..255 to float32 `[B, D]`, D =
        `BACKBONES[name].feature_dim`; attributes `backbone_name`, `layout` and, when a file was loaded,
        `weights_report` (a LoadReport).

    Raises:
        HDMLError: unknown name, bad image size or option; WeightsError for a weights file that does not fit.
    """
    info = _info(name)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise HDMLError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    if caffe_lrn and name != "inception_v1_caffe":
        raise HDMLError(f"caffe_lrn applies to inception_v1_caffe only, not {name}")
    if weights == "imagenet" and name != "resnet50":
        raise HDMLError(f"{name} has no automatic ImageNet download; pass weights=PATH to {info.weights_hint}")
    if name == "resnet50":
        model = resnet.build_resnet50(image_size, weights="imagenet" if weights == "imagenet" else None)
    else:
        model = inception_v1.build_inception_v1(info.layout, image_size, caffe_lrn=caffe_lrn)
    if weights not in (None, "imagenet"):
        model.weights_report = load_backbone_weights(model, weights)
    model.trainable = trainable
    return model
