"""The run directory: every file a training run leaves in its `--output_dir`, written and read in one place.

    runs/demo/
      results.json             configuration, data counts, metrics of every scored network (`write_results`)
      history_<variant>.csv    per-epoch means of every logged quantity (`write_history`)
      steps_<variant>.csv      every step's own logged values (`hdml_tf.diagnostics.StepLog`); steps_<variant>.png
      curves_<variant>.png     the training curves (`plot_curves`)
      <variant>.keras          the whole training model: weights, generator, classifier, running means and the three
                               optimizers (`save_keras`; `load_keras` resumes training from it)
      <variant>.weights.h5     the last weights alone
      <variant>.best.weights.h5, eval_<variant>.csv, eval_<variant>.json, logs/<variant>/   with evaluation during
                               training (`hdml_tf.evaluation.EvaluationCallback`)

`<variant>` is "hdml" or "baseline". Every file is written atomically (`hdml_tf.atomic`). The tools read runs back
through this module only: `find_checkpoint` resolves a run directory, a `.keras` or a `.weights.h5` to the weights
plus the run's configuration, `load_checkpoint` rebuilds the model from them, and `load_embedder` gives any of those
(or an exported SavedModel) as a callable images → embeddings for the embed / search / evaluate tools.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from hdml_tf import atomic
from hdml_tf.errors import HDMLError

if TYPE_CHECKING:  # pragma: no cover
    from hdml_tf.serving import EmbeddingInfo

# TensorFlow, Keras and hdml_tf.serving are imported inside the functions that load or save models, so that tools can
# resolve and check paths (`find_checkpoint`, `RunDir`) and fail with one line before the slow TensorFlow import.

RESULTS = "results.json"
VARIANTS = ("hdml", "baseline")
#: The hdml_tf entry `save_keras` adds to a `.keras` zip (geometry and the three optimizers' configurations).
KERAS_METADATA_ENTRY = "hdml_tf.json"
_OPTIMIZER_NAMES = ("metric_optimizer", "generator_optimizer", "classifier_optimizer")


class RunDir:
    """The files of one run directory (see the module docstring); nothing is created until something is written."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    # ---------------------------------------------------------------------------------------- names
    @property
    def results(self) -> Path:
        return self.path / RESULTS

    def keras(self, variant: str) -> Path:
        return self.path / f"{variant}.keras"

    def weights(self, variant: str) -> Path:
        return self.path / f"{variant}.weights.h5"

    def best_weights(self, variant: str) -> Path:
        return self.path / f"{variant}.best.weights.h5"

    def history(self, variant: str) -> Path:
        return self.path / f"history_{variant}.csv"

    def curves(self, variant: str) -> Path:
        return self.path / f"curves_{variant}.png"

    def eval_csv(self, variant: str) -> Path:
        return self.path / f"eval_{variant}.csv"

    def eval_json(self, variant: str) -> Path:
        return self.path / f"eval_{variant}.json"

    def logs(self, variant: str) -> Path:
        return self.path / "logs" / variant

    def steps(self, variant: str) -> Path:
        """Every step's own logged values (`hdml_tf.diagnostics.StepLog`)."""
        return self.path / f"steps_{variant}.csv"

    def step_curves(self, variant: str) -> Path:
        return self.path / f"steps_{variant}.png"

    # ---------------------------------------------------------------------------------------- writing
    def write_results(self, results: Dict) -> Path:
        """results.json (atomic)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic.write_json(self.results, results)

    def write_history(self, variant: str, history: Dict[str, List[float]]) -> Path:
        """history_<variant>.csv: one row per epoch ("epoch" 1.., then every logged key, sorted; atomic)."""
        keys = sorted(history)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["epoch"] + keys)
        for i in range(len(history[keys[0]]) if keys else 0):
            writer.writerow([i + 1] + [float(history[k][i]) for k in keys])
        self.path.mkdir(parents=True, exist_ok=True)
        return atomic.write_text(self.history(variant), buffer.getvalue())

    def plot_curves(self, variant: str) -> Optional[Path]:
        """curves_<variant>.png from history_<variant>.csv (None when matplotlib is missing)."""
        try:
            from hdml_tf.evaluation.plots import plot_training_curves
        except ImportError:  # pragma: no cover - plots are optional for a run
            return None
        plot_training_curves(str(self.history(variant)), str(self.curves(variant)))
        return self.curves(variant)

    def plot_steps(self, variant: str) -> Optional[Path]:
        """steps_<variant>.png from steps_<variant>.csv (None when matplotlib is missing or nothing was logged)."""
        try:
            from hdml_tf.diagnostics import plot_steps
        except ImportError:  # pragma: no cover - plots are optional for a run
            return None
        if not self.steps(variant).exists():
            return None
        drawn = plot_steps(self.steps(variant), self.step_curves(variant), title=f"{variant}: every step")
        return Path(drawn) if drawn else None

    def save_model(self, model, variant: str, *, image_size: int, resize: int, backbone: str) -> None:
        """<variant>.weights.h5 and <variant>.keras (with the run's geometry), each atomic."""
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(self.weights(variant)) as temp:
            model.save_weights(str(temp))
        save_keras(model, self.keras(variant), image_size=image_size, resize=resize, backbone=backbone)

    # ---------------------------------------------------------------------------------------- reading
    def read_results(self) -> Dict:
        """results.json as a dict ({} when absent); HDMLError when unreadable."""
        if not self.results.is_file():
            return {}
        try:
            return json.loads(self.results.read_text())
        except (OSError, ValueError) as e:
            raise HDMLError(f"{self.results} is not readable JSON ({e})") from None

    def variants(self) -> Tuple[str, ...]:
        """Variants with saved weights, "hdml" first."""
        return tuple(v for v in VARIANTS if self.keras(v).is_file() or self.weights(v).is_file())


# -------------------------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where the weights are (`kind` "keras" or "weights") and the run's results.json "run" / "method" ({}: none)."""

    path: str
    kind: str
    run: dict
    method: dict


def find_checkpoint(path: str, variant: str = "auto") -> Checkpoint:
    """Resolves a run directory, a `.keras` or a `.weights.h5` file to its weights plus the run's configuration
    (results.json of the directory the weights are in).

    Args:
      path: what the user named.
      variant: "hdml" or "baseline" in a run directory ("auto": hdml when present).
    Raises:
      HDMLError: nothing usable at `path` (one line saying what was expected).
    """
    if not path:
        raise HDMLError("a training run directory, a .keras or a .weights.h5 file is required")
    if not os.path.exists(path):
        raise HDMLError(f"checkpoint {path} not found; expected a training run directory, a .keras or a "
                        ".weights.h5 file")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            raise HDMLError(f"{path} is already a SavedModel; use it directly (tools/embed.py --model={path})")
        run_dir = RunDir(path)
        for name in ([variant] if variant != "auto" else list(VARIANTS)):
            for candidate in (run_dir.keras(name), run_dir.weights(name)):
                if candidate.is_file():
                    return _with_run(str(candidate))
        found = sorted(glob.glob(os.path.join(path, "*.keras")) + glob.glob(os.path.join(path, "*.weights.h5")))
        if len(found) == 1 and variant == "auto":
            return _with_run(found[0])
        if not found:
            raise HDMLError(f"no .keras or .weights.h5 file in {path}; expected a training run directory")
        raise HDMLError(f"{path} holds {', '.join(os.path.basename(f) for f in found)}; pass one of them"
                        + (f" (no {variant}.* there)" if variant != "auto" else ""))
    if path.endswith(".keras") or path.endswith(".weights.h5"):
        return _with_run(path)
    raise HDMLError(f"checkpoint {path} is neither a .keras nor a .weights.h5 file nor a run directory")


def _with_run(path: str) -> Checkpoint:
    data = RunDir(os.path.dirname(os.path.abspath(path))).read_results()
    return Checkpoint(path=path, kind="keras" if path.endswith(".keras") else "weights",
                      run=data.get("run", {}), method=data.get("method", {}))


def run_geometry(run: dict) -> Tuple[str, int, int]:
    """(backbone, crop, resize) of a training run's results.json "run" section, by the one geometry rule."""
    from hdml_tf.data import datasets
    backbone = run.get("backbone", "inception_v1_slim")
    augment = datasets.geometry(run.get("dataset", "glyphs"), backbone, int(run.get("image_size", 0) or 0),
                                int(run.get("resize", 0) or 0))
    return backbone, augment.crop, augment.resize


def _weights_layout(path: str):
    """(num_classes or None, has_generator, embedding_size or None) read from an HDMLModel weights file.

    Keras stores the classifier under "classifier_net/..." and the metric head (BatchNorm + Dense) as the one
    Sequential under "layers/..."; its Dense kernel is [D, E].
    """
    import h5py

    def kernels(group):
        found = []
        group.visititems(lambda name, obj: found.append((name, obj.shape)) if getattr(obj, "ndim", 0) == 2 else None)
        return found

    try:
        with h5py.File(path, "r") as f:
            has_generator = "generator_net" in f
            classes = kernels(f["classifier_net"]) if "classifier_net" in f else []
            heads = kernels(f["layers"]) if "layers" in f else []
    except OSError as e:
        raise HDMLError(f"cannot read weights file {path} ({e})")
    return (classes[0][1][-1] if len(classes) == 1 else None), has_generator, (
        heads[0][1][-1] if len(heads) == 1 else None)


def load_checkpoint(ckpt: Checkpoint, backbone: Optional[str] = None, embedding_size: int = 0, image_size: int = 0,
                    resize: int = 0):
    """(HDMLModel with the checkpoint's weights, EmbeddingInfo) — the geometry is the file's, else the run's, else
    the one rule's; explicit arguments win.

    Raises:
      HDMLError: a `.weights.h5` without its run and without --backbone, or weights that do not fit.
    """
    import tensorflow as tf

    from hdml_tf.serving import _backbone_name, embedding_info
    run_backbone, run_crop, run_resize = run_geometry(ckpt.run) if ckpt.run else (None, 0, 0)
    if ckpt.kind == "keras":
        info, _ = read_keras_info(ckpt.path)
        model = load_keras(ckpt.path, compile=False)
        if backbone or (run_backbone and not info):
            model.backbone.backbone_name = backbone or run_backbone
        if info is None:  # a plain model.save: the geometry of the run, if known
            info_size, info_resize = run_crop, run_resize
        else:
            info_size, info_resize = info.image_size, info.resize
        size = image_size or info_size
        return model, embedding_info(model.embedder(), size or None,
                                     resize or (info_resize if size == info_size else 0) or None,
                                     _backbone_name(model))

    from hdml_tf.backbones import build_backbone, default_image_size
    from hdml_tf.config import HDMLConfig
    from hdml_tf.model import HDMLModel

    backbone = backbone or run_backbone
    if not backbone:
        raise HDMLError(f"{ckpt.path} has no results.json beside it; pass --backbone (and --embedding_size, "
                        "--image_size, --resize as in training)")
    image_size = image_size or run_crop or default_image_size(backbone)
    resize = resize or (run_resize if image_size == run_crop else 0)
    num_classes, has_generator, stored_size = _weights_layout(ckpt.path)
    known = {f.name for f in dataclasses.fields(HDMLConfig)}
    method = {k: v for k, v in ckpt.method.items() if k in known}
    if embedding_size or stored_size:
        method["embedding_size"] = embedding_size or stored_size
    method["hdml"] = has_generator
    config = HDMLConfig(**method)
    model = HDMLModel(build_backbone(backbone, image_size), num_classes or 2, config)
    model(tf.zeros([1, image_size, image_size, 3]), training=False)  # Keras loads weights into built models only
    try:
        model.load_weights(ckpt.path)
    except (ValueError, KeyError) as e:
        detail = " ".join(str(e).split())[:300] or type(e).__name__
        raise HDMLError(f"{ckpt.path} does not fit a {backbone} HDMLModel with embedding size "
                        f"{config.embedding_size} (check --backbone and --embedding_size): {detail}")
    return model, embedding_info(model.embedder(), image_size, resize or None, backbone)


def load_embedder(path: str, variant: str = "auto"):
    """Any trained network as a callable uint8/float images [B, H, W, C] → L2-normalized embeddings [B, E], with the
    serving preprocessing: a SavedModel directory (tools/export.py), a run directory, a `.keras` or a `.weights.h5`
    (with its run beside it). The result has `.info` (EmbeddingInfo) and `.source`.

    Raises:
      HDMLError: nothing usable at `path`.
    """
    from hdml_tf.serving import ModelEmbedder, SavedModelEmbedder
    path = os.fspath(path)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        return SavedModelEmbedder(path)
    if not os.path.exists(path):
        raise HDMLError(f"model {path} not found; expected a SavedModel directory (tools/export.py --output), a "
                        "training run directory, or a .keras file")
    ckpt = find_checkpoint(path, variant)
    model, info = load_checkpoint(ckpt)
    return ModelEmbedder(model, info, source=ckpt.path)


# -------------------------------------------------------------------------------------------- .keras files
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
      path: file name ending with .keras (replaced atomically).
      image_size, resize, backbone: geometry and backbone name recorded for export and the embed / search tools
        (defaults as in `export_saved_model`).

    Returns:
      path.
    """
    import keras

    from hdml_tf.serving import _backbone_name, embedding_info
    from hdml_tf.model import HDMLModel
    path = Path(_check_keras_path(path))
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.atomic_path(path) as temp:
        with warnings.catch_warnings():
            # HDMLModel's sub-networks are built when it is constructed, but Keras only marks the outer model built
            # after a __call__; saving is complete either way.
            warnings.filterwarnings("ignore", message=".*has not yet been built.*")
            model.save(str(temp))
        with zipfile.ZipFile(temp, "a") as archive:
            archive.writestr(KERAS_METADATA_ENTRY, json.dumps(meta, indent=2, default=atomic._json_default))
    return str(path)


def read_keras_info(path: str) -> Tuple[Optional[EmbeddingInfo], Dict]:
    """(EmbeddingInfo or None, optimizers' serialized configs by compile argument name) of a `.keras` file.

    From the hdml_tf.json entry `save_keras` adds; for a file written by plain `model.save` (a Keras callback), from
    Keras' own compile config when it names HDMLModel's three optimizers (HDMLModel.get_compile_config).
    """
    from hdml_tf.serving import EmbeddingInfo
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
    import keras
    import tensorflow as tf

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
    from hdml_tf.serving import _backbone_name, embedding_info
    info = getattr(model, "export_info", None)
    if info is not None:
        return info
    return embedding_info(model.embedder(), backbone=_backbone_name(model))
