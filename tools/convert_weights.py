"""Convert ImageNet InceptionV1 weights (TF-Slim checkpoint or Caffe GoogLeNet .mat) into a Keras weights file.

    python tools/convert_weights.py --input=inception_v1.ckpt --output=inception_v1_slim.weights.h5
    python tools/convert_weights.py --input=tf_ckpt_from_caffe.mat --output=googlenet_caffe.weights.h5

The input is loaded into our backbone by name and verified (every variable assigned once with its shape; the
ImageNet classifier, the auxiliary heads and the .mat's fc_embedding layer skipped on purpose), saved with Keras'
`save_weights`, then read back into a fresh backbone whose features on a fixed random batch must equal those of the
directly loaded one. `--backbone` takes the names of tools/train.py (default: the one the file fits). The output
loads with `build_backbone(name, size, weights=OUTPUT)` or `--weights=OUTPUT` on training. Errors print as one line
`error: ...` on stderr with exit code 2.
"""
from __future__ import annotations

import glob
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from hdml_tf.errors import HDMLError  # noqa: E402

FORMATS = ("auto", "slim", "caffe")
BACKBONES = ("auto", "inception_v1_caffe", "inception_v1_slim")  # the InceptionV1 names of tools/train.py
_BACKBONE_OF_FORMAT = {"slim": "inception_v1_slim", "caffe": "inception_v1_caffe"}


def define_flags():
    """Flags of this tool; defined only when run as a program, so importing `convert` has no side effects."""
    flags.DEFINE_string("input", None, "TF-Slim inception_v1.ckpt (prefix, .index or directory) or Caffe GoogLeNet "
                        ".mat (keys conv1/7x7_s2, conv1/7x7_s2_bias, inception_3a/1x1, ...)")
    flags.DEFINE_enum("format", "auto", FORMATS, "format of --input; auto detects it from the file")
    flags.DEFINE_enum("backbone", "auto", BACKBONES, "backbone to convert into (the --backbone of tools/train.py); "
                      "auto follows the file (slim checkpoint -> inception_v1_slim, Caffe .mat -> inception_v1_caffe)")
    flags.DEFINE_enum("layout", None, ["caffe", "slim"], "deprecated: --layout=caffe is --backbone=inception_v1_caffe, "
                      "--layout=slim is --backbone=inception_v1_slim")
    flags.DEFINE_string("output", None, "Keras weights file to write (must end with .weights.h5); default: next to "
                        "the input, named <input>_<backbone>.weights.h5")
    flags.DEFINE_integer("image_size", 0, "input size of the numerical check; 0 = the backbone's default size")


def convert(input_path: str, output: str | None = None, format: str = "auto", backbone: str = "auto",
            image_size: int = 0) -> list:
    """Load `input_path` into an InceptionV1 backbone, save it as Keras weights, verify; return summary lines.

    Args:
        input_path: a TF-Slim checkpoint or a Caffe GoogLeNet .mat.
        output: the .weights.h5 to write (default: beside the input).
        format: "auto", "slim" or "caffe".
        backbone: "auto" (the backbone the file fits), "inception_v1_caffe" or "inception_v1_slim".
        image_size: input size of the numerical check; 0 = the backbone's default.

    Raises:
        HDMLError (WeightsError): bad arguments, an unreadable or mismatching file, or a failed read-back check.
    """
    # Argument checks that need no TensorFlow come first, so a typo fails fast.
    if not input_path:
        raise HDMLError("--input is required (a TF-Slim inception_v1.ckpt or a Caffe GoogLeNet .mat)")
    if not (os.path.exists(input_path) or glob.glob(glob.escape(input_path) + ".*")):
        raise HDMLError(f"no weights file at {input_path} (expected a TF-Slim .ckpt or a Caffe GoogLeNet .mat)")
    if format not in FORMATS:
        raise HDMLError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if backbone not in BACKBONES:
        raise HDMLError(f"--backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}")
    if output and not output.endswith(".weights.h5"):
        raise HDMLError(f"--output must end with .weights.h5 (Keras' weights format), got {output}")

    import numpy as np

    from hdml_tf.backbones import build_backbone, default_image_size, detect_format, load_backbone_weights
    from hdml_tf.errors import WeightsError

    fmt, _ = detect_format(input_path, format)
    if fmt == "keras":
        raise HDMLError(f"{input_path} is already a Keras weights file; pass it to --weights directly")
    backbone = backbone if backbone != "auto" else _BACKBONE_OF_FORMAT[fmt]
    if not output:
        stem = os.path.splitext(os.path.normpath(input_path))[0]
        output = f"{stem}_{backbone}.weights.h5"
    size = image_size or default_image_size(backbone)

    model = build_backbone(backbone, size)
    report = load_backbone_weights(model, input_path, format=fmt)
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    model.save_weights(output)

    # Read-back check: a fresh backbone loading the written file must compute the same features.
    check = build_backbone(backbone, size, weights=output)
    images = np.random.default_rng(0).uniform(0.0, 255.0, size=(2, size, size, 3)).astype("float32")
    expected = np.asarray(model(images, training=False))
    got = np.asarray(check(images, training=False))
    max_diff = float(np.max(np.abs(expected - got)))
    if not np.allclose(got, expected, rtol=1e-6, atol=1e-6):
        raise WeightsError(f"read-back check failed: {output} gives features differing by up to {max_diff:.3g}")
    return [
        f"input:    {input_path} ({fmt})",
        f"backbone: {backbone}",
        f"weights:  {report.assigned} variables, {report.values:,} values assigned by name",
        f"skipped:  {len(report.skipped)} on purpose" + (f" ({', '.join(report.skipped)})" if report.skipped else ""),
        f"output:   {output}",
        f"check:    features [2, {expected.shape[1]}] at {size} px identical after reload (max |diff| {max_diff:.1g})",
    ]


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    FLAGS = flags.FLAGS
    try:
        backbone = FLAGS.backbone
        if FLAGS.layout:  # the old spelling of --backbone keeps working
            implied = _BACKBONE_OF_FORMAT[FLAGS.layout]
            if backbone not in ("auto", implied):
                raise HDMLError(f"--layout={FLAGS.layout} (deprecated) means --backbone={implied}, which contradicts "
                                f"--backbone={backbone}; give --backbone only")
            backbone = implied
        lines = convert(FLAGS.input, FLAGS.output, FLAGS.format, backbone, FLAGS.image_size)
    except HDMLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common_flags
    define_flags()
    app.run(main, flags_parser=common_flags.parse_flags)
