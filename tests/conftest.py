"""Shared test set-up: quiet TensorFlow, seeded NumPy, the official reference vectors, a tiny backbone."""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"
ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_tool(name):
    """tools/<name>.py as a module (tools define their flags only when run as programs)."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(f"hdml_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in a tool look their module up
    spec.loader.exec_module(module)
    return module


def shared_dir():
    """`../shared` beside the checkout (or $HDML_SHARED_DIR); None in a user's clone."""
    env = os.environ.get("HDML_SHARED_DIR")
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(pathlib.Path(__file__).resolve().parents[2] / "shared")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def cub_subset_dir():
    """`<shared>/data/cub200_subset` (real CUB-200-2011 photographs in the official layout), or None when absent."""
    shared = shared_dir()
    root = shared / "data" / "cub200_subset" if shared else None
    return root if root is not None and root.is_dir() else None


@pytest.fixture
def cub_subset():
    """The real CUB subset's directory; the test is skipped (with the reason) where ../shared is absent."""
    root = cub_subset_dir()
    if root is None:
        pytest.skip("../shared/data/cub200_subset is absent (only the project's CI and developers have it)")
    return root


@pytest.fixture(scope="session")
def official():
    with np.load(DATA / "official_vectors.npz") as f:
        return {k: f[k] for k in f.files}


def layout_batch(loss="npair", tuples=4, size=16, seed=0, num_classes=8):
    """A random batch in the tuple layout of `loss`: images float32 [B, size, size, 3] uniform in 0..255 and labels
    int32 [B] as the real sampler draws them from `num_classes` classes (B = tuples x the layout's size)."""
    from hdml_tf import layouts
    from hdml_tf.data.sampler import example_labels
    batch_size = tuples * layouts.get(loss).size
    labels = example_labels(loss, batch_size, num_classes, seed=seed)
    images = np.random.default_rng(seed).uniform(0, 255, (batch_size, size, size, 3)).astype("float32")
    return images, labels


def tiny_backbone(image_size=16, feature_dim=32, seed=0):
    """A two-layer CNN standing in for InceptionV1 where the backbone is not under test."""
    import keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(feature_dim, name="fc")(x)
    return keras.Model(inputs, x, name="tiny_backbone")
