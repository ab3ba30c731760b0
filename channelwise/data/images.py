"""Labelled images: Fashion-MNIST from Debian, or a local folder with one subfolder per class.

Fashion-MNIST (Xiao, Rasul & Vollgraf, arXiv 1708.07747; MIT/Expat) comes from the Debian
package ``dataset-fashion-mnist`` (60,000 train and 10,000 test 28×28 greyscale images, 10
classes): fetched once through :mod:`channelwise.data.debian`, its four IDX files cached under
``<channelwise_home>/data/fashion-mnist``. An :class:`ImageSet` keeps ``uint8`` images;
:meth:`ImageSet.pixels` turns a slice of them into a model's input (greyscale replicated to 3
channels, resized to a square resolution, normalised).
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from channelwise.data.debian import DebianPackage, unpacked_package
from channelwise.errors import DataSourceError
from channelwise.paths import channelwise_home, staged_file

FASHION_MNIST = DebianPackage(
    "dataset-fashion-mnist", env="CHANNELWISE_FASHION_MNIST_DEB", what="Fashion-MNIST"
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: The resolution a folder's images are stored at once loaded (resized again by ``pixels``).
FOLDER_SIZE = 224


@dataclass(frozen=True)
class ImageSet:
    """``images`` ``uint8 (n, channels, h, w)`` with ``labels`` ``int64 (n,)`` into ``classes``;
    ``source`` names where they came from (for reports and the calibrate-on-test guard)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices], self.classes, self.source)

    def pixels(
        self,
        start: int,
        stop: int,
        resolution: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> torch.Tensor:
        """Images ``start:stop`` as float ``(n, 3, resolution, resolution)``: scaled to [0, 1],
        greyscale replicated to RGB, resized (bicubic, antialiased), then ``(x − mean)/std``."""
        x = self.images[start:stop].float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (resolution, resolution):
            x = F.interpolate(
                x,
                size=(resolution, resolution),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            ).clamp_(0.0, 1.0)
        mean_t = torch.tensor(mean).view(1, 3, 1, 1)
        std_t = torch.tensor(std).view(1, 3, 1, 1)
        return (x - mean_t) / std_t


def seeded_subset(images: ImageSet, count: int | None, seed: int) -> ImageSet:
    """``count`` images drawn without replacement with ``seed`` (all of them, in order, when
    ``count`` is None or not smaller than the set)."""
    if count is None or count >= len(images):
        return images
    if count < 1:
        raise DataSourceError(f"an image count must be at least 1, got {count}")
    generator = torch.Generator().manual_seed(seed)
    return images.subset(torch.randperm(len(images), generator=generator)[:count].sort().values)


def load_images(source: str, split: str) -> ImageSet:
    """The images of ``source``: ``fashion-mnist`` (``split`` train or test) or a folder with one
    subfolder per class (``split`` ignored: use a different folder per split)."""
    if split not in _FILES:
        raise DataSourceError(f"unknown split {split!r}; expected 'train' or 'test'")
    if source.strip().lower() == "fashion-mnist":
        return fashion_mnist(split)
    path = Path(source).expanduser()
    if path.is_dir():
        return image_folder(path)
    state = "is a file, not a folder" if path.exists() else "does not exist"
    raise DataSourceError(
        f"image source {source!r} is neither 'fashion-mnist' nor a folder of class subfolders "
        f"({path.resolve()} {state})"
    )


def image_classes(source: str) -> tuple[str, ...]:
    """The class names of ``source`` in label order, without reading its images."""
    if source.strip().lower() == "fashion-mnist":
        return FASHION_MNIST_CLASSES
    path = Path(source).expanduser()
    if not path.is_dir():
        return load_images(source, "train").classes  # its one-line error
    return _folder_classes(path)


def _folder_classes(root: Path) -> tuple[str, ...]:
    """The class subfolders of ``root``, sorted; none is a DataSourceError."""
    classes = tuple(
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    )
    if not classes:
        raise DataSourceError(
            f"{root} has no class subfolders; expected one subfolder of images per class"
        )
    return classes


def image_source_identity(source: str, split: str) -> str:
    """What ``source`` reads at ``split``, comparable across spellings."""
    if source.strip().lower() == "fashion-mnist":
        return f"fashion-mnist:{split}"
    return str(Path(source).expanduser().resolve())


def fashion_mnist(split: str) -> ImageSet:
    """Fashion-MNIST's ``train`` or ``test`` split, 1×28×28 ``uint8`` images."""
    folder = ensure_fashion_mnist()
    images_file, labels_file = _FILES[split]
    images = read_idx(folder / images_file)
    labels = read_idx(folder / labels_file)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise DataSourceError(
            f"{folder}: {images_file} {tuple(images.shape)} and {labels_file} "
            f"{tuple(labels.shape)} do not describe one set of greyscale images"
        )
    if int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise DataSourceError(f"{folder / labels_file} holds labels outside 0..9")
    return ImageSet(
        images.unsqueeze(1).contiguous(),
        labels.long(),
        FASHION_MNIST_CLASSES,
        f"fashion-mnist:{split}",
    )


def ensure_fashion_mnist() -> Path:
    """Cache the four IDX files (fetching the Debian package if needed); return their folder."""
    folder = channelwise_home() / "data" / "fashion-mnist"
    names = [name for pair in _FILES.values() for name in pair]
    if all((folder / name).is_file() for name in names):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="channelwise-fashion-mnist-") as tmp:
        root = unpacked_package(FASHION_MNIST, Path(tmp))
        for name in names:
            found = sorted(root.rglob(name))
            if not found:
                raise DataSourceError(
                    f"{name} not found under {root}; is it the {FASHION_MNIST.name} package?"
                )
            with staged_file(folder / name) as out:
                shutil.copyfile(found[0], out)
    return folder


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (optionally gzipped) as a tensor; a malformed file is a DataSourceError."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataSourceError(f"cannot read {path} ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataSourceError(f"{path} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataSourceError(f"{path} is not an IDX file (truncated header)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataSourceError(
            f"{path} holds {len(raw) - header} data bytes where its header {shape} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


def image_folder(root: Path, size: int = FOLDER_SIZE) -> ImageSet:
    """Images under ``root/<class>/``, classes in sorted order, each resized to ``size``² RGB."""
    from PIL import Image, UnidentifiedImageError

    classes = _folder_classes(root)
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(
            p for p in (root / name).iterdir() if p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise DataSourceError(f"class folder {root / name} holds no images")
        for file in files:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataSourceError(
                    f"{file} is not an image ({', '.join(IMAGE_SUFFIXES)} are read)"
                )
            try:
                with Image.open(file) as image:
                    rgb = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataSourceError(f"{file} cannot be read as an image ({exc})") from exc
            images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1))
            labels.append(label)
    return ImageSet(torch.stack(images), torch.tensor(labels), tuple(classes), str(root.resolve()))
