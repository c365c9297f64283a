#!/usr/bin/env python
"""Export a trained embedding network as a TensorFlow SavedModel for serving (TF Serving, a Python service).

    python tools/export.py --checkpoint=runs/glyphs_npair_hdml/version_1 --output=exported/glyphs
    python tools/export.py --checkpoint=runs/cub/hdml.keras --output=exported/cub
    python tools/export.py --checkpoint=hdml.weights.h5 --backbone=inception_v1_caffe --embedding_size=256 \
        --image_size=227 --resize=256 --output=exported/cub

--checkpoint is one of:
- a training run's --output_dir (tools/train.py): its results.json gives backbone, sizes and method; the weights are
  hdml.keras / hdml.weights.h5 (or baseline.*, chosen with --variant);
- a `.keras` file written by `hdml_tf.rundir.save_keras` (carries everything);
- a `.weights.h5` of an HDMLModel (`model.save_weights`); give --backbone, --embedding_size, --image_size and --resize
  unless a results.json sits beside it.

The SavedModel holds the embedding network only (backbone + metric head + L2 normalization) with the evaluation
preprocessing in the graph; signatures `serving_default` / `embed_images` (float32 images [B, H, W, C], 0..255),
`embed_images_uint8`, `embed_bytes` (encoded JPEG/PNG strings [B]); each returns {"embeddings": float32 [B, E]}.
After writing, the SavedModel is reloaded and checked against the in-process model (--verify). Errors print as one
line `error: ...` on stderr with exit code 2.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

from common_flags import quiet_tensorflow  # noqa: E402
from hdml_tf.errors import HDMLError  # noqa: E402

VARIANTS = ("auto", "hdml", "baseline")  # "auto": hdml when the run has it


def define_flags():
    """Flags of this tool; defined only when run as a program, so importing it has no side effects."""
    flags.DEFINE_string("checkpoint", None, "A training run directory, a .keras file (save_keras) or an HDMLModel "
                        ".weights.h5.")
    flags.DEFINE_string("output", None, "SavedModel directory to write (new or empty; see --overwrite).")
    flags.DEFINE_integer("image_size", 0, "Crop fed to the backbone; 0 = from the checkpoint / run, else the "
                         "backbone's default.")
    flags.DEFINE_integer("resize", 0, "Square resize before the center crop; 0 = from the checkpoint / run, else "
                         "the photo rule (256 for 224/227 crops, the same proportion for others).")
    flags.DEFINE_string("backbone", None, "Backbone of a .weights.h5 without results.json (inception_v1_slim, "
                        "inception_v1_caffe, resnet50).")
    flags.DEFINE_integer("embedding_size", 0, "Embedding size of a .weights.h5 without results.json (0 = 128).")
    flags.DEFINE_enum("variant", "auto", VARIANTS, "Which weights of a run directory: hdml or baseline (auto: hdml "
                      "when present).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing SavedModel in --output.")
    flags.DEFINE_bool("verify", True, "Reload the SavedModel and compare it with the in-process model.")


def export(checkpoint: str, output: str, image_size: int = 0, resize: int = 0, backbone: str | None = None,
           embedding_size: int = 0, variant: str = "auto", overwrite: bool = False, verify: bool = True) -> list:
    """Loads --checkpoint, writes the SavedModel, verifies it; returns the summary lines."""
    if not output:
        raise HDMLError("--output is required (the SavedModel directory to write)")
    from hdml_tf.rundir import find_checkpoint, load_checkpoint

    if not checkpoint:
        raise HDMLError("--checkpoint is required (a training run directory, a .keras or a .weights.h5 file)")
    ckpt = find_checkpoint(checkpoint, variant)  # before TensorFlow is imported: a bad path fails in a second
    from hdml_tf.serving import SIGNATURE_BYTES, SIGNATURE_IMAGES, SIGNATURE_IMAGES_UINT8, export_saved_model
    model, geometry = load_checkpoint(ckpt, backbone, embedding_size, image_size, resize)
    result = export_saved_model(model, output, geometry.image_size, resize=geometry.resize, backbone=geometry.backbone,
                                overwrite=overwrite, verify=verify)
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
    lines = export(FLAGS.checkpoint, FLAGS.output, FLAGS.image_size, FLAGS.resize, FLAGS.backbone,
                   FLAGS.embedding_size, FLAGS.variant, FLAGS.overwrite, FLAGS.verify)
    from hdml_tf.progress import wrap
    print("\n".join(wrap(line, indent=" " * 12) for line in lines))  # under the values, on a terminal
    return 0


if __name__ == "__main__":
    import common_flags
    define_flags()
    common_flags.define_verbose_flag()
    app.run(common_flags.run_main(main), flags_parser=common_flags.parse_flags)
