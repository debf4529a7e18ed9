"""Image classification data for the CLIP task: lazy images by index, splits, preprocessing.

A dataset is a train ``Images`` and a test ``Images`` (labels in memory, pixels loaded by index)
plus the class names that feed the prompts. Sources:

    digits         scikit-learn's 8x8 digits (bundled, no download); seeded split.
    fashion_mnist  IDX files (gzip or not) in ``root``: the Debian package's
                   /usr/share/datasets/fashion-mnist/, or torchvision's ``FashionMNIST/raw``;
                   torchvision downloads into ``root`` when ``download`` and none are found.
    imagefolder    any ``root/<class>/<image>`` tree (torchvision ``ImageFolder`` layout); seeded
                   split, class names from the folder names.
    ucf101         UCF101 middle frames as an image folder (``Apply_Eye_Makeup`` or
                   ``ApplyEyeMakeup`` -> "Apply Eye Makeup").
    flowers102     torchvision ``Flowers102`` (official split: train+val for training, test).
    food101        torchvision ``Food101`` (official train/test).

``split_file`` reads a CoOp-style JSON (``{"train": [[path, label, classname], ...], "test": ...}``,
paths relative to ``root``), the few-shot splits CLIP-LoRA and the paper use, for the file datasets.

Randomness: splitting and capping use ``numpy.random.default_rng([split_seed, ...])`` (the test set
does not change with the experiment seed); augmentation draws from torch's default generator,
which the task seeds from each step's seed (``tasks.step_rng``).
"""

from __future__ import annotations

import gzip
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FOLDER_DATASETS = ("imagefolder", "ucf101")
"""Datasets that are a folder the user names (``root/<class>/<image>``): ``root`` is the data."""
IMAGE_FILE_DATASETS = FOLDER_DATASETS + ("flowers102", "food101")
"""Datasets of image files (the others are arrays in memory): what a ``split_file`` can list."""
SPLIT_DATASETS = ("fashion_mnist", "flowers102", "food101")
"""Datasets with an official train/test split (the others are split at random)."""
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
DEFAULT_ROOT = "~/.cache/decaf_ray/data"


class Images:
    """One split: ``labels`` (n,) int64 in memory, ``get(i)`` -> uint8 (3, H, W) on the CPU."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, i: int) -> Tensor:
        raise NotImplementedError

    def subset(self, idx: np.ndarray) -> "Images":
        raise NotImplementedError


class ArrayImages(Images):
    """Images held in memory: uint8 (n, H, W) grey or (n, 3, H, W)."""

    def __init__(self, pixels: Tensor, labels: np.ndarray):
        self.pixels, self.labels = pixels, np.asarray(labels, dtype=np.int64)

    def get(self, i: int) -> Tensor:
        img = self.pixels[int(i)]
        return img.unsqueeze(0).expand(3, -1, -1) if img.dim() == 2 else img

    def subset(self, idx: np.ndarray) -> "ArrayImages":
        return ArrayImages(self.pixels[torch.as_tensor(idx)], self.labels[idx])


class FileImages(Images):
    """Image files decoded on demand (PIL, converted to RGB)."""

    def __init__(self, paths: Sequence[str | Path], labels: np.ndarray):
        self.paths, self.labels = [str(p) for p in paths], np.asarray(labels, dtype=np.int64)

    def get(self, i: int) -> Tensor:
        from PIL import Image

        with Image.open(self.paths[int(i)]) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def subset(self, idx: np.ndarray) -> "FileImages":
        return FileImages([self.paths[i] for i in idx], self.labels[idx])


@dataclass
class ImageDataset:
    class_names: list[str]
    train: Images
    test: Images


# ---------------------------------------------------------------------------- loading


def load(cfg) -> ImageDataset:
    """The dataset a ``CLIPConfig`` names, split and capped; reads labels and file lists only.

    Raises:
        FileNotFoundError: the data are not where ``root`` says (and cannot be downloaded).
    """
    if cfg.split_file is not None:
        names, train, test = _split_file(Path(cfg.split_file).expanduser(), _root(cfg))
        official = True
    else:
        names, train, test = _LOADERS[cfg.dataset](cfg)
        official = test is not None and cfg.split != "random"
        if test is not None and not official:  # pool the official split, then split at random
            train = _concat(train, test)
    if not official:
        train = _cap_per_class(train, cfg.max_per_class, cfg.split_seed)
        train, test = _stratified_split(train, cfg.test_fraction, cfg.split_seed)
    else:
        train = _cap_per_class(train, cfg.max_per_class, cfg.split_seed)
    if cfg.test_samples is not None and len(test) > cfg.test_samples:
        rng = np.random.default_rng([cfg.split_seed, 2])
        test = test.subset(np.sort(rng.permutation(len(test))[:cfg.test_samples]))
    if cfg.class_names is not None:
        if len(cfg.class_names) != len(names):
            raise ValueError(f"class_names has {len(cfg.class_names)} names but the dataset has "
                             f"{len(names)} classes")
        names = list(cfg.class_names)
    return ImageDataset(names, train, test)


def _root(cfg) -> Path:
    return Path(cfg.root if cfg.root is not None else DEFAULT_ROOT).expanduser()


def _digits(cfg):
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))
    return list(DIGIT_NAMES), ArrayImages(pixels, d.target), None


def _fashion_mnist(cfg):
    from torchvision.datasets import FashionMNIST

    roots = [_root(cfg)] if cfg.root is not None else [Path(p) for p in FASHION_MNIST_DIRS]
    roots.append(_root(cfg))
    for base in roots:
        for folder in (base, base / "FashionMNIST" / "raw"):
            files = _idx_files(folder)
            if files is not None:
                return list(FashionMNIST.classes), *files
    if cfg.download:
        FashionMNIST(str(_root(cfg)), train=True, download=True)
        files = _idx_files(_root(cfg) / "FashionMNIST" / "raw")
        if files is not None:
            return list(FashionMNIST.classes), *files
    raise FileNotFoundError(f"no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...) in "
                            f"{', '.join(map(str, roots))} or their FashionMNIST/raw folders")


def _idx_files(folder: Path) -> tuple[ArrayImages, ArrayImages] | None:
    """Train and test ``ArrayImages`` from MNIST-format IDX files in ``folder``, or None."""
    if not folder.is_dir():
        return None
    found = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        hits = [folder / (stem + ext) for ext in (".gz", "")]
        hits = [p for p in hits if p.is_file()]
        if not hits:
            return None
        found[stem] = hits[0]
    split = {}
    for part in ("train", "t10k"):
        images = read_idx(found[f"{part}-images-idx3-ubyte"])
        labels = read_idx(found[f"{part}-labels-idx1-ubyte"]).astype(np.int64)
        split[part] = ArrayImages(torch.from_numpy(images), labels)
    return split["train"], split["t10k"]


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST format), gzip or plain."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says {dims}, found {arr.size} bytes")
    return arr.reshape(dims).copy()


def _folder(cfg, pretty=lambda n: n.replace("_", " ")):
    root = _root(cfg)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise FileNotFoundError(f"no images under {root}/<class>/ (extensions {IMAGE_EXTENSIONS})")
    return [pretty(n) for n in classes], FileImages(paths, np.array(labels)), None


def ucf101_name(name: str) -> str:
    """``Apply_Eye_Makeup`` or ``ApplyEyeMakeup`` -> ``Apply Eye Makeup``."""
    return " ".join(re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ").split())


def _flowers102(cfg):
    from torchvision.datasets import Flowers102

    parts = {split: _torchvision_split(Flowers102, cfg, split)[0]
             for split in ("train", "val", "test")}
    return list(Flowers102.classes), _concat(parts["train"], parts["val"]), parts["test"]


def _food101(cfg):
    from torchvision.datasets import Food101

    train, _ = _torchvision_split(Food101, cfg, "train")
    test, ds = _torchvision_split(Food101, cfg, "test")
    return [c.replace("_", " ") for c in ds.classes], train, test


def _torchvision_split(dataset: type, cfg, split: str):
    """(``FileImages``, the torchvision dataset) of one split of a torchvision file dataset, read
    through its public interface: with ``loader=str`` an item is (path, label), nothing decoded."""
    try:
        ds = dataset(str(_root(cfg)), split=split, download=cfg.download, loader=str)
    except TypeError as e:
        if "loader" not in str(e):
            raise
        raise RuntimeError(f"{dataset.__name__} needs torchvision >= 0.22 (its loader "
                           "argument)") from None
    items = [ds[i] for i in range(len(ds))]
    return FileImages([p for p, _ in items], np.array([y for _, y in items], dtype=np.int64)), ds


_LOADERS = {
    "digits": _digits,
    "fashion_mnist": _fashion_mnist,
    "imagefolder": _folder,
    "ucf101": lambda cfg: _folder(cfg, ucf101_name),
    "flowers102": _flowers102,
    "food101": _food101,
}


def _split_file(path: Path, root: Path):
    """A CoOp split JSON: train and test ``FileImages`` and class names by label."""
    data = json.loads(path.read_text())
    names: dict[int, str] = {}
    parts = {}
    for split in ("train", "test"):
        rows = data[split]
        for _, label, name in rows:
            names[int(label)] = str(name).replace("_", " ")
        parts[split] = FileImages([root / p for p, _, _ in rows], np.array([r[1] for r in rows]))
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"{path}: labels are not 0..C-1")
    return [names[c] for c in range(len(names))], parts["train"], parts["test"]


def _concat(a: Images, b: Images) -> Images:
    labels = np.concatenate([a.labels, b.labels])
    if isinstance(a, FileImages) and isinstance(b, FileImages):
        return FileImages(a.paths + b.paths, labels)
    return ArrayImages(torch.cat([a.pixels, b.pixels]), labels)


def _cap_per_class(images: Images, cap: int | None, seed: int) -> Images:
    """At most ``cap`` images of each class (a seeded pick), in their original order."""
    if cap is None:
        return images
    keep = []
    for c in np.unique(images.labels):
        idx = np.flatnonzero(images.labels == c)
        keep.append(idx[np.random.default_rng([seed, 1, int(c)]).permutation(len(idx))[:cap]])
    return images.subset(np.sort(np.concatenate(keep)))


def _stratified_split(images: Images, fraction: float, seed: int) -> tuple[Images, Images]:
    """A seeded per-class split: ``round(fraction * n_c)`` of each class (at least one when the
    class has two or more) go to the test set."""
    test = []
    for c in np.unique(images.labels):
        idx = np.flatnonzero(images.labels == c)
        n_test = min(max(int(round(fraction * len(idx))), 1 if len(idx) > 1 else 0), len(idx) - 1)
        test.append(idx[np.random.default_rng([seed, 0, int(c)]).permutation(len(idx))[:n_test]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(images)), test_idx)
    return images.subset(train_idx), images.subset(test_idx)


# ---------------------------------------------------------------------------- preprocessing


class Preprocess:
    """Batches of normalised float images (m, 3, S, S) from indices, with a byte-capped cache.

    Train (``augment``): RandomResizedCrop(S, ``crop_scale``) + horizontal flip (``hflip``), drawn
    from torch's default generator, image by image in index order. Test (and train without
    augment): resize the shorter side to S, centre crop. Bicubic with antialiasing, as CLIP.
    The cache keeps decoded images (file datasets) and the deterministic test-time crops.
    """

    def __init__(self, size: int, mean, std, augment: bool, hflip: bool,
                 crop_scale: tuple[float, float], cache_mb: int):
        self.size, self.augment, self.hflip, self.crop_scale = size, augment, hflip, crop_scale
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.budget = cache_mb * 2**20
        self.used = 0
        self.cache: dict[tuple, Tensor] = {}

    def _cached(self, key: tuple, make) -> Tensor:
        img = self.cache.get(key)
        if img is None:
            img = make()
            if self.used + img.numel() <= self.budget:
                self.cache[key] = img
                self.used += img.numel()
        return img

    def _fixed(self, img: Tensor) -> Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        img = TF.resize(img, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(img, [self.size, self.size])

    def _random(self, img: Tensor) -> Tensor:
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w = RandomResizedCrop.get_params(img, list(self.crop_scale),
                                                       [3.0 / 4.0, 4.0 / 3.0])
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.hflip and bool(torch.rand(1) < 0.5):
            img = img.flip(-1)
        return img

    def batch(self, images: Images, indices, train: bool) -> Tensor:
        """(m, 3, S, S) float32, normalised with the model's mean and std."""
        tag = id(images)
        out = []
        for i in np.asarray(indices, dtype=np.int64):
            i = int(i)
            if train and self.augment:
                raw = (images.get(i) if isinstance(images, ArrayImages)
                       else self._cached((tag, "raw", i), lambda: images.get(i)))
                out.append(self._random(raw))
            else:
                out.append(self._cached((tag, "fixed", i), lambda: self._fixed(images.get(i))))
        x = torch.stack(out).float().div_(255.0)
        return (x - self.mean) / self.std
