"""Serving: a TensorFlow SavedModel of an embedding network, loadable with nothing but TensorFlow.

`export_saved_model` writes the embedding network only (backbone + metric head + L2 normalization; no generator, no
classifier) with the evaluation preprocessing inside the graph, so it loads with `tf.saved_model.load` or TF Serving
and needs no hdml_tf at serving time. This module needs an embedder (any Keras model images → embeddings, or an
object with an `embedder()` method such as `HDMLModel`), never the training model itself: it sits below
`hdml_tf.model`. Serving signatures, all returning `{"embeddings": float32 [B, E]}`, L2-normalized:

- `serving_default` = `embed_images`: `images` float32 `[B, H, W, C]`, RGB values 0..255 (not 0..1), any H, W;
  C = 3 (RGB), 1 (gray, replicated), 4 (RGBA, alpha dropped) or 2 (gray + alpha).
- `embed_images_uint8`: the same for `images` uint8.
- `embed_bytes`: `image_bytes` string `[B]`, each an encoded JPEG / PNG / GIF / BMP of any size and color mode
  (`tf.io.decode_image(channels=3, expand_animations=False)` per image inside `tf.map_fn`). The `_bytes` suffix
  lets TF Serving's REST API take `{"b64": ...}` values.

Preprocessing is the data pipeline's evaluation path (`hdml_tf.data.pipeline.make_eval_dataset`): squash to a square
`resize` x `resize` (bilinear, no anti-aliasing, rounded to uint8 like the pipeline's decoded images, aspect ratio NOT
kept), take the center `image_size` x `image_size` window (offset ceil((resize - image_size) / 2)), feed float32
0..255 to the backbone, whose first layers do its layout's normalization. Float input is rounded to integer pixel
values by the same step, so uint8 and float images of the same pixels give identical embeddings. The geometry is
the one rule of `hdml_tf.data.datasets.geometry` (a run directory records the run's own).

Inputs are checked inside the graph (so TF Serving callers get the same answers): an empty batch returns an empty
`[0, E]` result; a float image with a NaN or Inf pixel is an error naming its batch index (NaN would otherwise round
to black and embed silently); an `image_bytes` item that is not a JPEG / PNG / GIF / BMP / WebP (empty, text, a web
page) is an error naming its index. `SavedModelEmbedder` / `ModelEmbedder` turn these into one-line `HDMLError`s,
and their `embed_bytes` names the index of an item that starts like an image but cannot be decoded (truncated).

The same functions are attributes of the loaded object: `loaded.embed_images(x)` (float32 or uint8),
`loaded.embed_bytes(b)`, and `loaded.metadata()` -> {embedding_size, image_size, resize, backbone,
hdml_tf_version} as tensors. The metadata is also written as JSON to `<export_dir>/assets.extra/hdml_tf.json`
(readable without TensorFlow). `SavedModelEmbedder` loads such a directory back as a callable.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Dict, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from hdml_tf import __version__
from hdml_tf.data.images import Augment, center_offset, decode_rgb, resize_square
from hdml_tf.errors import HDMLError

#: Signature names of the SavedModel.
SIGNATURE_IMAGES = "embed_images"
SIGNATURE_IMAGES_UINT8 = "embed_images_uint8"
SIGNATURE_BYTES = "embed_bytes"
OUTPUT_KEY = "embeddings"
#: Metadata file beside the SavedModel (TF Serving's place for extra files).
METADATA_FILE = os.path.join("assets.extra", "hdml_tf.json")
#: Largest |difference| accepted between the reloaded SavedModel and the in-process model (`verify=True`).
VERIFY_TOLERANCE = 1e-5


@dataclasses.dataclass(frozen=True)
class EmbeddingInfo:
    """What a user of an exported embedding needs to know.

    Attributes:
      embedding_size: E, the size of the L2-normalized embeddings.
      image_size: S, the side of the center crop fed to the backbone.
      resize: R >= S, the side of the square every image is squashed to before cropping.
      backbone: backbone name ("inception_v1_slim", ...) or "" when unknown.
      hdml_tf_version: version of hdml_tf that wrote the file.
    """

    embedding_size: int
    image_size: int
    resize: int
    backbone: str = ""
    hdml_tf_version: str = __version__

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict) -> "EmbeddingInfo":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """Returned by `export_saved_model`: where, what, and the read-back difference (None when not verified)."""

    export_dir: str
    info: EmbeddingInfo
    signatures: Tuple[str, ...]
    max_abs_diff: Optional[float] = None


def default_resize(image_size: int, backbone: Optional[str] = None) -> int:
    """Square side images are resized to before the center crop when no run says otherwise: the photo rule of
    `hdml_tf.data.datasets.photo_resize` (256 for the official 227 / 224 crops, the same proportion for others).
    A run of an embedded data set records its own (resize = crop)."""
    from hdml_tf.data.datasets import photo_resize
    return photo_resize(int(image_size), backbone or None)


# ------------------------------------------------------------------------------------------------ graph ops
def to_rgb(images: tf.Tensor) -> tf.Tensor:
    """[B, H, W, C] with C in 1..4 → [B, H, W, 3]: gray replicated, alpha dropped (not composited)."""
    channels = tf.shape(images)[-1]
    tf.debugging.assert_less_equal(channels, 4, message="images must have 1 (gray), 2, 3 (RGB) or 4 (RGBA) "
                                                        "channels")
    rgb = tf.cond(channels < 3, lambda: tf.tile(images[..., :1], [1, 1, 1, 3]), lambda: images[..., :3])
    return tf.ensure_shape(rgb, [None, None, None, 3])


def preprocess_images(images: tf.Tensor, image_size: int, resize: int) -> tf.Tensor:
    """The evaluation pipeline's geometry on a batch of decoded images.

    Args:
      images: uint8 or float [B, H, W, C] (C = 1, 2, 3 or 4), RGB values 0..255, any H, W.
      image_size: S, side of the center crop.
      resize: R >= S, side of the square resize.

    Returns:
      float32 [B, S, S, 3], integer values 0..255: `resize_square` (bilinear, rounded to uint8) then the center
      S x S window, exactly as `make_eval_dataset` prepares an image file.
    """
    squared = resize_square(to_rgb(images), resize)  # uint8 [B, R, R, 3]
    offset = center_offset(Augment(resize=resize, crop=image_size, flip=False))
    window = squared[:, offset:offset + image_size, offset:offset + image_size, :]
    return tf.cast(window, tf.float32)


def preprocess_bytes(image_bytes: tf.Tensor, image_size: int, resize: int) -> tf.Tensor:
    """string [B] of encoded JPEG/PNG/GIF/BMP → float32 [B, S, S, 3] (decode to RGB, then `preprocess_images`).

    Images in one batch may differ in size and color mode: each is decoded and resized on its own (tf.map_fn).
    An item that does not start like a known image format is an InvalidArgumentError naming its index
    (`check_image_bytes`).
    """
    image_bytes = check_image_bytes(image_bytes)

    def one(data):
        return preprocess_images(decode_rgb(data)[tf.newaxis], image_size, resize)[0]

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


#: What `check_image_bytes` reports, so callers can recognise the error.
BAD_BYTES_MESSAGE = "image_bytes items that are not a JPEG, PNG, GIF, BMP or WebP image, at batch index:"
NONFINITE_MESSAGE = "images with NaN or Inf pixel values (expected 0..255), at batch index:"


def check_image_bytes(image_bytes: tf.Tensor) -> tf.Tensor:
    """`image_bytes` (string [B]) after checking that every item starts with a known image signature (JPEG FF D8
    FF, PNG, GIF8, BM, RIFF....WEBP); otherwise an InvalidArgumentError whose message lists the bad indices."""
    padded = tf.strings.join([image_bytes, b"\0" * 12])  # substr must not run past a short item's end
    head = tf.strings.substr(padded, 0, 4)
    known = tf.reduce_any(tf.stack([
        tf.equal(tf.strings.substr(padded, 0, 3), b"\xff\xd8\xff"), tf.equal(head, b"\x89PNG"),
        tf.equal(head, b"GIF8"), tf.equal(tf.strings.substr(padded, 0, 2), b"BM"),
        tf.logical_and(tf.equal(head, b"RIFF"), tf.equal(tf.strings.substr(padded, 8, 4), b"WEBP"))]), axis=0)
    check = tf.debugging.Assert(tf.reduce_all(known), [BAD_BYTES_MESSAGE, tf.where(tf.logical_not(known))[:, 0]],
                                summarize=20)
    with tf.control_dependencies([check]):
        return tf.identity(image_bytes)


def check_finite(images: tf.Tensor) -> tf.Tensor:
    """Float `images` [B, H, W, C] after checking every pixel is finite (an InvalidArgumentError naming the batch
    indices of the images with NaN / Inf otherwise); integer images are returned as they are."""
    if not images.dtype.is_floating:
        return images
    bad = tf.logical_not(tf.reduce_all(tf.math.is_finite(images), axis=[1, 2, 3]))
    check = tf.debugging.Assert(tf.logical_not(tf.reduce_any(bad)), [NONFINITE_MESSAGE, tf.where(bad)[:, 0]],
                                summarize=20)
    with tf.control_dependencies([check]):
        return tf.identity(images)


# ------------------------------------------------------------------------------------------------ embedder
def _backbone_name(model) -> str:
    for candidate in [getattr(model, "backbone", None), model] + list(getattr(model, "layers", [])):
        name = getattr(candidate, "backbone_name", None)
        if name:
            return str(name)
    return ""


def resolve_embedder(model_or_embedder) -> Tuple[keras.Model, str]:
    """(functional embedder images → embeddings, backbone name or "") of an HDMLModel or a plain Keras model."""
    if hasattr(model_or_embedder, "embedder") and callable(model_or_embedder.embedder):
        return model_or_embedder.embedder(), _backbone_name(model_or_embedder)
    if isinstance(model_or_embedder, keras.Model):
        if len(model_or_embedder.output_shape) != 2:
            raise HDMLError(f"{model_or_embedder.name} returns shape {model_or_embedder.output_shape}; expected an "
                            "embedding model returning [B, E]")
        return model_or_embedder, _backbone_name(model_or_embedder)
    raise HDMLError(f"cannot export a {type(model_or_embedder).__name__}; expected an HDMLModel or a keras.Model "
                    "images → embeddings")


def embedding_info(embedder: keras.Model, image_size: Optional[int] = None, resize: Optional[int] = None,
                   backbone: str = "") -> EmbeddingInfo:
    """Checks the geometry against the embedder's input and fills in defaults (see `default_resize`)."""
    shape = tuple(embedder.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise HDMLError(f"{embedder.name} takes input shape {shape}; expected images [B, S, S, 3]")
    fixed = shape[1] if shape[1] is not None and shape[1] == shape[2] else None
    if image_size in (None, 0):
        if fixed is None:
            raise HDMLError(f"{embedder.name} takes images of any size {shape}; pass image_size")
        image_size = fixed
    image_size = int(image_size)
    if fixed is not None and image_size != fixed:
        raise HDMLError(f"image_size={image_size} does not match the model, which takes {fixed} x {fixed} images")
    resize = int(resize) if resize else default_resize(image_size, backbone)
    if resize < image_size:
        raise HDMLError(f"resize={resize} must be >= image_size={image_size} (the crop is cut out of the resize)")
    embedding_size = int(embedder.output_shape[-1])
    return EmbeddingInfo(embedding_size=embedding_size, image_size=image_size, resize=resize, backbone=backbone)


class ServingModule(tf.Module):
    """tf.Module holding the embedder's variables and the serving functions (what `export_saved_model` writes).

    The Keras model itself is not an attribute (only its variables are), so the SavedModel holds traced graphs and
    variables, not Keras objects, and loads without Keras or hdml_tf.
    """

    def __init__(self, embedder: keras.Model, info: EmbeddingInfo):
        super().__init__(name="hdml_embedding")
        self.embedding_variables = list(embedder.variables)
        s, r = info.image_size, info.resize

        size = info.embedding_size

        def embed(batch, prepare):
            """Embeddings [B, E] of a batch; an empty batch gives [0, E] (the network itself cannot run on it)."""
            def run():
                z = tf.cast(embedder(prepare(batch), training=False), tf.float32)
                return tf.math.l2_normalize(z, axis=-1)
            z = tf.cond(tf.shape(batch)[0] > 0, run, lambda: tf.zeros([0, size], tf.float32))
            return {OUTPUT_KEY: tf.ensure_shape(z, [None, size])}

        self.embed_images = tf.function(
            lambda images: embed(images, lambda x: preprocess_images(check_finite(x), s, r)))
        self.embed_bytes = tf.function(lambda image_bytes: embed(image_bytes, lambda b: preprocess_bytes(b, s, r)),
                                       input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        meta = info.to_dict()
        self.metadata = tf.function(lambda: {k: tf.constant(v) for k, v in meta.items()}, input_signature=[])
        self.images_float = self.embed_images.get_concrete_function(
            tf.TensorSpec([None, None, None, None], tf.float32, name="images"))
        self.images_uint8 = self.embed_images.get_concrete_function(
            tf.TensorSpec([None, None, None, None], tf.uint8, name="images"))
        self.metadata.get_concrete_function()

    def signatures(self) -> Dict:
        return {"serving_default": self.images_float, SIGNATURE_IMAGES: self.images_float,
                SIGNATURE_IMAGES_UINT8: self.images_uint8,
                SIGNATURE_BYTES: self.embed_bytes.get_concrete_function()}


def _prepare_dir(export_dir: str, overwrite: bool) -> None:
    """Checks the destination before anything is written (an existing SavedModel is replaced only when the new one
    is complete, by `_write_saved_model`)."""
    from hdml_tf import atomic
    if os.path.isfile(export_dir):
        raise HDMLError(f"export directory {export_dir} is a file; expected a new or empty directory")
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        if not os.path.exists(os.path.join(export_dir, "saved_model.pb")):
            raise HDMLError(f"export directory {export_dir} is not empty and holds no SavedModel; choose a new one")
        if not overwrite:
            raise HDMLError(f"export directory {export_dir} already holds a SavedModel; pass overwrite=True "
                            "(--overwrite) to replace it")
    atomic.check_writable_dir(os.path.dirname(os.path.abspath(export_dir)), "the export directory's parent")


def _write_saved_model(module, signatures, info: EmbeddingInfo, export_dir: str) -> None:
    """Writes the SavedModel into a temporary directory beside `export_dir`, then renames it into place: a failed
    export (full disk, killed process) never leaves a partial SavedModel under the final name, and a replaced one
    stays until the new one is complete."""
    from hdml_tf import atomic
    final = os.path.abspath(export_dir)
    temp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{os.getpid()}")
    old = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.old-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        with atomic.guarded("the SavedModel", final):
            try:
                tf.saved_model.save(module, temp, signatures=signatures)
            except tf.errors.OpError as e:  # TensorFlow's file errors are not OSErrors
                raise OSError(getattr(e, "errno", None) or 0, " ".join(e.message.split())[:200]) from None
            os.makedirs(os.path.join(temp, os.path.dirname(METADATA_FILE)), exist_ok=True)
            atomic.write_json(os.path.join(temp, METADATA_FILE),
                              {**info.to_dict(), "signatures": sorted(signatures), "output": OUTPUT_KEY})
            moved = False
            if os.path.isdir(final):
                os.replace(final, old)  # an empty directory, or the SavedModel being replaced (overwrite)
                moved = True
            try:
                os.replace(temp, final)
            except OSError:
                if moved:
                    os.replace(old, final)  # the previous SavedModel goes back under its name
                raise
            atomic.fsync_dir(os.path.dirname(final))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def export_saved_model(model_or_embedder, export_dir: str, image_size: Optional[int] = None, *,
                       resize: Optional[int] = None, backbone: Optional[str] = None, overwrite: bool = False,
                       verify: bool = False) -> ExportResult:
    """Writes the embedding network as a TensorFlow SavedModel with the serving signatures of this module.

    Args:
      model_or_embedder: an HDMLModel (its `embedder()` is exported: backbone + metric head + L2 norm; no generator,
        no classifier) or a keras.Model images [B, S, S, 3] (RGB 0..255) → embeddings [B, E].
      export_dir: a new or empty directory (or an existing SavedModel with `overwrite`).
      image_size: S, the crop fed to the backbone; None takes it from the model's input shape (must match it).
      resize: R >= S, the square resize before the center crop; None: `default_resize(S, backbone)` (256 for the
        official 224 / 227 crops).
        Use the training run's `--resize` so serving sees what evaluation saw.
      backbone: name recorded in the metadata; None reads the backbone's `backbone_name`.
      overwrite: replace an existing SavedModel in export_dir.
      verify: reload the SavedModel in this process and check the float and bytes signatures against the in-process
        model on random images (max |diff| <= VERIFY_TOLERANCE).

    Returns:
      ExportResult (metadata, signature names, the verification's max |diff| or None).

    Raises:
      HDMLError: an unusable model, geometry or directory, or a failed verification.
    """
    embedder, found = resolve_embedder(model_or_embedder)
    info = embedding_info(embedder, image_size, resize, backbone if backbone is not None else found)
    export_dir = os.fspath(export_dir)
    _prepare_dir(export_dir, overwrite)
    module = ServingModule(embedder, info)
    signatures = module.signatures()
    _write_saved_model(module, signatures, info, export_dir)
    max_diff = verify_export(embedder, export_dir, info) if verify else None
    return ExportResult(export_dir=export_dir, info=info, signatures=tuple(sorted(signatures)),
                        max_abs_diff=max_diff)


def verify_export(embedder: keras.Model, export_dir: str, info: EmbeddingInfo, seed: int = 0) -> float:
    """Max |difference| between the reloaded SavedModel and `embedder` on random images (float, uint8, PNG bytes).

    Raises:
      HDMLError: the difference exceeds VERIFY_TOLERANCE.
    """
    rng = np.random.default_rng(seed)
    size = info.resize + 3  # not the crop size, so the resize runs
    images = rng.integers(0, 256, (2, size, size + 5, 3), dtype=np.uint8)
    expected = tf.math.l2_normalize(tf.cast(embedder(preprocess_images(images, info.image_size, info.resize),
                                                     training=False), tf.float32), axis=-1).numpy()
    loaded = tf.saved_model.load(export_dir)
    got_float = loaded.signatures["serving_default"](images=tf.constant(images, tf.float32))[OUTPUT_KEY].numpy()
    got_uint8 = loaded.signatures[SIGNATURE_IMAGES_UINT8](images=tf.constant(images))[OUTPUT_KEY].numpy()
    png = tf.stack([tf.io.encode_png(im) for im in images])
    got_bytes = loaded.signatures[SIGNATURE_BYTES](image_bytes=png)[OUTPUT_KEY].numpy()
    diff = max(float(np.max(np.abs(g - expected))) for g in (got_float, got_uint8, got_bytes))
    if not diff <= VERIFY_TOLERANCE:
        raise HDMLError(f"read-back check failed: the SavedModel in {export_dir} gives embeddings differing from "
                        f"the in-process model by up to {diff:.3g} (> {VERIFY_TOLERANCE:g})")
    return diff


def read_export_info(export_dir: str) -> EmbeddingInfo:
    """Metadata of a SavedModel written by `export_saved_model` (from its JSON; no TensorFlow load)."""
    path = os.path.join(export_dir, METADATA_FILE)
    if not os.path.exists(path):
        raise HDMLError(f"{export_dir} has no {METADATA_FILE}; expected a SavedModel written by tools/export.py")
    with open(path) as f:
        return EmbeddingInfo.from_dict(json.load(f))


def _input_error(e: tf.errors.InvalidArgumentError) -> HDMLError:
    """The one-line HDMLError of a serving-input check that failed inside the graph."""
    text = " ".join(str(e.message).split())
    for marker, what in ((NONFINITE_MESSAGE, "NaN or Inf pixel values (expected finite values 0..255)"),
                         (BAD_BYTES_MESSAGE, "bytes that are not a JPEG, PNG, GIF, BMP or WebP image")):
        if marker in text:
            found = re.search(r"\[([\d\s.]+)\]", text.split(marker, 1)[1])  # Assert prints "[3 7]"
            indices = ", ".join(found.group(1).split()) if found else "?"
            return HDMLError(f"batch item(s) {indices} hold {what}")
    return HDMLError(f"the batch could not be embedded: {text[:300]}")


def _embed_checked(fn, *args):
    try:
        return np.asarray(fn(*args)[OUTPUT_KEY])
    except tf.errors.InvalidArgumentError as e:
        raise _input_error(e) from None


def _undecodable(items) -> Tuple[int, str]:
    """(index, reason) of the first item that `decode_rgb` cannot decode, or (-1, "")."""
    for i, data in enumerate(items):
        try:
            decode_rgb(tf.constant(data))
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            text = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]|name:\s*$", "", str(getattr(e, "message", e)))
            return i, " ".join(text.split())[:200]
    return -1, ""


class _EmbedderBase:
    """What both embedders share: calls with checked inputs and one-line errors."""

    def _images_fn(self, images):
        raise NotImplementedError

    def _bytes_fn(self):
        raise NotImplementedError

    def __call__(self, images) -> np.ndarray:
        """uint8 or float [B, H, W, C] (0..255) → float32 [B, E] L2-normalized embeddings ([0, E] for B = 0).

        Raises:
          HDMLError: an image with NaN / Inf pixels (its batch index named).
        """
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.uint8:
            images = tf.cast(images, tf.float32)
        return _embed_checked(self._images_fn(images), images)

    def embed_bytes(self, items) -> np.ndarray:
        """Encoded images (bytes: JPEG, PNG, GIF, BMP, WebP), each of any size → float32 [B, E].

        Raises:
          HDMLError: naming the index of an item that is not an image or cannot be decoded.
        """
        items = [bytes(x) for x in items]
        data = tf.constant(items, dtype=tf.string, shape=[len(items)])
        try:
            return np.asarray(self._bytes_fn()(data)[OUTPUT_KEY])
        except tf.errors.InvalidArgumentError as e:
            if BAD_BYTES_MESSAGE in str(e.message):
                raise _input_error(e) from None
            index, reason = _undecodable(items)
            if index < 0:
                raise HDMLError(f"the batch could not be embedded: {' '.join(str(e.message).split())[:300]}") from None
            raise HDMLError(f"batch item {index} of {len(items)} cannot be decoded as an image: {reason}") from None


class SavedModelEmbedder(_EmbedderBase):
    """A SavedModel directory written by `export_saved_model`, as a callable uint8 images → embeddings.

    Attributes:
      info: EmbeddingInfo (geometry and embedding size, from the metadata JSON).
      source: the directory.
    """

    def __init__(self, export_dir: str):
        self.source = os.fspath(export_dir)
        if not os.path.exists(os.path.join(self.source, "saved_model.pb")):
            raise HDMLError(f"{self.source} is a directory without saved_model.pb; expected a SavedModel written by "
                            "tools/export.py")
        self.info = read_export_info(self.source)
        self._loaded = tf.saved_model.load(self.source)  # keeps the variables alive
        self._uint8 = self._loaded.signatures[SIGNATURE_IMAGES_UINT8]
        self._float = self._loaded.signatures[SIGNATURE_IMAGES]

    def _images_fn(self, images):
        fn = self._uint8 if images.dtype == tf.uint8 else self._float
        return lambda x: fn(images=x)

    def _bytes_fn(self):
        signature = self._loaded.signatures[SIGNATURE_BYTES]
        return lambda data: signature(image_bytes=data)


class ModelEmbedder(_EmbedderBase):
    """An in-process embedding network (e.g. `HDMLModel.embedder()`) with the serving preprocessing, as a callable
    uint8 images → embeddings (what `SavedModelEmbedder` gives for the exported model)."""

    def __init__(self, model_or_embedder, info: EmbeddingInfo, source: str = ""):
        embedder, _ = resolve_embedder(model_or_embedder)
        self.info, self.source = info, source
        self._module = ServingModule(embedder, info)

    def _images_fn(self, images):
        return self._module.images_uint8 if images.dtype == tf.uint8 else self._module.images_float

    def _bytes_fn(self):
        return self._module.embed_bytes


__all__ = ["EmbeddingInfo", "ExportResult", "ServingModule", "SavedModelEmbedder", "ModelEmbedder",
           "export_saved_model", "verify_export", "read_export_info", "embedding_info", "resolve_embedder",
           "default_resize", "preprocess_images", "preprocess_bytes", "check_image_bytes", "check_finite", "to_rgb",
           "SIGNATURE_IMAGES",
           "SIGNATURE_IMAGES_UINT8", "SIGNATURE_BYTES", "OUTPUT_KEY", "METADATA_FILE", "VERIFY_TOLERANCE"]
