"""Load ImageNet weights into a backbone by name, verified: every variable assigned exactly once with its shape.

Three file formats, detected from the file or stated:

- "slim": a TF-Slim InceptionV1 checkpoint (`inception_v1.ckpt` from inception_v1_2016_08_28: TF1 name-based, V1
  single file or V2 `.index` + `.data-*`), read with TensorFlow's own checkpoint reader. Keys look like
  `InceptionV1/Conv2d_1a_7x7/weights` and `InceptionV1/Mixed_3b/Branch_1/Conv2d_0b_3x3/BatchNorm/moving_mean`
  (BatchNorm has beta, moving_mean, moving_variance; no gamma since slim uses scale=False).
- "caffe": the BVLC GoogLeNet `.mat` the official HDML code loads (lib/GoogleNet_Model.py `variables_dict`):
  kernels under the Caffe layer name (`inception_3a/5x5`) in Caffe layout (out, in, h, w), transposed here to
  Keras' (h, w, in, out); biases under `<name>_bias`, flattened.
- "keras": a Keras weights file of our own backbone (`.weights.h5`, as tools/convert_weights.py writes), or for
  ResNet-50 a keras.applications notop file (legacy `.h5` or `.weights.h5`).

Skipped on purpose, and listed in the report: the ImageNet classifier (`InceptionV1/Logits/...`,
`loss3/classifier`), the Caffe auxiliary heads (`loss1/...`, `loss2/...`) and training bookkeeping in checkpoints
(`global_step`, optimizer slots, moving-average shadows). Anything else that does not match -- a backbone variable
absent from the file, a file entry the backbone does not have, or a shape that differs -- stops the load before any
variable is written, with one WeightsError that lists them all.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import tempfile

import numpy as np

from hdml_tf.errors import WeightsError

FORMATS = ("auto", "slim", "caffe", "keras")
SLIM_SCOPE = "InceptionV1"
_MAT_MAGIC = b"MATLAB 5.0 MAT-file"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Which backbone layout (model.layout) each foreign format fits.
_FORMAT_LAYOUT = {"slim": "slim", "caffe": "caffe"}
_FORMAT_WORDS = {"slim": "a TF-Slim InceptionV1 checkpoint", "caffe": "a Caffe GoogLeNet .mat"}
_LAYOUT_BACKBONE = {"slim": "inception_v1_slim", "caffe": "inception_v1_caffe"}
# Checkpoint entries that are not weights: optimizer slots and moving-average shadows end with these.
_SLOT_SUFFIXES = ("ExponentialMovingAverage", "RMSProp", "RMSProp_1", "Momentum", "Adam", "Adam_1")


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load did. `assigned` variables holding `values` numbers were written; `skipped` names were ignored
    on purpose (classifier, auxiliary heads, bookkeeping)."""
    path: str
    format: str
    assigned: int
    values: int
    skipped: tuple = ()

    def summary(self) -> str:
        skipped = f"; skipped {len(self.skipped)} on purpose ({_brief(self.skipped)})" if self.skipped else ""
        return (f"loaded {self.format} weights from {self.path}: {self.assigned} variables, "
                f"{self.values:,} values{skipped}")


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Named arrays from a foreign file: `shapes` maps every entry to its stored shape; `get(name)` reads one."""
    path: str
    format: str
    shapes: dict
    get: object


def _identity(model):
    """(backbone name, layout) of a backbone: from the attributes `build_backbone` sets, or, for a model reloaded
    from a .keras file (plain attributes are not saved), from its model name."""
    by_name = {"inception_v1_caffe": ("inception_v1_caffe", "caffe"),
               "inception_v1_slim": ("inception_v1_slim", "slim"),
               "resnet50_backbone": ("resnet50", "keras_resnet")}
    name, layout = by_name.get(model.name, (model.name, None))
    return getattr(model, "backbone_name", name), getattr(model, "layout", layout)


# ---------------------------------------------------------------------------------------------------------------
# Format detection and readers
# ---------------------------------------------------------------------------------------------------------------
def _checkpoint_prefix(path: str):
    """The TF checkpoint prefix behind `path` (a prefix, an .index / .data-* file or a directory), or None."""
    if os.path.isdir(path):
        import tensorflow as tf
        return tf.train.latest_checkpoint(path)
    if path.endswith(".index"):
        return path[: -len(".index")]
    if ".data-" in os.path.basename(path):
        return path.split(".data-")[0]
    if os.path.exists(path + ".index") or glob.glob(glob.escape(path) + ".data-*"):
        return path
    return None


def detect_format(path: str, format: str = "auto"):
    """The format of a weights file and the path to read it from.

    Args:
        path: a TF checkpoint (prefix such as `inception_v1.ckpt`, its `.index` / `.data-*` file, a V1 single-file
            checkpoint, or a directory holding one), a Caffe `.mat`, or a Keras `.h5` / `.weights.h5`.
        format: "auto" (look at the file) or one of "slim", "caffe", "keras".

    Returns:
        (format, path to read), format in {"slim", "caffe", "keras"}.

    Raises:
        WeightsError: no such file, unknown format, or a file that is none of the three.
    """
    if format not in FORMATS:
        raise WeightsError(f"unknown weights format {format!r}; expected one of {', '.join(FORMATS)}")
    path = os.fspath(path)
    prefix = _checkpoint_prefix(path)
    if prefix and not os.path.isfile(path):
        if format not in ("auto", "slim"):
            raise WeightsError(f"{path} is a TensorFlow checkpoint, not a {format} weights file")
        return "slim", prefix
    if not os.path.isfile(path):
        raise WeightsError(f"no weights file at {path} (expected a TF-Slim .ckpt, a Caffe GoogLeNet .mat or a "
                           f"Keras .weights.h5)")
    if prefix:  # an .index / .data-* file
        if format not in ("auto", "slim"):
            raise WeightsError(f"{path} is part of a TensorFlow checkpoint, not a {format} weights file")
        return "slim", prefix
    with open(path, "rb") as f:
        head = f.read(128)
    if format != "auto":
        return format, path
    if head.startswith(_MAT_MAGIC):
        return "caffe", path
    if head.startswith(_HDF5_MAGIC):
        if path.endswith(".mat"):
            raise WeightsError(f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it in "
                               f"MATLAB with save(..., '-v7')")
        return "keras", path
    return "slim", path  # a V1 single-file checkpoint has no magic bytes; the checkpoint reader will judge


def read_slim_checkpoint(path: str) -> WeightSource:
    """Open a TF1 name-based checkpoint with TensorFlow's reader (tf.train.load_checkpoint)."""
    import tensorflow as tf
    try:
        reader = tf.train.load_checkpoint(path)
        shapes = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
    except (tf.errors.OpError, ValueError) as e:
        raise WeightsError(f"cannot read {path} as a TensorFlow checkpoint: {_one_line(e)}") from None
    return WeightSource(path, "slim", shapes, reader.get_tensor)


def read_caffe_mat(path: str) -> WeightSource:
    """Open a Caffe GoogLeNet `.mat` (scipy.io.loadmat); MATLAB's own `__header__` entries are dropped."""
    import scipy.io
    try:
        arrays = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    except (ValueError, OSError, TypeError) as e:
        raise WeightsError(f"cannot read {path} as a .mat file: {_one_line(e)}") from None
    return WeightSource(path, "caffe", {k: tuple(np.shape(v)) for k, v in arrays.items()}, arrays.__getitem__)


def read_weights(path: str, format: str = "auto") -> WeightSource:
    """Detect the format and open a foreign (slim or caffe) weights file."""
    fmt, where = detect_format(path, format)
    if fmt == "slim":
        return read_slim_checkpoint(where)
    if fmt == "caffe":
        return read_caffe_mat(where)
    raise WeightsError(f"{path} is a Keras weights file; load it with load_backbone_weights, not read_weights")


# ---------------------------------------------------------------------------------------------------------------
# The name map
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Target:
    variable: object
    transform: str  # "none" | "oihw_to_hwio" | "flat"


def _layer_scope(layer_name: str) -> str:
    from hdml_tf.backbones.inception_v1 import source_name
    return source_name(layer_name)


def source_name_map(model) -> dict:
    """Every variable of an InceptionV1 backbone keyed by its name in the source file of the model's layout.

    slim: layer `Mixed_3b.Branch_1.Conv2d_0b_3x3` kernel -> `InceptionV1/Mixed_3b/Branch_1/Conv2d_0b_3x3/weights`;
        layer `<conv>.BatchNorm` beta / moving_mean / moving_variance -> `InceptionV1/<conv>/BatchNorm/<same>`.
    caffe: layer `inception_3a.5x5` kernel -> `inception_3a/5x5` (stored (out, in, h, w)), bias ->
        `inception_3a/5x5_bias`.

    Returns:
        {source name: _Target(variable, transform)}; each model variable appears exactly once.
    """
    _, layout = _identity(model)
    if layout not in _LAYOUT_BACKBONE:
        raise WeightsError(f"model {model.name!r} is not an InceptionV1 backbone (layout {layout!r}); foreign "
                           f"weights files fit inception_v1_slim or inception_v1_caffe")
    targets = {}
    for layer in model.layers:
        scope = _layer_scope(layer.name)
        for var in layer.weights:
            if layout == "slim":
                key = f"{SLIM_SCOPE}/{scope}/{'weights' if var.name == 'kernel' else var.name}"
                target = _Target(var, "none")
            elif var.name == "kernel":
                key, target = scope, _Target(var, "oihw_to_hwio")
            else:  # Caffe biases: the official code reads '<name>_bias' and flattens it
                key, target = f"{scope}_{var.name}", _Target(var, "flat")
            if key in targets:  # a programming error in the architecture table, not a user error
                raise AssertionError(f"two variables map to {key}")
            targets[key] = target
    if len(targets) != len(model.weights):
        raise AssertionError("some backbone variables are outside the name map")
    return targets


def _skipped_on_purpose(name: str, fmt: str) -> bool:
    if fmt == "slim":
        return (name.startswith((f"{SLIM_SCOPE}/Logits/", f"{SLIM_SCOPE}/AuxLogits/")) or name == "global_step"
                or name.rsplit("/", 1)[-1] in _SLOT_SUFFIXES)
    return name.startswith(("loss1/", "loss2/", "loss3/"))


def _as_model_shape(shape: tuple, transform: str) -> tuple:
    """The shape a stored array takes after `transform` (None when it cannot take it)."""
    if transform == "oihw_to_hwio":
        return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
    if transform == "flat":
        return (int(np.prod(shape)),) if sum(d != 1 for d in shape) <= 1 else shape
    return shape


def _as_model_value(value, transform: str):
    value = np.asarray(value)
    if transform == "oihw_to_hwio":
        return np.transpose(value, (2, 3, 1, 0))  # Caffe (out, in, h, w) -> (h, w, in, out), as the official code
    if transform == "flat":
        return value.reshape(-1)
    return value


def _brief(names, limit=None) -> str:
    names = list(names)
    if limit is not None and len(names) > limit:
        names = names[:limit] + [f"... {len(names) - limit} more"]
    return ", ".join(names)


def _one_line(error) -> str:
    return " ".join(str(error).split())


def _load_foreign(model, source: WeightSource) -> LoadReport:
    """Verify `source` against the model's name map, then assign every variable once."""
    backbone, layout = _identity(model)
    if layout != _FORMAT_LAYOUT[source.format]:
        fits = _LAYOUT_BACKBONE[_FORMAT_LAYOUT[source.format]]
        raise WeightsError(f"{source.path} is {_FORMAT_WORDS[source.format]}, which fits {fits}, not {backbone}; "
                           f"build the backbone with name={fits!r} (--backbone={fits})")
    targets = source_name_map(model)
    missing = [k for k in targets if k not in source.shapes]
    skipped = tuple(sorted(k for k in source.shapes if k not in targets and _skipped_on_purpose(k, source.format)))
    unexpected = sorted(k for k in source.shapes if k not in targets and k not in skipped)
    misshaped = []
    for key, target in targets.items():
        if key in source.shapes:
            got = _as_model_shape(source.shapes[key], target.transform)
            want = tuple(target.variable.shape)
            if got != want:
                misshaped.append(f"{key} {list(source.shapes[key])} (model wants {list(want)})")
    if missing or unexpected or misshaped:
        parts = [f"{title} {len(items)}: {_brief(items)}" for title, items in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]
        raise WeightsError(f"{source.path} does not match {backbone}, nothing was loaded: " + "; ".join(parts))
    values = 0
    for key, target in targets.items():
        value = _as_model_value(source.get(key), target.transform)
        target.variable.assign(value.astype(target.variable.dtype))
        values += value.size
    return LoadReport(source.path, source.format, len(targets), values, skipped)


# ---------------------------------------------------------------------------------------------------------------
# Keras weight files
# ---------------------------------------------------------------------------------------------------------------
def _h5_tree(path: str) -> dict:
    import h5py
    tree = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: tree.__setitem__(name, tuple(obj.shape))
                     if isinstance(obj, h5py.Dataset) else None)
    return tree


def _is_legacy_h5(path: str) -> bool:
    import h5py
    with h5py.File(path, "r") as f:
        return "layer_names" in f.attrs or "model_weights" in f


def _keras_targets(model) -> list:
    """Models a Keras file may be meant for: for ResNet-50 the keras.applications sub-model first, then ours."""
    from hdml_tf.backbones.resnet import INNER_NAME
    if _identity(model)[0] == "resnet50":
        return [model.get_layer(INNER_NAME), model]
    return [model]


def _with_suffix(path: str, suffix: str, tmp: str) -> str:
    """Keras picks its reader from the file name; link the file under a name with the right suffix if needed."""
    if path.endswith(suffix):
        return path
    link = os.path.join(tmp, "weights" + suffix)
    os.symlink(os.path.abspath(path), link)
    return link


def _tree_difference(template: dict, found: dict) -> list:
    missing = [k for k in template if k not in found]
    unexpected = [k for k in found if k not in template]
    misshaped = [f"{k} {list(found[k])} (model wants {list(template[k])})" for k in template
                 if k in found and found[k] != template[k]]
    return [f"{title} {len(items)}: {_brief(items, 8)}" for title, items in
            (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if items]


def _load_keras(model, path: str) -> LoadReport:
    """Load a Keras weights file after checking its entries against what the model itself would save."""
    backbone = _identity(model)[0]
    candidates = _keras_targets(model)
    with tempfile.TemporaryDirectory() as tmp:
        if _is_legacy_h5(path):
            target = candidates[0]  # legacy files come from keras.applications: the inner ResNet-50
            try:
                target.load_weights(_with_suffix(path, ".h5", tmp))
            except (ValueError, KeyError, OSError) as e:
                raise WeightsError(f"{path} does not match {backbone}: {_one_line(e)[:300]}") from None
        else:
            found = _h5_tree(path)
            best = None
            for i, candidate in enumerate(candidates):
                template_path = os.path.join(tmp, f"template{i}.weights.h5")
                candidate.save_weights(template_path)
                diff = _tree_difference(_h5_tree(template_path), found)
                if not diff:
                    best = (candidate, [])
                    break
                if best is None or len(diff) < len(best[1]):
                    best = (candidate, diff)
            target, diff = best
            if diff:
                raise WeightsError(f"{path} is not a Keras weights file of {backbone}, nothing was loaded: "
                                   + "; ".join(diff))
            try:
                target.load_weights(_with_suffix(path, ".weights.h5", tmp))
            except (ValueError, KeyError, OSError) as e:
                raise WeightsError(f"{path} does not match {backbone}: {_one_line(e)[:300]}") from None
    values = sum(int(np.prod(v.shape)) for v in target.weights)
    return LoadReport(path, "keras", len(target.weights), values)


def load_backbone_weights(model, path, format: str = "auto") -> LoadReport:
    """Load ImageNet (or converted) weights into a backbone built by `build_backbone`, by name, verified.

    Args:
        model: a backbone from `build_backbone` (carries `layout` and `backbone_name`).
        path: the weights file (see `detect_format` for what a path may be).
        format: "auto" (detected from the file), "slim", "caffe" or "keras".

    Returns:
        LoadReport with the counts of assigned variables and values and the names skipped on purpose.

    Raises:
        WeightsError: one line listing every missing, unexpected and mis-shaped variable (nothing is written then),
            a file of the other layout, or an unreadable file.
    """
    fmt, where = detect_format(path, format)
    if fmt == "keras":
        return _load_keras(model, where)
    backbone, layout = _identity(model)
    if layout not in _LAYOUT_BACKBONE:
        raise WeightsError(f"{path} is {_FORMAT_WORDS[fmt]}, which fits {_LAYOUT_BACKBONE[_FORMAT_LAYOUT[fmt]]}, "
                           f"not {backbone}")
    source = read_slim_checkpoint(where) if fmt == "slim" else read_caffe_mat(where)
    return _load_foreign(model, source)
