"""What a run records about itself in results.json ("record"): what it was run on and with what, so a number can
be traced back and a run repeated.

- data: images and classes per split, a photo set's count check and whether the copy is partial, the unreadable
  images the pipelines skipped (`record_skipped_images`);
- versions of Python and of the libraries the numbers depend on (`library_versions`);
- the project's git commit and whether the working tree was modified (`project_commit`);
- determinism: --deterministic and whether TensorFlow's oneDNN CPU kernels were on (`determinism_state`);
- the host and every start of the run (from its run.json).

`hdml_tf.experiment.run_experiment` adds per variant the steps, the final step, the skipped steps and the wall time.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Dict, List, Optional

from hdml_tf.config import RunConfig
from hdml_tf.data.image_set import ImageSet


def run_record(run: RunConfig, train: ImageSet, test: ImageSet, val, count_report, starts: List[Dict]) -> Dict:
    """What was run, for results.json: data counts per split and their check, library versions, the project's
    commit, host, the starts of this run (the skipped images are added by `record_skipped_images`)."""

    def split(image_set):
        if image_set is None:
            return None
        return {"images": len(image_set), "classes": int(image_set.num_classes)}

    data = {"dataset": run.dataset, "train": split(train), "test": split(test)}
    if val is not None:
        data["validation"] = split(val)
    if count_report is not None:
        data["partial_copy"] = bool(count_report.partial)
        data["count_check"] = count_report.summary()
    return {"data": data, "versions": library_versions(), "commit": project_commit(),
            "determinism": determinism_state(run),
            "host": socket.gethostname(), "starts": list(starts)}


def record_skipped_images(record: Dict, splits: Dict[str, ImageSet]) -> None:
    """Adds each file-based split's unreadable images (skipped by the pipeline) to a run record. Call it after the
    pipelines ran: their scan is remembered, so nothing is decoded again."""
    from hdml_tf.data.images import drop_bad_images
    for role, image_set in splits.items():
        entry = record["data"].get(role)
        if image_set is None or entry is None or image_set.in_memory:
            continue
        _, scan = drop_bad_images(image_set, strict=False, verbose=0)
        entry["unreadable_skipped"] = [f"{b.path}: {b.reason}" for b in scan.bad]


def library_versions() -> Dict[str, str]:
    """Versions of Python and of the libraries a result depends on."""
    import platform

    import keras
    import tensorflow as tf

    from hdml_tf import __version__
    versions = {"python": platform.python_version(), "hdml_tf": __version__, "tensorflow": tf.__version__,
                "keras": keras.__version__}
    for name, module in (("numpy", "numpy"), ("scikit-learn", "sklearn"), ("scipy", "scipy"), ("h5py", "h5py")):
        try:
            versions[name] = __import__(module).__version__
        except ImportError:  # pragma: no cover
            versions[name] = None
    return versions


def project_commit() -> Optional[Dict]:
    """{"commit", "dirty"} of the git checkout hdml_tf runs from, or None (an installed copy, no git)."""
    import subprocess
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def onednn_enabled() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels (decided when TensorFlow was imported)."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # pragma: no cover - another TensorFlow build
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") not in ("0", "false", "False")


def determinism_state(run: RunConfig) -> Dict:
    """What results.json records about determinism: the flag, op determinism, and the CPU kernels."""
    return {"deterministic": bool(run.deterministic), "onednn": onednn_enabled(),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}
