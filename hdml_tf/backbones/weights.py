"""Load ImageNet weights into a backbone by name, verified: every variable assigned exactly once, or none at all.

Three file formats, detected from the file or stated:

- "slim": a TF-Slim InceptionV1 checkpoint (`inception_v1.ckpt` from inception_v1_2016_08_28: TF1 name-based, V1
  single file or V2 `.index` + `.data-*`), read with TensorFlow's own checkpoint reader. Keys look like
  `InceptionV1/Conv2d_1a_7x7/weights` and `InceptionV1/Mixed_3b/Branch_1/Conv2d_0b_3x3/BatchNorm/moving_mean`
  (BatchNorm has beta, moving_mean, moving_variance; no gamma since slim uses scale=False).
- "caffe": the BVLC GoogLeNet `.mat` the official HDML code loads (`tf_ckpt_from_caffe.mat`, lib/GoogleNet_Model.py
  `variables_dict`): kernels under the Caffe layer name (`inception_3a/5x5`) in Caffe layout (out, in, h, w),
  transposed here to Keras' (h, w, in, out); biases under `<name>_bias`, flattened (a row, a column or a vector).
- "keras": a Keras weights file of our own backbone (`.weights.h5`, as tools/convert_weights.py writes), or for
  ResNet-50 a keras.applications notop file (legacy `.h5` or `.weights.h5`).

Skipped on purpose, and named in the one info line a load logs: the ImageNet classifier (`InceptionV1/Logits/...`,
`loss3/classifier`), the Caffe auxiliary heads (`loss1/...`, `loss2/...`), the 64-d `fc_embedding` layer (and its
bias) that the published `.mat` carries from the work it was converted for, MATLAB's own `__header__`,
`__version__` and `__globals__` entries, and training bookkeeping in checkpoints (`global_step`, optimizer slots,
moving-average shadows). Anything else that does not match -- a backbone variable absent from the file, a file
entry the backbone does not have, or a shape that differs -- stops the load with one WeightsError.

Nothing is ever half-loaded: every array is read and checked (readable, the stored shape, a floating-point dtype,
finite values) before the first variable is written, and if writing fails anyway the previous values are put back.
Every error is one line that names the file, says what is wrong with it (empty, truncated, not a .mat, not a
checkpoint, another backbone's file) and, where it can tell, which `--backbone` the file fits.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import logging
import os
import tempfile

import numpy as np

from hdml_tf.errors import WeightsError

log = logging.getLogger(__name__)

FORMATS = ("auto", "slim", "caffe", "keras")
SLIM_SCOPE = "InceptionV1"
_MAT_MAGIC = b"MATLAB 5.0 MAT-file"
_MAT73_MAGIC = b"MATLAB 7.3 MAT-file"
_MAT_HEADER_BYTES = 128  # a level-5 .mat starts with a 128-byte header (text, subsystem offset, version, endianness)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# MATLAB entries scipy.io.loadmat adds to every file; not arrays.
_MAT_META = ("__header__", "__version__", "__globals__")
# Which backbone weights layout (Backbone.weights_layout) each foreign format fits.
_FORMAT_LAYOUT = {"slim": "slim", "caffe": "caffe"}
_FORMAT_WORDS = {"slim": "a TF-Slim InceptionV1 checkpoint", "caffe": "a Caffe GoogLeNet .mat"}
_LAYOUT_BACKBONE = {"slim": "inception_v1_slim", "caffe": "inception_v1_caffe"}
# Checkpoint entries that are not weights: optimizer slots and moving-average shadows end with these.
_SLOT_SUFFIXES = ("ExponentialMovingAverage", "RMSProp", "RMSProp_1", "Momentum", "Adam", "Adam_1")
# How many names an error lists before it says "and N more".
_NAMES_SHOWN = 4


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What a load did. `assigned` variables holding `values` numbers were written; `skipped` names were ignored
    on purpose (classifier, auxiliary heads, fc_embedding, MATLAB header entries, bookkeeping)."""
    path: str
    format: str
    assigned: int
    values: int
    skipped: tuple = ()

    def summary(self) -> str:
        skipped = (f"; skipped {len(self.skipped)} entries that are not backbone ({', '.join(self.skipped)})"
                   if self.skipped else "")
        return (f"loaded {self.format} weights from {self.path}: {self.assigned} variables, "
                f"{self.values:,} values{skipped}")


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """Named arrays from a foreign file: `shapes` maps every array to its stored shape; `get(name)` reads one (and
    may raise anything a damaged file makes its reader raise); `meta` names entries that are not arrays
    (MATLAB's `__header__`, ...)."""
    path: str
    format: str
    shapes: dict
    get: object
    meta: tuple = ()


def _identity(model):
    """(backbone name, weights layout) of a model: a `Backbone` knows both; any other model is named by its name and
    has no layout that foreign files fit."""
    return getattr(model, "backbone_name", model.name), getattr(model, "weights_layout", None)


def _brief(names, limit: int = _NAMES_SHOWN) -> str:
    """'a, b, c' or, for a long list, 'a, b, c, d and 110 more'."""
    names = [str(n) for n in names]
    if len(names) > limit:
        return ", ".join(names[:limit]) + f" and {len(names) - limit} more"
    return ", ".join(names)


def _one_line(error) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


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

    Detection: a checkpoint prefix, directory, `.index` or `.data-*` file is "slim"; a file that starts with the
    MATLAB 5.0 header or is named `*.mat` is "caffe" (its reader then says exactly what is wrong with it); an HDF5
    file or a `*.h5` name is "keras"; anything else may still be a V1 single-file checkpoint ("slim").

    Args:
        path: a TF checkpoint (prefix such as `inception_v1.ckpt`, its `.index` / `.data-*` file, a V1 single-file
            checkpoint, or a directory holding one), a Caffe `.mat`, or a Keras `.h5` / `.weights.h5`.
        format: "auto" (look at the file) or one of "slim", "caffe", "keras".

    Returns:
        (format, path to read), format in {"slim", "caffe", "keras"}.

    Raises:
        WeightsError: no such file, an empty file, unknown format, a MATLAB v7.3 file, or a stated format that
            contradicts what the path is.
    """
    if format not in FORMATS:
        raise WeightsError(f"unknown weights format {format!r}; expected one of {', '.join(FORMATS)}")
    path = os.fspath(path)
    if os.path.isdir(path) and not _checkpoint_prefix(path):
        raise WeightsError(f"{path} is a directory without a TensorFlow checkpoint; expected a TF-Slim .ckpt, a "
                           f"Caffe GoogLeNet .mat or a Keras .weights.h5")
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
    size = os.path.getsize(path)
    if size == 0:
        raise WeightsError(f"{path} is empty (0 bytes), not a weights file: the download or copy did not finish")
    with open(path, "rb") as f:
        head = f.read(_MAT_HEADER_BYTES)
    if head.startswith(_MAT73_MAGIC):
        raise WeightsError(f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; re-save it in MATLAB "
                           f"with save(..., '-v7')")
    if format != "auto":
        return format, path
    if head.startswith(_MAT_MAGIC) or path.lower().endswith(".mat"):
        return "caffe", path
    if head.startswith(_HDF5_MAGIC) or path.lower().endswith((".h5", ".hdf5")):
        return "keras", path
    return "slim", path  # a V1 single-file checkpoint has no magic bytes; the checkpoint reader will judge


def read_slim_checkpoint(path: str) -> WeightSource:
    """Open a TF1 name-based checkpoint with TensorFlow's reader (tf.train.load_checkpoint); values are read by
    `get` (lazily: a truncated `.data` file only shows when its arrays are read)."""
    import tensorflow as tf
    try:
        reader = tf.train.load_checkpoint(path)
        shapes = {k: tuple(v) for k, v in reader.get_variable_to_shape_map().items()}
    except Exception as e:  # TF raises OpError, ValueError or a bare RuntimeError depending on the damage
        raise WeightsError(f"{path} is not a readable TensorFlow checkpoint (expected TF-Slim's inception_v1.ckpt, "
                           f"a Caffe GoogLeNet .mat or a Keras .weights.h5): {_one_line(e)}") from None
    return WeightSource(path, "slim", shapes, reader.get_tensor)


def read_caffe_mat(path: str) -> WeightSource:
    """Open a Caffe GoogLeNet `.mat` (scipy.io.loadmat reads every array at once).

    Raises:
        WeightsError: the file is empty, does not start with the MATLAB 5.0 header, is shorter than that header,
            holds no arrays, or is cut or damaged further in.
    """
    import scipy.io
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(_MAT_HEADER_BYTES)
    if size == 0:
        raise WeightsError(f"{path} is empty (0 bytes), not a .mat file: the download or copy did not finish")
    cut_inside_magic = len(head) < len(_MAT_MAGIC) and _MAT_MAGIC.startswith(head)
    if not (head.startswith(_MAT_MAGIC) or cut_inside_magic):
        raise WeightsError(f"{path} is not a .mat file: it does not start with MATLAB's 'MATLAB 5.0 MAT-file' "
                           f"header (the Caffe GoogLeNet weights of the official HDML code are one)")
    if size < _MAT_HEADER_BYTES:
        raise WeightsError(f"{path} is a truncated .mat file: {size} bytes, shorter than its {_MAT_HEADER_BYTES}-byte "
                           f"header")
    try:
        loaded = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises MatReadError, OSError, IndexError, TypeError, ... on a damaged file
        raise WeightsError(f"{path} is a truncated or damaged .mat file ({size:,} bytes): scipy could not read its "
                           f"arrays ({_one_line(e)})") from None
    meta = tuple(sorted(k for k in loaded if k in _MAT_META))
    arrays = {k: v for k, v in loaded.items() if k not in _MAT_META}
    if not arrays:
        raise WeightsError(f"{path} is a .mat file with no arrays ({size:,} bytes): truncated after its header")
    shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    return WeightSource(path, "caffe", shapes, arrays.__getitem__, meta)


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
    """Entries of a published file that are not part of the backbone and are left out by design."""
    if fmt == "slim":
        return (name.startswith((f"{SLIM_SCOPE}/Logits/", f"{SLIM_SCOPE}/AuxLogits/")) or name == "global_step"
                or name.rsplit("/", 1)[-1] in _SLOT_SUFFIXES)
    # Caffe: the ImageNet heads, and the embedding layer of Feature_Embed_GoogLeNet that tf_ckpt_from_caffe.mat
    # carries (fc_embedding [64, 1024] and fc_embedding_bias), which the official HDML code never reads.
    return name.startswith(("loss1/", "loss2/", "loss3/", "fc_embedding"))


def _as_model_shape(shape: tuple, transform: str) -> tuple:
    """The shape a stored array takes after `transform` (None when it cannot take it)."""
    if transform == "oihw_to_hwio":
        return (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else None
    if transform == "flat":
        return (int(np.prod(shape)),) if sum(d != 1 for d in shape) <= 1 else None
    return tuple(shape)


def _as_model_value(value, transform: str):
    value = np.asarray(value)
    if transform == "oihw_to_hwio":
        return np.transpose(value, (2, 3, 1, 0))  # Caffe (out, in, h, w) -> (h, w, in, out), as the official code
    if transform == "flat":
        return value.reshape(-1)
    return value


def _misshape_detail(key: str, stored: tuple, target: _Target) -> str:
    """One clause: the stored shape, what reading it in the file's layout gave, and what the layer needs."""
    want = list(target.variable.shape)
    got = _as_model_shape(stored, target.transform)
    if target.transform == "oihw_to_hwio":
        if got is None:
            return (f"{key} stored {list(stored)}: not a 4-d (out, in, h, w) kernel; the layer needs (h, w, in, out) "
                    f"{want}")
        hint = ("; the file holds it in TensorFlow's (h, w, in, out) order already, not Caffe's"
                if tuple(stored) == tuple(want) else "")
        return (f"{key} stored {list(stored)}, read as Caffe (out, in, h, w) and transposed (2, 3, 1, 0) to "
                f"{list(got)}; the layer needs (h, w, in, out) {want}{hint}")
    if target.transform == "flat":
        return f"{key} stored {list(stored)} ({int(np.prod(stored))} values); the layer needs {want[0]} values"
    return f"{key} stored {list(stored)}; the layer needs {want}"


def _describe_foreign(source: WeightSource, targets: dict) -> str:
    """What the file holds when none of its names is a backbone variable (so it is not the expected file at all)."""
    names = sorted(source.shapes)
    if source.format == "caffe":
        return (f"{source.path} is a .mat file of {len(names)} arrays, none named like a BVLC GoogLeNet layer of the "
                f"official HDML code's tf_ckpt_from_caffe.mat (it holds {_brief(names)}); it fits no backbone here")
    scoped = [n for n in names if n.startswith(SLIM_SCOPE + "/")]
    what = "TF-Slim InceptionV1 variables under other names" if scoped else "no TF-Slim InceptionV1 variable"
    return (f"{source.path} is a TensorFlow checkpoint of {len(names)} variables with {what} ({_brief(names)}); it "
            f"fits no backbone here (inception_v1_slim reads TF-Slim's inception_v1.ckpt)")


def _check_names_and_shapes(source: WeightSource, targets: dict, backbone: str) -> tuple:
    """Compares the file's names and stored shapes with the name map; returns the names skipped on purpose.

    Raises:
        WeightsError: one line with the counts and the first few names of everything missing, unexpected or
            mis-shaped (nothing has been read or written yet).
    """
    missing = [k for k in targets if k not in source.shapes]
    skipped = sorted(k for k in source.shapes if k not in targets and _skipped_on_purpose(k, source.format))
    unexpected = sorted(k for k in source.shapes if k not in targets and k not in skipped)
    if len(missing) == len(targets):
        raise WeightsError(_describe_foreign(source, targets) + "; nothing was loaded")
    misshaped = [_misshape_detail(k, source.shapes[k], t) for k, t in targets.items()
                 if k in source.shapes and _as_model_shape(source.shapes[k], t.transform) != tuple(t.variable.shape)]
    if missing or unexpected or misshaped:
        parts = [f"{title} {len(items)}: {_brief(items, limit)}" for title, items, limit in
                 (("missing", missing, _NAMES_SHOWN), ("unexpected", unexpected, _NAMES_SHOWN),
                  ("mis-shaped", misshaped, 2)) if items]
        raise WeightsError(f"{source.path} is {_FORMAT_WORDS[source.format]} that does not match {backbone}, "
                           f"nothing was loaded: " + "; ".join(parts))
    return tuple(skipped) + tuple(source.meta)


def _read_and_check(source: WeightSource, targets: dict) -> dict:
    """Reads every array the backbone needs and checks it (readable, stored shape, floating point, finite).

    Returns:
        {source name: array in the model's layout and dtype}.

    Raises:
        WeightsError: the first unreadable array (a truncated or damaged file), or every array with a wrong shape,
            a non-float dtype or NaN / Inf values. Nothing has been written to the model.
    """
    values, bad_dtype, not_finite = {}, [], []
    for key, target in targets.items():
        try:
            stored = np.asarray(source.get(key))
        except Exception as e:  # e.g. IndexError "Read less bytes than requested" from a cut .data file
            what = "checkpoint data" if source.format == "slim" else "file"
            raise WeightsError(f"{source.path}: the {what} is truncated or damaged: reading {key} failed "
                               f"({_one_line(e)}); nothing was loaded") from None
        if tuple(stored.shape) != tuple(source.shapes[key]):
            raise WeightsError(f"{source.path} is damaged: {key} is listed as {list(source.shapes[key])} but holds "
                               f"{list(stored.shape)}; nothing was loaded")
        if not np.issubdtype(stored.dtype, np.floating):
            bad_dtype.append(f"{key} ({stored.dtype})")
            continue
        if not np.all(np.isfinite(stored)):
            not_finite.append(key)
        values[key] = _as_model_value(stored, target.transform).astype(target.variable.dtype)
    if bad_dtype or not_finite:
        parts = ([f"{len(bad_dtype)} arrays are not floating point: {_brief(bad_dtype)}"] if bad_dtype else []) + \
                ([f"{len(not_finite)} arrays hold NaN or Inf: {_brief(not_finite)}"] if not_finite else [])
        raise WeightsError(f"{source.path} is damaged: " + "; ".join(parts) + "; nothing was loaded")
    return values


def _assign_all(pairs) -> None:
    """Writes every (variable, value); if one write fails, every variable gets its previous value back."""
    before = [np.array(variable.numpy(), copy=True) for variable, _ in pairs]
    try:
        for variable, value in pairs:
            variable.assign(value)
    except Exception:
        for (variable, _), old in zip(pairs, before):
            variable.assign(old)
        raise


def _load_foreign(model, source: WeightSource) -> LoadReport:
    """Verify `source` against the model's name map, read and check every array, then assign every variable once."""
    backbone, layout = _identity(model)
    if layout != _FORMAT_LAYOUT[source.format]:
        fits = _LAYOUT_BACKBONE[_FORMAT_LAYOUT[source.format]]
        raise WeightsError(f"{source.path} is {_FORMAT_WORDS[source.format]}, which fits {fits}, not {backbone}; "
                           f"build the backbone with name={fits!r} (--backbone={fits})")
    targets = source_name_map(model)
    skipped = _check_names_and_shapes(source, targets, backbone)
    values = _read_and_check(source, targets)
    _assign_all([(targets[key].variable, value) for key, value in values.items()])
    return LoadReport(source.path, source.format, len(targets), sum(v.size for v in values.values()), skipped)


# ---------------------------------------------------------------------------------------------------------------
# Keras weight files
# ---------------------------------------------------------------------------------------------------------------
def _h5_arrays(path: str, read: bool) -> dict:
    """{dataset path: shape} of an HDF5 file; with `read`, every dataset's data is read too (a truncated file
    fails here, before anything is assigned).

    Raises:
        WeightsError: not an HDF5 file, or a truncated or damaged one.
    """
    import h5py
    tree = {}
    try:
        with h5py.File(path, "r") as f:
            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    tree[name] = tuple(obj.shape)
                    if read:
                        obj[()]
            f.visititems(visit)
    except Exception as e:  # h5py raises OSError / KeyError / RuntimeError for damaged files
        raise WeightsError(f"{path} is not a readable Keras weights file (HDF5): truncated or damaged "
                           f"({_one_line(e)}); nothing was loaded") from None
    return tree


def _is_legacy_h5(path: str) -> bool:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            return "layer_names" in f.attrs or "model_weights" in f
    except Exception as e:
        raise WeightsError(f"{path} is not a readable Keras weights file (HDF5): truncated or damaged "
                           f"({_one_line(e)}); nothing was loaded") from None


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


def _template(model) -> dict:
    """{dataset path: shape} that `model.save_weights` writes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "template.weights.h5")
        model.save_weights(path)
        return _h5_arrays(path, read=False)


@functools.lru_cache(maxsize=None)
def _backbone_templates() -> tuple:
    """((backbone name, template tree), ...) of every backbone, for telling which one a Keras file belongs to.
    Built on demand (error paths only), once per process."""
    from hdml_tf.backbones import BACKBONES, build_backbone
    found = []
    for name in BACKBONES:
        model = build_backbone(name, 64)  # the variables do not depend on the size; 64 is valid for all three
        for candidate in _keras_targets(model):
            found.append((name, _template(candidate)))
    return tuple(found)


def _which_backbone(found: dict):
    """The backbone whose own Keras weights file has exactly the layout of `found`, or None."""
    for name, template in _backbone_templates():
        if template == found:
            return name
    return None


def _tree_difference(template: dict, found: dict) -> list:
    missing = [k for k in template if k not in found]
    unexpected = [k for k in found if k not in template]
    misshaped = [f"{k} {list(found[k])} (model needs {list(template[k])})" for k in template
                 if k in found and found[k] != template[k]]
    return [f"{title} {len(items)}: {_brief(items, limit)}" for title, items, limit in
            (("missing", missing, _NAMES_SHOWN), ("unexpected", unexpected, _NAMES_SHOWN),
             ("mis-shaped", misshaped, 2)) if items]


def _keras_load(target, path: str, suffix: str, backbone: str) -> None:
    """`target.load_weights`, restoring every variable of `target` if Keras fails part-way."""
    before = [np.array(v.numpy(), copy=True) for v in target.weights]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            target.load_weights(_with_suffix(path, suffix, tmp))
        except Exception as e:  # Keras raises ValueError / KeyError / OSError for files that do not fit
            for variable, old in zip(target.weights, before):
                variable.assign(old)
            raise WeightsError(f"{path} does not match {backbone}, nothing was loaded: {_one_line(e)}") from None


def _load_keras(model, path: str) -> LoadReport:
    """Load a Keras weights file after reading every array and checking its entries against what the model itself
    would save; a file of another backbone is named as such."""
    backbone = _identity(model)[0]
    candidates = _keras_targets(model)
    if _is_legacy_h5(path):
        _h5_arrays(path, read=True)
        target = candidates[0]  # legacy files come from keras.applications: the inner ResNet-50
        _keras_load(target, path, ".h5", backbone)
    else:
        found = _h5_arrays(path, read=True)
        best = None
        for candidate in candidates:
            diff = _tree_difference(_template(candidate), found)
            if not diff:
                best = (candidate, [])
                break
            if best is None or len(diff) < len(best[1]):
                best = (candidate, diff)
        target, diff = best
        if diff:
            other = _which_backbone(found)
            if other is not None:
                raise WeightsError(f"{path} is a Keras weights file of {other}, not {backbone}: use "
                                   f"--backbone={other} (build_backbone({other!r}, ...)); nothing was loaded")
            raise WeightsError(f"{path} is a Keras weights file of {len(found)} arrays that fits no backbone here "
                               f"(not {backbone}: " + "; ".join(diff) + "); nothing was loaded")
        _keras_load(target, path, ".weights.h5", backbone)
    values = sum(int(np.prod(v.shape)) for v in target.weights)
    return LoadReport(path, "keras", len(target.weights), values)


def load_backbone_weights(model, path, format: str = "auto") -> LoadReport:
    """Load ImageNet (or converted) weights into a backbone built by `build_backbone`, by name, verified.

    Either every backbone variable is written, or none is: the whole file is read and checked first, and a
    failure while writing puts the previous values back. Logs one info line (LoadReport.summary) naming what was
    skipped on purpose.

    Args:
        model: a `Backbone` from `build_backbone` (carries `weights_layout` and `backbone_name`).
        path: the weights file (see `detect_format` for what a path may be).
        format: "auto" (detected from the file), "slim", "caffe" or "keras".

    Returns:
        LoadReport with the counts of assigned variables and values and the names skipped on purpose.

    Raises:
        WeightsError: one line naming the file and what is wrong with it: empty, truncated or damaged, not a .mat /
            not a checkpoint / not HDF5, another backbone's file (with the --backbone it fits), or the counts and
            first names of missing, unexpected and mis-shaped variables. The model is unchanged.
    """
    fmt, where = detect_format(path, format)
    if fmt == "keras":
        report = _load_keras(model, where)
    else:
        backbone, layout = _identity(model)
        if layout not in _LAYOUT_BACKBONE:
            fits = _LAYOUT_BACKBONE[_FORMAT_LAYOUT[fmt]]
            raise WeightsError(f"{path} is {_FORMAT_WORDS[fmt]}, which fits {fits}, not {backbone}; use "
                               f"--backbone={fits}")
        source = read_slim_checkpoint(where) if fmt == "slim" else read_caffe_mat(where)
        report = _load_foreign(model, source)
    log.info(report.summary())
    return report
