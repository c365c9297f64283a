#!/usr/bin/env python
"""Embed every image of a folder tree into an index file that tools/search.py queries.

    python tools/embed.py --model=exported/cub --images=/photos --output=photos.npz
    python tools/embed.py --model=runs/cub/hdml.keras --images=/data/CUB_200_2011/images --batch_size=128

--model is a SavedModel directory written by tools/export.py, a training run directory, or its `.keras` /
`.weights.h5` file (`hdml_tf.rundir.load_embedder`); images are preprocessed as the model's evaluation pipeline does (square resize, center
crop). Every file under --images is read (hidden files aside); gray, RGBA and CMYK images are converted to RGB. A
file that cannot be decoded (not an image, truncated, empty) is skipped with a warning and listed at the end. When
every image sits in a subfolder, the first-level subfolder is its class.

The index (.npz) holds: embeddings float32 [N, E] (L2-normalized), paths [N] (relative to root), root, labels int32
[N] and class_names [C] (when the folders are classes), info (JSON: embedding_size, image_size, resize, backbone),
model, skipped ("path: reason"). Errors print as one line `error: ...` on stderr with exit code 2.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

from common_flags import check_model_path, quiet_tensorflow  # noqa: E402
from hdml_tf.errors import HDMLError  # noqa: E402


def define_flags():
    """Flags of this tool; defined only when run as a program, so importing it has no side effects."""
    flags.DEFINE_string("model", None, "SavedModel directory (tools/export.py), training run directory, .keras or "
                        ".weights.h5 file.")
    flags.DEFINE_string("images", None, "Folder of images (searched recursively; subfolders = classes).")
    flags.DEFINE_string("output", None, "Index file to write (.npz); default: <images>.npz beside the folder.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
    flags.DEFINE_integer("verbose", 1, "0: no progress line; 1: a progress line; 2: also TensorFlow's own log "
                         "lines (C++ start-up, devices).")


def list_images(folder: str, exclude=()) -> tuple:
    """Relative paths of the files under `folder`; HDMLError when it is missing or holds no files."""
    from hdml_tf.retrieval import list_files
    if not folder:
        raise HDMLError("--images is required (a folder of images)")
    if not os.path.isdir(folder):
        raise HDMLError(f"image folder {folder} not found" if not os.path.exists(folder)
                        else f"--images={folder} is a file; expected a folder of images")
    paths = list_files(folder, exclude=exclude)
    if not paths:
        raise HDMLError(f"image folder {folder} is empty; expected image files (JPEG, PNG, GIF, BMP), "
                        "optionally in one subfolder per class")
    return paths


def skipped_lines(report, root: str) -> list:
    """'path: reason' for each unreadable file, paths relative to root."""
    return [f"{os.path.relpath(b.path, root)}: {b.reason}" for b in report.bad]


def embed_folder(model: str, images: str, output: str | None = None, batch_size: int = 64, verbose: int = 1):
    """Embeds `images` with `model` into the index `output`.

    Returns:
      (ImageIndex, ImageScanReport of the files, the output path).

    Raises:
      HDMLError: missing model or folder, an empty folder, no readable image, a bad batch size or output name, an
        unwritable --output (before any work) or a failed write (full disk: the previous index is kept).
    """
    check_model_path(model)
    output = output or os.path.normpath(images or ".") + ".npz"
    if not output.endswith(".npz"):
        raise HDMLError(f"--output={output} must end with .npz")
    if batch_size <= 0:
        raise HDMLError(f"--batch_size={batch_size} must be > 0")
    paths = list_images(images, exclude=(output,))
    from hdml_tf.atomic import check_writable_file
    check_writable_file(output, "--output")  # before the model is loaded and every image embedded

    from hdml_tf.retrieval import ImageIndex, embed_files, folder_labels, save_index
    from hdml_tf.rundir import load_embedder

    embedder = load_embedder(model)
    root = os.path.abspath(images)
    full = [os.path.join(root, p) for p in paths]
    embeddings, kept, report = embed_files(embedder, full, batch_size=batch_size, name=images, verbose=verbose)
    if not len(kept):
        raise HDMLError(f"none of the {len(paths)} files in {images} could be read as an image (first: "
                        f"{skipped_lines(report, root)[0]})")
    kept_paths = tuple(paths[i] for i in kept)
    labels, class_names = folder_labels(kept_paths)
    index = ImageIndex(embeddings=embeddings, paths=kept_paths, root=root, labels=labels, class_names=class_names,
                       info=embedder.info, model=os.path.abspath(model), skipped=tuple(skipped_lines(report, root)))
    save_index(output, index)
    return index, report, output


def summary(index, output: str) -> list:
    classes = f", {len(index.class_names)} classes (subfolders)" if index.labels is not None else ", no classes"
    return [f"embedded {len(index):,} images from {index.root}{classes}",
            f"model:  {index.model} ({index.info.embedding_size}-d, resize {index.info.resize}, crop "
            f"{index.info.image_size})",
            f"index:  {output}"]


def warn_skipped(skipped, total: int, stream=None) -> None:
    """The end-of-run list of unreadable files, on stderr."""
    stream = stream or sys.stderr
    if skipped:
        print(f"warning: skipped {len(skipped)} of {total} files that are not readable images:", file=stream)
        for line in skipped:
            print(f"  {line}", file=stream)


def main(argv):
    quiet_tensorflow()
    if len(argv) > 1:
        raise HDMLError(f"unexpected arguments {' '.join(argv[1:])} (flags start with --)")
    FLAGS = flags.FLAGS
    index, report, output = embed_folder(FLAGS.model, FLAGS.images, FLAGS.output, FLAGS.batch_size,
                                         int(FLAGS.verbose > 0))
    import common_flags
    print("\n".join([common_flags.device_line()] + summary(index, output)))
    warn_skipped(index.skipped, report.total)
    return 0


if __name__ == "__main__":
    import common_flags
    define_flags()
    app.run(common_flags.run_main(main), flags_parser=common_flags.parse_flags)
