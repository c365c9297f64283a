"""The data sets hdml_tf knows, in one registry, and the one rule for image geometry (resize and crop).

Every fact about a data set that another module needs lives in its `DatasetSpec`: whether it ships with the
installed packages (`embedded`) or is read from `--data_dir` (and in which layout), the Recall@K list it is scored
with, whether training flips images, its title and the Recall@K columns of the paper's table. `RunConfig` validation,
the tools' `--dataset` flag, `experiment.load_splits`, `readers.read_dataset`, the evaluation tools and
`hdml_tf.paper` all ask this registry; `register` adds a data set of your own.

Geometry (`geometry`): every image is squashed to a square `resize` x `resize`, then cropped to `crop` x `crop`
(random in training, centred in evaluation and serving), as the official data provider does (256 → 227).

- crop: `--image_size`, or 64 px for the embedded sets, or the backbone's ImageNet size (227 Caffe GoogLeNet, 224
  TF-Slim InceptionV1 and ResNet-50) for photos.
- resize: `--resize`, or the crop itself for the embedded sets (a glyph must stay whole), or for photos the
  official ratio 256 / (the backbone's ImageNet size) applied to the crop: 256 for 227 or 224 px crops, 72 for a
  64 px crop of the Caffe layout — a smaller crop sees the same share of the photo as the paper's.
A crop under half the resize (e.g. `--image_size=64 --resize=256`: a quarter of each photo) is allowed with a
warning.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, Dict, Optional, Tuple

from hdml_tf.data import readers
from hdml_tf.errors import ConfigError

log = logging.getLogger(__name__)

#: Crop of the embedded sets when --image_size is not given.
EMBEDDED_IMAGE_SIZE = 64
#: The official photo resize: images are squashed to 256 x 256 before the 227 (or 224) crop.
OFFICIAL_RESIZE = 256


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the package knows about one data set.

    Attributes:
      name: the `--dataset` value ("cub200").
      title: for tables and plots ("CUB-200-2011").
      recall_ks: Recall@K computed for it (the paper's K plus the extra ones the official FLAGS.py computes).
      flip: random horizontal flips in training (off for glyphs and digits: a mirrored letter is another class).
      layout: what `--data_dir` must hold (photo sets).
      paper_recall_ks: Recall@K of the paper's table, in the order of its four recall columns (empty: not in the
        paper).
      aliases: other spellings accepted by `get` ("Stanford-Online-Products").
      reader: photo sets: reader(data_dir, seed=..., **options) -> `readers.Splits` (train, test).
      render: embedded sets: render(image_size=..., seed=...) -> (train, test).
    """

    name: str
    title: str
    recall_ks: Tuple[int, ...]
    reader: Optional[Callable] = None
    render: Optional[Callable] = None
    flip: bool = True
    layout: str = ""
    paper_recall_ks: Tuple[int, ...] = ()
    aliases: Tuple[str, ...] = ()

    @property
    def embedded(self) -> bool:
        """True when the images ship with the installed packages (no data_dir)."""
        return self.render is not None

    def load(self, data_dir=None, image_size: int = EMBEDDED_IMAGE_SIZE, seed: int = 0):
        """(train, test) with disjoint classes. Embedded sets are rendered at `image_size`; photo sets are read
        from `data_dir` (the result carries `.report`, the count check against the official numbers)."""
        if self.embedded:
            return self.render(image_size=image_size, seed=seed)
        if not data_dir:
            raise ConfigError(f"dataset={self.name} needs --data_dir (where its archive is unpacked: {self.layout})")
        return self.reader(data_dir, seed=seed)


_REGISTRY: Dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Makes a data set known under `spec.name` (and its aliases)."""
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def names() -> Tuple[str, ...]:
    """Registered data set names, in registration order."""
    return tuple(_REGISTRY)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def find(name: str) -> Optional[DatasetSpec]:
    """The spec of `name`, an alias, or an ImageSet name such as "cub200/test"; None if unknown."""
    key = _key(str(name).split("/")[0].split("[")[0])
    for spec in _REGISTRY.values():
        if key == _key(spec.name) or key in (_key(a) for a in spec.aliases):
            return spec
    return None


def get(name: str) -> DatasetSpec:
    """The spec of `name`; ConfigError listing the known names when it is unknown."""
    spec = find(name)
    if spec is None:
        raise ConfigError(f"dataset={name!r} is unknown; expected one of {', '.join(_REGISTRY)}")
    return spec


def recall_ks(name: str, num_images: Optional[int] = None) -> Tuple[int, ...]:
    """Recall@K list of a data set (unknown names: the paper's 1, 2, 4, 8); with `num_images`, only the K < N that a
    leave-one-out query can reach (at least K = 1)."""
    spec = find(name)
    ks = spec.recall_ks if spec is not None else PAPER_RECALL_KS
    if num_images is not None:
        ks = tuple(k for k in ks if k <= num_images - 1) or (1,)
    return ks


def load_dataset(name: str, data_dir=None, *, image_size: int = EMBEDDED_IMAGE_SIZE, seed: int = 0):
    """(train, test) ImageSets of a registered data set, test classes unseen in training.

    Args:
      name: a registered name ("glyphs", "digits", "cub200", "cars196", "sop", "folder", ...).
      data_dir: where a photo data set is unpacked (its official layout); not used by the embedded ones.
      image_size: side the embedded sets are rendered at (give the geometry's `resize`); photos are files.
      seed: the glyph distortions and the folder reader's class split.
    Returns:
      (train, test); for photo sets a `readers.Splits` carrying `.report`, the count check against the official
      numbers (a partial copy is named there).
    Raises:
      ConfigError: an unknown name or a photo set without data_dir. DataError: a missing or malformed copy.
    """
    return get(name).load(data_dir, image_size=image_size, seed=seed)


# ------------------------------------------------------------------------------------------------ geometry
_WARNED = set()  # (crop, resize) pairs already warned about in this process


def photo_resize(crop: int, backbone: Optional[str] = None) -> int:
    """The resize of a photo crop: the official 256 / (the backbone's ImageNet size) ratio applied to `crop`
    (256 for the official 227 / 224 crops; never below the crop)."""
    from hdml_tf.backbones import default_image_size
    native = default_image_size(backbone) if backbone else 224
    return max(int(crop), int(round(crop * OFFICIAL_RESIZE / native)))


def geometry(dataset: str, backbone: Optional[str] = None, image_size: int = 0, resize: int = 0,
             flip: Optional[bool] = None):
    """The `Augment` (resize, crop, flip) of a run: the one rule of this module's docstring.

    Args:
      dataset: registered name.
      backbone: backbone name (its ImageNet size is the default photo crop); None for 224.
      image_size, resize: explicit values, 0 for the rule's defaults.
      flip: None for the data set's default.
    Raises:
      ConfigError: resize smaller than the crop.
    """
    from hdml_tf.backbones import default_image_size
    from hdml_tf.data.images import Augment
    spec = get(dataset)
    if spec.embedded:
        crop = int(image_size or EMBEDDED_IMAGE_SIZE)
        size = int(resize or crop)
    else:
        crop = int(image_size or (default_image_size(backbone) if backbone else 224))
        size = int(resize or photo_resize(crop, backbone))
    if size < crop:
        raise ConfigError(f"resize={size} is smaller than the crop image_size={crop}; expected resize >= image_size")
    if 2 * crop < size and (crop, size) not in _WARNED:
        _WARNED.add((crop, size))
        log.warning("the %d px crop covers less than half of the %d px resize (%.0f%% of each image's area); "
                    "leave --resize at 0 for the official proportions", crop, size, 100.0 * crop * crop / size / size)
    return Augment(resize=size, crop=crop, flip=spec.flip if flip is None else bool(flip))


# ------------------------------------------------------------------------------------------------ the registry
PAPER_RECALL_KS = (1, 2, 4, 8)


def _glyphs(image_size, seed):
    from hdml_tf.data.glyphs import load_glyphs
    return load_glyphs(image_size=image_size, seed=seed)


def _digits(image_size, seed):
    from hdml_tf.data.digits import load_digits
    return load_digits(image_size=image_size, seed=seed)


register(DatasetSpec("glyphs", "glyphs (matplotlib fonts)", PAPER_RECALL_KS, render=_glyphs, flip=False))
register(DatasetSpec("digits", "digits (scikit-learn)", PAPER_RECALL_KS, render=_digits, flip=False))
register(DatasetSpec(
    "cub200", "CUB-200-2011", (1, 2, 4, 8, 16, 32), reader=readers.read_cub200, layout=readers.CUB_LAYOUT,
    paper_recall_ks=(1, 2, 4, 8), aliases=("cub", "cub_200_2011", "cub200_2011", "caltech_birds2011")))
register(DatasetSpec(
    "cars196", "Cars196", (1, 2, 4, 8, 16, 32), reader=readers.read_cars196, layout=readers.CARS_LAYOUT,
    paper_recall_ks=(1, 2, 4, 8), aliases=("cars", "stanford_cars")))
register(DatasetSpec(
    "sop", "Stanford Online Products", (1, 10, 100, 1000), reader=readers.read_sop, layout=readers.SOP_LAYOUT,
    paper_recall_ks=(1, 10, 100), aliases=("products", "online_products", "stanford_online_products")))
register(DatasetSpec("folder", "image folder", PAPER_RECALL_KS, reader=readers.read_image_folder,
                     layout=readers.FOLDER_LAYOUT))
