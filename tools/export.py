#!/usr/bin/env python
"""Export a trained embedding network as a TensorFlow SavedModel for serving (TF Serving, a Python service).

    python tools/export.py --checkpoint=runs/default --output=exported/glyphs
    python tools/export.py --checkpoint=runs/cub/hdml.keras --output=exported/cub
    python tools/export.py --checkpoint=hdml.weights.h5 --backbone=inception_v1_caffe --embedding_size=256 \
        --image_size=227 --resize=256 --output=exported/cub

--checkpoint is one of:
- a training run's --output_dir (tools/train.py): its results.json gives backbone, sizes and method; the weights are
  hdml.keras / hdml.weights.h5 (or baseline.*, chosen with --variant);
- a `.keras` file written by `hdml_tf.export.save_keras` (carries everything);
- a `.weights.h5` of an HDMLModel (`model.save_weights`); give --backbone, --embedding_size, --image_size and --resize
  unless a results.json sits beside it.

The SavedModel holds the embedding network only (backbone + metric head + L2 normalization) with the evaluation
preprocessing in the graph; signatures `serving_default` / `embed_images` (float32 images [B, H, W, C], 0..255),
`embed_images_uint8`, `embed_bytes` (encoded JPEG/PNG strings [B]); each returns {"embeddings": float32 [B, E]}.
After writing, the SavedModel is reloaded and checked against the in-process model (--verify). Errors print as one
line `error: ...` on stderr with exit code 2.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

from embed import quiet_tensorflow  # noqa: E402
from hdml_tf.errors import HDMLError  # noqa: E402

VARIANTS = ("auto", "hdml", "baseline")


def define_flags():
    """Flags of this tool; defined only when run as a program, so importing it has no side effects."""
    flags.DEFINE_string("checkpoint", None, "A training run directory, a .keras file (save_keras) or an HDMLModel "
                        ".weights.h5.")
    flags.DEFINE_string("output", None, "SavedModel directory to write (new or empty; see --overwrite).")
    flags.DEFINE_integer("image_size", 0, "Crop fed to the backbone; 0 = from the checkpoint / run, else the "
                         "backbone's default.")
    flags.DEFINE_integer("resize", 0, "Square resize before the center crop; 0 = from the checkpoint / run, else "
                         "256 for 224/227 crops and the crop size otherwise.")
    flags.DEFINE_string("backbone", None, "Backbone of a .weights.h5 without results.json (inception_v1_slim, "
                        "inception_v1_caffe, resnet50).")
    flags.DEFINE_integer("embedding_size", 0, "Embedding size of a .weights.h5 without results.json (0 = 128).")
    flags.DEFINE_enum("variant", "auto", VARIANTS, "Which weights of a run directory: hdml or baseline (auto: hdml "
                      "when present).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing SavedModel in --output.")
    flags.DEFINE_bool("verify", True, "Reload the SavedModel and compare it with the in-process model.")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where the weights are (`kind` "keras" or "weights") and the run's results.json "run" / "method" ({}: none)."""

    path: str
    kind: str
    run: dict
    method: dict


def find_checkpoint(path: str, variant: str = "auto") -> Checkpoint:
    """Resolves --checkpoint to a .keras or .weights.h5 file plus the run's results.json (if any)."""
    if not path:
        raise HDMLError("--checkpoint is required (a training run directory, a .keras or a .weights.h5 file)")
    if not os.path.exists(path):
        raise HDMLError(f"checkpoint {path} not found; expected a training run directory, a .keras or a "
                        ".weights.h5 file")
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "saved_model.pb")):
            raise HDMLError(f"{path} is already a SavedModel; use it directly (tools/embed.py --model={path})")
        names = [variant] if variant != "auto" else ["hdml", "baseline"]
        for name in names:
            for ext in (".keras", ".weights.h5"):
                if os.path.isfile(os.path.join(path, name + ext)):
                    return _with_run(os.path.join(path, name + ext))
        found = sorted(glob.glob(os.path.join(path, "*.keras")) + glob.glob(os.path.join(path, "*.weights.h5")))
        if len(found) == 1 and variant == "auto":
            return _with_run(found[0])
        if not found:
            raise HDMLError(f"no .keras or .weights.h5 file in {path}; expected a training run directory")
        raise HDMLError(f"{path} holds {', '.join(os.path.basename(f) for f in found)}; pass one of them as "
                        "--checkpoint" + (f" (no {variant}.* there)" if variant != "auto" else ""))
    if path.endswith(".keras") or path.endswith(".weights.h5"):
        return _with_run(path)
    raise HDMLError(f"checkpoint {path} is neither a .keras nor a .weights.h5 file nor a run directory")


def _with_run(path: str) -> Checkpoint:
    results = os.path.join(os.path.dirname(os.path.abspath(path)), "results.json")
    run, method = {}, {}
    if os.path.isfile(results):
        with open(results) as f:
            data = json.load(f)
        run, method = data.get("run", {}), data.get("method", {})
    return Checkpoint(path=path, kind="keras" if path.endswith(".keras") else "weights", run=run, method=method)


def _run_geometry(run: dict):
    """(backbone, crop, resize) of a training run, by the training tool's own rules (RunConfig.augment)."""
    from hdml_tf.config import RunConfig
    from hdml_tf.data import datasets
    dataset = run.get("dataset", "glyphs")
    probe = RunConfig(dataset=dataset, data_dir=None if datasets.get(dataset).embedded else ".",
                      backbone=run.get("backbone", "inception_v1_slim"), image_size=int(run.get("image_size", 0)),
                      resize=int(run.get("resize", 0)))
    augment = probe.augment()
    return probe.backbone, augment.crop, augment.resize


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


def load_model(ckpt: Checkpoint, backbone: str | None = None, embedding_size: int = 0, image_size: int = 0,
               resize: int = 0):
    """(HDMLModel with the checkpoint's weights, image_size, resize) for export."""
    import tensorflow as tf

    from hdml_tf.export import load_keras, read_keras_info

    run_backbone, run_crop, run_resize = _run_geometry(ckpt.run) if ckpt.run else (None, 0, 0)
    if ckpt.kind == "keras":
        info, _ = read_keras_info(ckpt.path)
        model = load_keras(ckpt.path, compile=False)
        if backbone or (run_backbone and not info):
            model.backbone.backbone_name = backbone or run_backbone
        if info is None:  # a plain model.save: the geometry of the run, if known
            info_size, info_resize = run_crop, run_resize
        else:
            info_size, info_resize = info.image_size, info.resize
        return model, image_size or info_size, resize or (info_resize if (image_size or info_size) == info_size
                                                          else 0)

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
    return model, image_size, resize


def export(checkpoint: str, output: str, image_size: int = 0, resize: int = 0, backbone: str | None = None,
           embedding_size: int = 0, variant: str = "auto", overwrite: bool = False, verify: bool = True) -> list:
    """Loads --checkpoint, writes the SavedModel, verifies it; returns the summary lines."""
    if not output:
        raise HDMLError("--output is required (the SavedModel directory to write)")
    ckpt = find_checkpoint(checkpoint, variant)
    from hdml_tf.export import export_saved_model, SIGNATURE_BYTES, SIGNATURE_IMAGES, SIGNATURE_IMAGES_UINT8

    model, image_size, resize = load_model(ckpt, backbone, embedding_size, image_size, resize)
    result = export_saved_model(model, output, image_size or None, resize=resize or None, overwrite=overwrite,
                                verify=verify)
    info = result.info
    lines = [
        f"checkpoint: {ckpt.path}",
        f"network:    {info.backbone or 'unknown backbone'} + metric head -> {info.embedding_size}-d L2-normalized "
        "embeddings (no generator, no classifier)",
        f"images:     any size, squashed to {info.resize} x {info.resize}, center crop {info.image_size} x "
        f"{info.image_size}",
        f"output:     {result.export_dir}",
        f"signatures: serving_default = {SIGNATURE_IMAGES} (float32 images [B, H, W, C], 0..255), "
        f"{SIGNATURE_IMAGES_UINT8} (uint8), {SIGNATURE_BYTES} (encoded JPEG/PNG [B]) -> embeddings [B, "
        f"{info.embedding_size}]",
    ]
    if result.max_abs_diff is not None:
        lines.append(f"check:      reloaded SavedModel matches the in-process model (max |diff| "
                     f"{result.max_abs_diff:.1g})")
    return lines


def main(argv):
    quiet_tensorflow()
    if len(argv) > 1:
        raise HDMLError(f"unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    FLAGS = flags.FLAGS
    print("\n".join(export(FLAGS.checkpoint, FLAGS.output, FLAGS.image_size, FLAGS.resize, FLAGS.backbone,
                           FLAGS.embedding_size, FLAGS.variant, FLAGS.overwrite, FLAGS.verify)))
    return 0


if __name__ == "__main__":
    import common_flags
    define_flags()
    app.run(common_flags.run_main(main), flags_parser=common_flags.parse_flags)
