"""Using a trained model: a TensorFlow SavedModel of the embedding network, and a `.keras` file that resumes training.

SavedModel (`export_saved_model`): the embedding network only (backbone + metric head + L2 normalization; no
generator, no classifier) with the evaluation preprocessing inside the graph, so it loads with nothing but TensorFlow
(`tf.saved_model.load`, TF Serving) and needs no hdml_tf at serving time. Serving signatures, all returning
`{"embeddings": float32 [B, E]}`, L2-normalized:

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
values by the same step, so uint8 and float images of the same pixels give identical embeddings.

The same functions are attributes of the loaded object: `loaded.embed_images(x)` (float32 or uint8),
`loaded.embed_bytes(b)`, and `loaded.metadata()` -> {embedding_size, image_size, resize, backbone,
hdml_tf_version} as tensors. The metadata is also written as JSON to `<export_dir>/assets.extra/hdml_tf.json`
(readable without TensorFlow).

`.keras` (`save_keras` / `load_keras`): Keras' own model file (config + every weight, including the generator,
classifier, running means J_avg / J_gen and the three optimizers' state) plus an `hdml_tf.json` entry holding the
three optimizers' configurations (HDMLModel's custom `compile` takes them by name, which Keras' default compile
config cannot express) and the image geometry. `load_keras` rebuilds the model, compiles it with those optimizers and
loads all state, so `fit` continues where the saved run stopped.

For the tools (embed / search): `load_embedder` (a SavedModel or a `.keras` file as one callable), `embed_files`
(decode, skip unreadable files, embed in batches), the `.npz` image index (`ImageIndex`, `save_index`, `load_index`)
and `nearest_neighbors` (query set against an index, Euclidean distance between unit vectors).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
import zipfile
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
#: Metadata file beside the SavedModel (TF Serving's place for extra files) and inside a `.keras` zip.
METADATA_FILE = os.path.join("assets.extra", "hdml_tf.json")
KERAS_METADATA_ENTRY = "hdml_tf.json"
#: The official photo crops; they are cut out of a 256 x 256 resize (official data_provider / RunConfig.augment).
OFFICIAL_CROPS = (224, 227)
OFFICIAL_RESIZE = 256
#: Largest |difference| accepted between the reloaded SavedModel and the in-process model (`verify=True`).
VERIFY_TOLERANCE = 1e-5

_OPTIMIZER_NAMES = ("metric_optimizer", "generator_optimizer", "classifier_optimizer")


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


def default_resize(image_size: int) -> int:
    """Square side images are resized to before the center crop when nobody says otherwise.

    256 for the official photo crops (224, 227), as the official data provider and `RunConfig.augment` do; any other
    crop size is resized straight to `image_size` (no crop margin), as for the embedded glyph / digit sets.
    """
    return OFFICIAL_RESIZE if image_size in OFFICIAL_CROPS else int(image_size)


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
    """
    def one(data):
        return preprocess_images(decode_rgb(data)[tf.newaxis], image_size, resize)[0]

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32))


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
    resize = int(resize) if resize else default_resize(image_size)
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

        def embed(pixels):
            z = tf.cast(embedder(pixels, training=False), tf.float32)
            return {OUTPUT_KEY: tf.math.l2_normalize(z, axis=-1)}

        self.embed_images = tf.function(lambda images: embed(preprocess_images(images, s, r)))
        self.embed_bytes = tf.function(lambda image_bytes: embed(preprocess_bytes(image_bytes, s, r)),
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
    if os.path.isfile(export_dir):
        raise HDMLError(f"export directory {export_dir} is a file; expected a new or empty directory")
    if os.path.isdir(export_dir) and os.listdir(export_dir):
        if not os.path.exists(os.path.join(export_dir, "saved_model.pb")):
            raise HDMLError(f"export directory {export_dir} is not empty and holds no SavedModel; choose a new one")
        if not overwrite:
            raise HDMLError(f"export directory {export_dir} already holds a SavedModel; pass overwrite=True "
                            "(--overwrite) to replace it")
        shutil.rmtree(export_dir)


def export_saved_model(model_or_embedder, export_dir: str, image_size: Optional[int] = None, *,
                       resize: Optional[int] = None, backbone: Optional[str] = None, overwrite: bool = False,
                       verify: bool = False) -> ExportResult:
    """Writes the embedding network as a TensorFlow SavedModel with the serving signatures of this module.

    Args:
      model_or_embedder: an HDMLModel (its `embedder()` is exported: backbone + metric head + L2 norm; no generator,
        no classifier) or a keras.Model images [B, S, S, 3] (RGB 0..255) → embeddings [B, E].
      export_dir: a new or empty directory (or an existing SavedModel with `overwrite`).
      image_size: S, the crop fed to the backbone; None takes it from the model's input shape (must match it).
      resize: R >= S, the square resize before the center crop; None: `default_resize(S)` (256 for 224 / 227).
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
    tf.saved_model.save(module, export_dir, signatures=signatures)
    os.makedirs(os.path.join(export_dir, os.path.dirname(METADATA_FILE)), exist_ok=True)
    with open(os.path.join(export_dir, METADATA_FILE), "w") as f:
        json.dump({**info.to_dict(), "signatures": sorted(signatures), "output": OUTPUT_KEY}, f, indent=2)
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


# ------------------------------------------------------------------------------------------------ .keras
def _check_keras_path(path: str) -> str:
    path = os.fspath(path)
    if not path.endswith(".keras"):
        raise HDMLError(f"{path}: a Keras model file must end with .keras")
    return path


def save_keras(model, path: str, *, image_size: Optional[int] = None, resize: Optional[int] = None,
               backbone: Optional[str] = None) -> str:
    """Saves an HDMLModel as one `.keras` file that `load_keras` turns back into a model that resumes training.

    Everything is saved: backbone, metric head, generator, classifier, running means (J_avg, J_gen, skipped steps)
    and, when compiled, the three optimizers' configurations (learning-rate schedules included) and state (step
    counter, Adam moments).

    Args:
      model: an HDMLModel.
      path: file name ending with .keras (overwritten).
      image_size, resize, backbone: geometry and backbone name recorded for export and the embed / search tools
        (defaults as in `export_saved_model`).

    Returns:
      path.
    """
    from hdml_tf.model import HDMLModel
    path = _check_keras_path(path)
    if not isinstance(model, HDMLModel):
        raise HDMLError(f"save_keras saves an HDMLModel, got {type(model).__name__}; use model.save for others")
    info = embedding_info(model.embedder(), image_size, resize,
                          backbone if backbone is not None else _backbone_name(model))
    optimizers = {}
    if getattr(model, "optimizer", None) is not None:
        optimizers = {name: keras.saving.serialize_keras_object(getattr(model, attr))
                      for name, attr in zip(_OPTIMIZER_NAMES, ("optimizer", "generator_optimizer",
                                                               "classifier_optimizer"))
                      if getattr(model, attr, None) is not None}
    meta = {"format": "hdml_tf.keras/1", **info.to_dict(), "optimizers": optimizers}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():
        # HDMLModel's sub-networks are built when it is constructed, but Keras only marks the outer model built
        # after a __call__; saving is complete either way.
        warnings.filterwarnings("ignore", message=".*has not yet been built.*")
        model.save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(KERAS_METADATA_ENTRY, json.dumps(meta, indent=2, default=_json_default))
    return path


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_keras_info(path: str) -> Tuple[Optional[EmbeddingInfo], Dict]:
    """(EmbeddingInfo or None, optimizers' serialized configs by compile argument name) of a `.keras` file.

    From the hdml_tf.json entry `save_keras` adds; for a file written by plain `model.save` (a Keras callback), from
    Keras' own compile config when it names HDMLModel's three optimizers (HDMLModel.get_compile_config).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            meta = json.loads(archive.read(KERAS_METADATA_ENTRY)) if KERAS_METADATA_ENTRY in names else {}
            config = json.loads(archive.read("config.json")) if "config.json" in names else {}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise HDMLError(f"{path} is not a readable .keras file ({e})")
    info = EmbeddingInfo.from_dict(meta) if "image_size" in meta else None
    optimizers = meta.get("optimizers") or {}
    compiled = config.get("compile_config") or {}
    if not optimizers and compiled and set(compiled) <= set(_OPTIMIZER_NAMES):
        optimizers = {k: v for k, v in compiled.items() if v is not None}
    return info, optimizers


def load_keras(path: str, *, compile: bool = True):
    """Loads a `.keras` file written by `save_keras`; the model continues training exactly where it stopped.

    The model is rebuilt from its config, compiled with the saved optimizers (when it was saved compiled and
    `compile`), then every weight and optimizer variable is loaded. The backbone gets back its `backbone_name`.
    A `.keras` file written by plain `model.save` loads too: with its weights, running means and, when Keras' compile
    config names the three optimizers (`HDMLModel.get_compile_config`), compiled with their state; otherwise
    uncompiled (call `compile` yourself; optimizer state then starts afresh).

    Returns:
      HDMLModel.

    Raises:
      HDMLError: missing or unreadable file.
    """
    import hdml_tf.backbones  # noqa: F401  (registers the backbones' custom layers for deserialization)
    import hdml_tf.model  # noqa: F401  (registers HDMLModel)

    path = _check_keras_path(path)
    if not os.path.isfile(path):
        raise HDMLError(f"model file {path} not found")
    info, optimizer_configs = read_keras_info(path)
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, TypeError, OSError, KeyError) as e:
        raise HDMLError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if info is not None and info.backbone:
        model.backbone.backbone_name = info.backbone
    if info is not None:
        model.export_info = info
    if compile and optimizer_configs:
        model.compile(**{name: keras.saving.deserialize_keras_object(cfg)
                         for name, cfg in optimizer_configs.items()})
        if not model.built:  # Keras loads weights only into a built model; one inference call builds it
            side = info.image_size if info is not None else (model.backbone.input_shape[1] or 32)
            model(tf.zeros([1, side, side, 3]), training=False)
        # Loading the weights again, now that the optimizers exist, restores their state too.
        model.load_weights(path)
    return model


def keras_embedding_info(model) -> EmbeddingInfo:
    """The geometry recorded with a model loaded by `load_keras`, else the defaults for its input size."""
    info = getattr(model, "export_info", None)
    if info is not None:
        return info
    return embedding_info(model.embedder(), backbone=_backbone_name(model))


# ------------------------------------------------------------------------------------------------ tools' loader
class Embedder:
    """An embedding model from a SavedModel directory or a `.keras` file, for the embed / search tools.

    Attributes:
      info: EmbeddingInfo (geometry to feed it and the embedding size).
      source: the path it was loaded from.
    """

    def __init__(self, path: str):
        self.source = os.fspath(path)
        if os.path.isdir(self.source):
            if not os.path.exists(os.path.join(self.source, "saved_model.pb")):
                raise HDMLError(f"{self.source} is a directory without saved_model.pb; expected a SavedModel "
                                "written by tools/export.py or a .keras file")
            self.info = read_export_info(self.source)
            loaded = tf.saved_model.load(self.source)
            self._loaded = loaded  # keeps the variables alive
            self._fn = loaded.signatures[SIGNATURE_IMAGES_UINT8]
            self._call = lambda images: self._fn(images=images)[OUTPUT_KEY]
        elif os.path.isfile(self.source):
            model = load_keras(self.source, compile=False)
            self.info = keras_embedding_info(model)
            module = ServingModule(model.embedder(), self.info)
            self._loaded = module
            self._call = lambda images: module.images_uint8(images)[OUTPUT_KEY]
        else:
            raise HDMLError(f"model {self.source} not found; expected a SavedModel directory (tools/export.py "
                            "--output) or a .keras file")

    def __call__(self, images) -> np.ndarray:
        """uint8 [B, H, W, C] → float32 [B, E] L2-normalized embeddings (preprocessing as the SavedModel's)."""
        return np.asarray(self._call(tf.convert_to_tensor(np.asarray(images, np.uint8))))


def load_embedder(path: str) -> Embedder:
    """`Embedder(path)`: a SavedModel directory or a `.keras` file, as a callable uint8 images → embeddings."""
    return Embedder(path)


# ------------------------------------------------------------------------------------------------ folders, index
@dataclasses.dataclass(frozen=True)
class ImageIndex:
    """Embeddings of a folder tree (what tools/embed.py writes and tools/search.py reads, as one .npz).

    Attributes:
      embeddings: float32 [N, E], L2-normalized.
      paths: N file paths relative to `root`.
      root: the embedded folder (absolute).
      labels: int32 [N] class of each image (its first-level subfolder) or None when the images are not all in
        class subfolders.
      class_names: C subfolder names, label i is class_names[i] (empty without labels).
      info: the embedding model's EmbeddingInfo.
      model: path of the model that computed the embeddings.
      skipped: "path: reason" of each unreadable file left out.
    """

    embeddings: np.ndarray
    paths: Tuple[str, ...]
    root: str
    labels: Optional[np.ndarray]
    class_names: Tuple[str, ...]
    info: EmbeddingInfo
    model: str = ""
    skipped: Tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.paths)

    def full_path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def class_of(self, i: int) -> str:
        return self.class_names[int(self.labels[i])] if self.labels is not None else ""


def list_files(folder: str, exclude: Tuple[str, ...] = ()) -> Tuple[str, ...]:
    """Every regular file under `folder` (recursive, sorted, hidden files and folders left out), relative paths.

    Nothing is filtered by extension: a file that is not an image is reported by the decoder, not silently dropped.
    """
    excluded = {os.path.abspath(e) for e in exclude}
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            full = os.path.join(parent, name)
            if name.startswith(".") or os.path.abspath(full) in excluded or not os.path.isfile(full):
                continue
            found.append(os.path.relpath(full, folder))
    return tuple(found)


def folder_labels(paths) -> Tuple[Optional[np.ndarray], Tuple[str, ...]]:
    """(labels int32 [N], class names) from first-level subfolders, or (None, ()) unless every file is in one."""
    parts = [p.replace(os.sep, "/").split("/") for p in paths]
    if not parts or any(len(p) < 2 for p in parts):
        return None, ()
    names = tuple(sorted({p[0] for p in parts}))
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[p[0]] for p in parts], np.int32), names


def embed_files(embedder: "Embedder", paths, *, batch_size: int = 64, name: str = "", verbose: int = 1):
    """Embeds image files, leaving out the ones that cannot be decoded.

    Files are read, decoded (`decode_rgb`: gray, RGBA and CMYK become RGB) and resized to the model's `resize` in a
    parallel tf.data map (`hdml_tf.data.images.decode_files`, progress bar when verbose), then embedded in batches
    of `batch_size` (center crop and normalization inside the model).

    Returns:
      (embeddings float32 [N', E], kept int64 [N'] positions in `paths` of the readable files, ImageScanReport
      naming the others).
    """
    from hdml_tf.data.images import decode_files
    if batch_size <= 0:
        raise HDMLError(f"batch_size={batch_size} must be > 0")
    paths = [os.fspath(p) for p in paths]
    out = np.zeros((len(paths), embedder.info.embedding_size), np.float32)

    def sink(index, images):
        for start in range(0, len(index), batch_size):
            out[index[start:start + batch_size]] = embedder(images[start:start + batch_size])

    report = decode_files(paths, embedder.info.resize, name=name, verbose=verbose, sink=sink)
    kept = np.setdiff1d(np.arange(len(paths)), np.asarray(report.bad_index, np.int64))
    return out[kept], kept, report


def save_index(path: str, index: ImageIndex) -> str:
    """Writes an ImageIndex as .npz (no pickled objects: strings are stored as unicode arrays)."""
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise HDMLError(f"index file {path} must end with .npz")
    arrays = {"embeddings": np.asarray(index.embeddings, np.float32), "paths": np.array(index.paths, dtype=str),
              "root": np.array(index.root), "class_names": np.array(index.class_names, dtype=str),
              "info": np.array(json.dumps(index.info.to_dict())), "model": np.array(index.model),
              "skipped": np.array(index.skipped, dtype=str)}
    if index.labels is not None:
        arrays["labels"] = np.asarray(index.labels, np.int32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[:-len(".npz")] + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_index(path: str) -> ImageIndex:
    """Reads an index written by `save_index` (tools/embed.py)."""
    if not os.path.isfile(path):
        raise HDMLError(f"index file {path} not found; write one with tools/embed.py")
    try:
        with np.load(path, allow_pickle=False) as f:
            d = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise HDMLError(f"{path} is not an index written by tools/embed.py ({e})")
    if "embeddings" not in d or "paths" not in d:
        raise HDMLError(f"{path} has no embeddings/paths arrays; expected an index written by tools/embed.py")
    return ImageIndex(embeddings=d["embeddings"].astype(np.float32), paths=tuple(str(p) for p in d["paths"]),
                      root=str(d.get("root", "")), labels=d.get("labels"),
                      class_names=tuple(str(c) for c in d.get("class_names", ())),
                      info=EmbeddingInfo.from_dict(json.loads(str(d["info"]))), model=str(d.get("model", "")),
                      skipped=tuple(str(s) for s in d.get("skipped", ())))


def nearest_neighbors(queries: np.ndarray, embeddings: np.ndarray, k: int, exclude=None):
    """The k nearest index rows of each query by Euclidean distance between unit vectors.

    For unit vectors ||q - x|| = sqrt(2 - 2 cos(q, x)), so the ranking is the cosine ranking; both are returned.

    Args:
      queries: float [Q, E] L2-normalized.
      embeddings: float [N, E] L2-normalized.
      k: neighbours per query (at most N, or N - 1 with an exclusion).
      exclude: optional int [Q], an index row to leave out for each query (its own entry), -1 for none.

    Returns:
      (indices int64 [Q, k'], distances float32 [Q, k'], cosines float32 [Q, k']), nearest first.
    """
    q = np.asarray(queries, np.float64)
    x = np.asarray(embeddings, np.float64)
    cos = np.clip(q @ x.T, -1.0, 1.0)
    ranked = cos.copy()
    if exclude is not None:
        rows = np.flatnonzero(np.asarray(exclude) >= 0)
        ranked[rows, np.asarray(exclude)[rows]] = -np.inf
    k = max(0, min(int(k), x.shape[0] - (1 if exclude is not None and np.any(np.asarray(exclude) >= 0) else 0)))
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(cos, order, axis=1)
    dist = np.sqrt(np.maximum(2.0 - 2.0 * top, 0.0))
    return order, dist.astype(np.float32), top.astype(np.float32)


__all__ = ["EmbeddingInfo", "ExportResult", "Embedder", "export_saved_model", "save_keras", "load_keras",
           "load_embedder", "read_export_info", "read_keras_info", "keras_embedding_info", "preprocess_images",
           "preprocess_bytes", "default_resize", "embedding_info", "resolve_embedder", "verify_export",
           "SIGNATURE_IMAGES", "SIGNATURE_IMAGES_UINT8", "SIGNATURE_BYTES", "OUTPUT_KEY", "METADATA_FILE",
           "VERIFY_TOLERANCE", "ServingModule", "ImageIndex", "list_files", "folder_labels", "embed_files",
           "save_index", "load_index", "nearest_neighbors"]
