"""Random-access image sources for the input pipeline.

Every source is a sequence of records ``{"image": uint8[H, W, 3] | None, "label": int,
"path": str}`` that ``grain.MapDataset.source`` reads by index. ``image`` is ``None`` when the
record could not be decoded; the pipeline drops those records and the source counts them in
``num_skipped``.

``get_source`` picks the source from the ``config.dataset`` string:

- ``"demo"``: ten colour photos shipped inside scikit-image and scikit-learn (no download).
- ``"folder:/path/to/images"``: every .jpg/.jpeg/.png under a directory tree.
- any TFDS image dataset name (``"imagenet2012"``, ``"imagenet2012:5.1.0"``), prepared in the
  array_record format in ``data_dir``; read with ``tfds.data_source``, without TensorFlow.
"""

from collections.abc import Sequence
import functools
import os
import pathlib
import threading
from typing import Any, BinaryIO

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_ACCEPTED_FORMS = (
    "'demo' (photos shipped with scikit-image), 'folder:/path/to/images' (a directory tree of "
    ".jpg/.jpeg/.png files, one sub-directory per class), or a TFDS image dataset name such as "
    "'imagenet2012' or 'imagenet2012:5.1.0'"
)

# scikit-image's colour photos and the two that scikit-learn ships (china: green trees and blue
# water; flower: green leaves; none of scikit-image's training photos has much green); the
# validation split holds out chelsea and coffee.
_DEMO_SPLITS = {
    "train": ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
              "stereo_motorcycle", "china", "flower"),
    "validation": ("chelsea", "coffee"),
}
_SKLEARN_PHOTOS = ("china", "flower")


class ImageSource:
    """A random-access sequence of image records (grain ``RandomAccessDataSource``).

    Subclasses implement ``__len__`` and ``_load``. Safe to read from several threads.

    Attributes:
      name: the ``config.dataset`` string the source was made from.
      split: the split it reads.
      num_classes: number of distinct labels (labels are in ``[0, num_classes)``), 0 if the
        dataset has none.
      num_skipped: how many reads so far returned an undecodable record (``image`` None).
        Counts every read, so a corrupt file is counted again in each epoch, and records
        read ahead by the pipeline's prefetch threads count before the trainer sees them.

    Raises (from ``__getitem__``):
      ValueError: once as many reads as the source has records failed and none succeeded:
        a dataset with no usable image stops the run instead of looping forever.
    """

    name: str
    split: str
    num_classes: int

    def __init__(self):
        self._skipped = 0
        self._decoded = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> dict[str, Any]:
        """Returns record ``index``; ``image`` None if it cannot be decoded."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Returns ``{"image": uint8[H, W, 3] | None, "label": int, "path": str}``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self!r} of length {len(self)}")
        record = self._load(index)
        with self._lock:
            if record["image"] is not None:
                self._decoded += 1
                return record
            self._skipped += 1
            if self._decoded == 0 and self._skipped >= len(self):
                raise ValueError(
                    f"{self!r}: none of its {len(self)} images could be decoded (see the "
                    "warnings above for each path); point config.dataset at usable images.")
        return record

    @property
    def num_skipped(self) -> int:
        return self._skipped

    def __getstate__(self):  # Picklable for grain's multiprocessing workers.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r})"


def get_source(dataset: str, split: str, *, data_dir: str | None = None) -> ImageSource:
    """Returns the image source named by ``config.dataset``.

    Args:
      dataset: ``"demo"``, ``"folder:/path/to/images"`` or a TFDS image dataset name, optionally
        with config and version (``"imagenet2012:5.1.0"``).
      split: ``"train"`` or ``"validation"`` for the demo; for a folder, ``root/<split>/`` is used
        if it exists, otherwise the whole tree; for TFDS any split string (``"train[:1%]"``).
      data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        Ignored by the demo and folder sources.

    Raises:
      ValueError: for a ``dataset`` string of none of these forms, an unknown demo split, a
        folder that does not exist or holds no image files, or a TFDS dataset that has no
        ``image`` feature or is not prepared (as array_record) in ``data_dir``.
    """
    if dataset == "demo":
        return DemoSource(split)
    if dataset.startswith("folder:"):
        path = dataset.removeprefix("folder:")
        if not path:
            raise ValueError(f"config.dataset={dataset!r} names no folder; accepted forms: "
                             f"{_ACCEPTED_FORMS}.")
        return FolderSource(path, split)
    return TfdsSource(dataset, split, data_dir=data_dir)


# ----------------------------------------------------------------------------------------------
# Decoding.


def decode_image(file: str | os.PathLike | BinaryIO, path: str) -> np.ndarray | None:
    """Decodes an image file with PIL into ``uint8[H, W, 3]`` RGB, or None if it cannot.

    Applies the EXIF orientation; converts greyscale, RGBA (alpha dropped), palette, CMYK and
    16-bit images to 8-bit RGB. Any decode error is logged as a warning naming ``path``.
    """
    try:
        with Image.open(file) as img:
            img = ImageOps.exif_transpose(img)  # Also forces the (lazy) decode.
            return pil_to_rgb(img)
    except Exception as e:  # noqa: BLE001  PIL raises OSError, ValueError, SyntaxError, ...
        logging.warning("Skipping undecodable image %s: %s: %s", path, type(e).__name__, e)
        return None


def pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Returns a PIL image of any mode as ``uint8[H, W, 3]`` RGB."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit greyscale: PIL's convert("RGB") would clip at 255 instead of rescaling.
        grey = np.clip(np.asarray(img, np.float32) / 257.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(grey)
    elif img.mode == "P":
        img = img.convert("RGBA")  # Keeps palette transparency from warning in convert("RGB").
    return np.asarray(img.convert("RGB"))


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    """uint8[H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8[H, W, 3]."""
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return pil_to_rgb(Image.fromarray(image))


# ----------------------------------------------------------------------------------------------
# Sources.


@functools.cache
def _demo_photo(name: str) -> np.ndarray:
    """One scikit-image or scikit-learn photo, loaded once: uint8[H, W, 3], read-only."""
    if name in _SKLEARN_PHOTOS:
        # sklearn/datasets/images/<name>.jpg, found without importing scikit-learn (its import
        # costs a second); sklearn.datasets.load_sample_image reads the same file.
        import importlib.util
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("The demo dataset reads two photos shipped with scikit-learn; "
                              "install it: pip install scikit-learn")
        path = pathlib.Path(spec.submodule_search_locations[0], "datasets", "images",
                            f"{name}.jpg")
        with Image.open(path) as image:
            photo = np.asarray(image.convert("RGB"))
    else:
        import skimage.data  # Imported here: only the demo needs it.
        photo = skimage.data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else (
            getattr(skimage.data, name)())
    photo = np.ascontiguousarray(photo)
    photo.setflags(write=False)
    return photo


class DemoSource(ImageSource):
    """scikit-image's and scikit-learn's colour photos (300x451 to 1411x1411), kept in memory.

    Split ``"train"``: scikit-image's astronaut, rocket, hubble_deep_field,
    immunohistochemistry, retina, stereo_motorcycle (left view), then scikit-learn's china and
    flower (427x640). Split ``"validation"``: chelsea, coffee (held out).
    ``label`` is the photo's index within its split.
    """

    def __init__(self, split: str):
        super().__init__()
        if split not in _DEMO_SPLITS:
            raise ValueError(f"The demo dataset has splits {sorted(_DEMO_SPLITS)}, not {split!r} "
                             "(config.train_split / config.eval_split).")
        self.name, self.split = "demo", split
        self._names = _DEMO_SPLITS[split]
        self._photos = [_demo_photo(n) for n in self._names]
        self.num_classes = len(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _load(self, index: int) -> dict[str, Any]:
        name = self._names[index]
        package = "sklearn.datasets.images" if name in _SKLEARN_PHOTOS else "skimage.data"
        return {"image": self._photos[index], "label": index, "path": f"{package}.{name}"}


class FolderSource(ImageSource):
    """Every .jpg/.jpeg/.png (any case) under a directory tree, decoded with PIL on read.

    Files are sorted by path. ``label`` is the index of the file's first-level sub-directory
    among the sorted sub-directories holding images; files directly in the root form the
    first class (label 0). If ``root/<split>/`` exists, only that sub-tree is read.
    """

    def __init__(self, root: str, split: str):
        super().__init__()
        self.name, self.split = f"folder:{root}", split
        path = pathlib.Path(root).expanduser()
        if not path.is_dir():
            raise ValueError(f"config.dataset folder {root!r} does not exist or is not a "
                             "directory.")
        if (path / split).is_dir():
            path = path / split
        self.root = path
        self._files = sorted(  # Paths relative to the root, as strings (compact, picklable).
            p.relative_to(path).as_posix() for p in path.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self._files:
            raise ValueError(f"config.dataset folder {str(path)!r} holds no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)}, searched recursively).")
        class_of = [f.split("/")[0] if "/" in f else "" for f in self._files]
        self.class_names = sorted(set(class_of))  # "" (files in the root) sorts first.
        index = {c: i for i, c in enumerate(self.class_names)}
        self._labels = [index[c] for c in class_of]
        self.num_classes = len(self.class_names)

    def __len__(self) -> int:
        return len(self._files)

    def _load(self, index: int) -> dict[str, Any]:
        path = str(self.root / self._files[index])
        return {"image": decode_image(path, path), "label": self._labels[index], "path": path}


class TfdsSource(ImageSource):
    """A TFDS image dataset prepared as array_record, read through ``tfds.data_source``.

    Images are decoded by TFDS's NumPy path (PIL, no TensorFlow) and converted to RGB; a
    record whose decoding fails is returned with ``image`` None and logged.
    """

    def __init__(self, dataset: str, split: str, *, data_dir: str | None = None):
        super().__init__()
        self.name, self.split = dataset, split
        self._data_source = _tfds_data_source(dataset, split, data_dir)
        features = self._data_source.dataset_info.features
        label = features["label"] if "label" in features else None
        self.num_classes = getattr(label, "num_classes", None) or 0

    def __len__(self) -> int:
        return len(self._data_source)

    def _load(self, index: int) -> dict[str, Any]:
        path = f"{self.name}/{self.split}/{index}"
        try:
            example = self._data_source[index]
        except Exception as e:  # noqa: BLE001  a corrupt image fails inside TFDS's PIL decode.
            logging.warning("Skipping undecodable record %s: %s: %s", path, type(e).__name__, e)
            return {"image": None, "label": 0, "path": path}
        file_name = example.get("file_name")
        if file_name is not None:
            path = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        return {"image": _array_to_rgb(np.asarray(example["image"])),
                "label": int(example.get("label", 0)), "path": path}


def _tfds_data_source(dataset: str, split: str, data_dir: str | None) -> Sequence[Any]:
    """``tfds.data_source(dataset, split=split, data_dir=data_dir)`` without downloading.

    Builds the builder first (which validates the name and the features from the dataset's
    code, offline) and turns TFDS's errors into ValueErrors that say what to do.
    """
    import tensorflow_datasets as tfds  # Imported here: slow, and only TFDS sources need it.

    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except (ValueError, AssertionError, TypeError) as e:  # DatasetNotFoundError is a ValueError.
        reason = str(e).strip().split("\n")[0]  # TFDS goes on to list all its datasets.
        raise ValueError(f"Unknown config.dataset={dataset!r}; accepted forms: "
                         f"{_ACCEPTED_FORMS}. (TFDS: {reason})") from e
    features = builder.info.features
    if not (isinstance(features, tfds.features.FeaturesDict) and "image" in features
            and isinstance(features["image"], tfds.features.Image)):
        raise ValueError(f"config.dataset={dataset!r} has no 'image' feature; accepted forms: "
                         f"{_ACCEPTED_FORMS}.")
    try:
        # What tfds.data_source(..., download=False) does, keeping the builder for the errors.
        return builder.as_data_source(split=split)
    except (NotImplementedError, FileNotFoundError, AssertionError) as e:
        if not builder.is_prepared():
            raise ValueError(_not_prepared_message(dataset, builder)) from e
        raise ValueError(
            f"TFDS dataset {dataset!r} in {builder.data_path} is stored as "
            f"{builder.info.file_format.value}, which has no random access. Convert it with "
            f"`tfds convert_format --dataset_version_dir={builder.data_path} "
            "--out_file_format=array_record` (requires TensorFlow), or train on your own "
            "images with --config.dataset=folder:/path/to/images.") from e


def _not_prepared_message(dataset: str, builder) -> str:
    root = builder.data_dir_root
    build = (f"`tfds build {builder.name} --data_dir={root} --file_format=array_record` "
             "(requires TensorFlow: `pip install tensorflow`)")
    if builder.name == "imagenet2012":
        how = ("place ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
               f"{root}/downloads/manual/ and run {build}")
    elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        how = (f"place its files in {root}/downloads/manual/ "
               f"({builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()}) and run {build}")
    else:
        how = f"run {build}"
    return (f"TFDS dataset {dataset!r} is not prepared in data_dir {root} (config.data_dir); "
            f"nothing is downloaded at training time. To prepare it, {how}. Or train on your "
            "own images with --config.dataset=folder:/path/to/images.")
