"""Tests for vqgan_jax.data: sources (demo, folder, TFDS) and the grain pipeline."""

import collections
import io
import pathlib
import socket
import subprocess
import sys
import time

import grain
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from vqgan_jax.data import pipeline
from vqgan_jax.data import sources


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Nothing in the input pipeline may download at run time."""
    def refuse(self, address, *args):
        raise OSError(f"test tried to open a connection to {address}")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """Two classes of 4 decodable images each, in assorted modes, plus 3 broken files."""
    root = tmp_path / "images"
    cats, dogs = root / "cats", root / "dogs"
    cats.mkdir(parents=True)
    dogs.mkdir()
    Image.fromarray(_rgb(24, 32)).save(cats / "rgb.png")
    Image.fromarray(_rgb(24, 32)[..., 0]).save(cats / "grey.jpg")
    Image.fromarray(np.dstack([_rgb(20, 20), np.full((20, 20), 128, np.uint8)])).save(
        cats / "rgba.png")
    Image.fromarray(_rgb(16, 16)).quantize(8).save(cats / "palette.png", transparency=0)
    Image.fromarray(_rgb(40, 30)).convert("CMYK").save(dogs / "cmyk.jpg")
    Image.fromarray(np.full((12, 10), 128 * 257, np.uint16)).save(dogs / "grey16.png")
    Image.fromarray(_rgb(5, 7)).save(dogs / "tiny.PNG")  # smaller than any crop size
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees to display.
    Image.fromarray(_rgb(10, 20)).save(dogs / "rotated.JPEG", exif=exif)
    (dogs / "corrupt.jpg").write_bytes(b"these bytes are not an image")
    (dogs / "empty.png").write_bytes(b"")
    jpeg = io.BytesIO()
    Image.fromarray(_rgb(64, 64)).save(jpeg, "JPEG")
    (dogs / "truncated.jpg").write_bytes(jpeg.getvalue()[:jpeg.tell() // 2])
    (dogs / "notes.txt").write_text("not an image file: ignored")
    return root


def _decoded(source):
    return {rec["path"].rsplit("/", 1)[-1]: rec for rec in (source[i] for i in range(len(source)))}


# ----------------------------------------------------------------------------------------------
# Sources.


def test_demo_source():
    train, val = sources.get_source("demo", "train"), sources.get_source("demo", "validation")
    assert (len(train), len(val)) == (8, 2)
    assert (train.num_classes, train.name) == (8, "demo")
    for src in (train, val):
        for i in range(len(src)):
            rec = src[i]
            assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3
            assert rec["image"].shape[2] == 3 and rec["label"] == i
    assert [val[i]["path"] for i in range(2)] == ["skimage.data.chelsea", "skimage.data.coffee"]
    assert [train[i]["path"] for i in (0, 6, 7)] == [
        "skimage.data.astronaut", "sklearn.datasets.images.china", "sklearn.datasets.images.flower"]
    assert not {train[i]["path"] for i in range(8)} & {val[i]["path"] for i in range(2)}
    with pytest.raises(ValueError, match="validation"):
        sources.get_source("demo", "test")


def test_demo_photos_grid_shows_every_photo_of_both_splits(tmp_path):
    """docs/demo_photos.py: two rows of the eight training photos, then the two held-out ones,
    each scaled to --height and captioned (the picture in docs/)."""
    out = tmp_path / "grid.jpg"
    root = pathlib.Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, str(root / "docs" / "demo_photos.py"), f"--out={out}",
                    "--height=40"], check=True, cwd=root, capture_output=True)
    grid = np.asarray(Image.open(out))
    train, val = sources.get_source("demo", "train"), sources.get_source("demo", "validation")
    widths = [round(s[i]["image"].shape[1] * 40 / s[i]["image"].shape[0])
              for s in (train, val) for i in range(len(s))]
    rows = [widths[:4], widths[4:8], widths[8:]]
    assert grid.shape == (3 * (40 + 16) + 2 * 4, max(sum(r) + 4 * (len(r) - 1) for r in rows), 3)
    # Each tile holds its photo: the first training photo's tile against the photo, resized.
    first = np.asarray(Image.fromarray(train[0]["image"]).resize((widths[0], 40),
                                                                 Image.Resampling.LANCZOS))
    assert np.abs(grid[:40, :widths[0]].astype(int) - first.astype(int)).mean() < 8  # JPEG


def test_folder_source_decodes_to_rgb_and_skips_broken_files(folder):
    src = sources.get_source(f"folder:{folder}", "train")
    assert len(src) == 11 and src.num_classes == 2  # notes.txt is not listed
    recs = _decoded(src)
    assert [n for n, r in recs.items() if r["image"] is None] == [
        "corrupt.jpg", "empty.png", "truncated.jpg"]
    assert src.num_skipped == 3
    for name, rec in recs.items():
        assert rec["label"] == (0 if "cats" in rec["path"] else 1)
        if rec["image"] is not None:
            assert rec["image"].dtype == np.uint8 and rec["image"].shape[2] == 3, name
    assert recs["grey16.png"]["image"].shape == (12, 10, 3)
    np.testing.assert_array_equal(recs["grey16.png"]["image"], 128)  # rescaled, not clipped
    assert recs["rotated.JPEG"]["image"].shape == (20, 10, 3)  # EXIF orientation applied
    assert recs["tiny.PNG"]["image"].shape == (5, 7, 3)


def test_folder_source_split_subdirectory_and_root_files(tmp_path):
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "root.png")
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "train" / "a" / "x.png")
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "train" / "top.png")
    train = sources.get_source(f"folder:{tmp_path}", "train")
    assert [train[i]["label"] for i in range(len(train))] == [1, 0]  # a/x.png, top.png
    whole = sources.get_source(f"folder:{tmp_path}", "validation")  # no such subdir
    assert len(whole) == 3 and whole.num_classes == 2


def test_empty_or_missing_folder_raises(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        sources.get_source(f"folder:{tmp_path / 'empty'}", "train")
    with pytest.raises(ValueError, match="missing"):
        sources.get_source(f"folder:{tmp_path / 'missing'}", "train")


@pytest.mark.parametrize("dataset", ["no_such_dataset_xyz", "folder:", "", "mnist/nope"])
def test_unknown_dataset_raises(dataset):
    with pytest.raises(ValueError, match="config.dataset"):
        sources.get_source(dataset, "train")


def test_imagenet_not_prepared_raises_quickly_without_network(tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="downloads/manual") as e:
        sources.get_source("imagenet2012", "train", data_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert "folder:" in message and "ILSVRC2012_img_train.tar" in message
    assert "pip install tensorflow" in message and str(tmp_path) in message


def test_tfds_mock_imagenet_batches(tmp_path):
    # mock_data patches builder.as_data_source (what tfds.data_source calls) and works without
    # TensorFlow as long as the images are decoded by TFDS (no SkipDecoding).
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        src = sources.get_source("imagenet2012", "train", data_dir=str(tmp_path))
        assert len(src) == 6 and src.num_classes == 1000
        rec = src[0]
        assert rec["image"].dtype == np.uint8 and rec["image"].shape[2] == 3
        assert isinstance(rec["path"], str) and 0 <= rec["label"] < 1000
        it = pipeline.train_iterator(src, image_size=16, global_batch_size=4, seed=0,
                                     process_index=0, process_count=1)
        batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3) and batch["label"].dtype == np.int32
    assert pipeline.center_crop_resize(rec["image"], 8).shape == (8, 8, 3)


class VqganTestImages(tfds.core.GeneratorBasedBuilder):
    """A real (not mocked) TFDS dataset: 6 PNGs in 3 classes, written as array_record."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
            "file_name": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(6):
            png = io.BytesIO()
            Image.fromarray(_rgb(20 + i, 30, seed=i)).save(png, "PNG")
            png.seek(0)
            yield i, {"image": png, "label": i % 3, "file_name": f"img{i}.png"}


def test_tfds_array_record_dataset_without_tensorflow(tmp_path):
    VqganTestImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    src = sources.get_source("vqgan_test_images", "train", data_dir=str(tmp_path))
    assert len(src) == 6 and src.num_classes == 3
    recs = [src[i] for i in range(6)]
    assert sorted(r["path"] for r in recs) == [f"img{i}.png" for i in range(6)]
    for r in recs:
        i = int(r["path"][3])
        np.testing.assert_array_equal(r["image"], _rgb(20 + i, 30, seed=i))
        assert r["label"] == i % 3
    batch = next(pipeline.train_iterator(src, image_size=8, global_batch_size=6, seed=0,
                                         process_index=0, process_count=1))
    assert sorted(batch["label"]) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="Unknown split"):
        sources.get_source("vqgan_test_images", "test", data_dir=str(tmp_path))


def test_imports_do_not_load_tensorflow():
    code = ("import sys, vqgan_jax.data.pipeline, vqgan_jax.data.sources; "
            "assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# Pipeline.


def _demo_iterator(seed=0, **kw):
    return pipeline.train_iterator(sources.get_source("demo", "train"), image_size=32,
                                   global_batch_size=4, seed=seed, **kw)


def test_train_iterator_batches_and_determinism():
    a, b, c = _demo_iterator(), _demo_iterator(), _demo_iterator(seed=1)
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        assert x["image"].shape == (4, 32, 32, 3) and x["image"].dtype == np.float32
        assert x["label"].shape == (4,) and x["label"].dtype == np.int32
        assert -1 <= x["image"].min() and x["image"].max() <= 1 and x["image"].std() > 0.1
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(x["image"], z["image"])


def test_train_iterator_resumes_from_state():
    it = _demo_iterator()
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = _demo_iterator()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_train_iterator_checkpoints_with_orbax(tmp_path):
    import orbax.checkpoint as ocp

    it = _demo_iterator()
    next(it)
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        expected = next(it)  # advancing while the (async) save runs does not change it
    resumed = _demo_iterator()
    with ocp.CheckpointManager(tmp_path, item_names=("data",)) as manager:
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(
            resumed)))
    np.testing.assert_array_equal(next(resumed)["image"], expected["image"])


def test_folder_iteration_skips_and_counts_broken_files(folder):
    src = sources.get_source(f"folder:{folder}", "train")
    it = pipeline.train_iterator(src, image_size=16, global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)
    labels = np.concatenate([next(it)["label"] for _ in range(4)])  # 2 epochs of 8 images
    assert collections.Counter(labels.tolist()) == {0: 8, 1: 8}
    assert src.num_skipped >= 6  # 3 per epoch (prefetching may have read further)


def test_process_sharding_is_disjoint(tmp_path):
    for c in range(8):  # one image per class: the label names the record
        (tmp_path / f"c{c}").mkdir()
        Image.fromarray(_rgb(12, 12, seed=c)).save(tmp_path / f"c{c}" / "x.png")
    src = sources.get_source(f"folder:{tmp_path}", "train")
    seen = []
    for process in (0, 1):
        it = pipeline.train_iterator(src, image_size=8, global_batch_size=4, seed=0,
                                     process_index=process, process_count=2)
        batches = [next(it) for _ in range(2)]  # one epoch of this process's 4 records
        assert all(b["image"].shape == (2, 8, 8, 3) for b in batches)
        seen.append({int(x) for b in batches for x in b["label"]})
    assert len(seen[0]) == len(seen[1]) == 4 and not seen[0] & seen[1]
    with pytest.raises(ValueError, match="config.batch_size"):
        pipeline.train_iterator(src, image_size=8, global_batch_size=5, seed=0,
                                process_index=0, process_count=2)


def test_eval_images_and_center_crop_resize(folder):
    demo = pipeline.eval_images(sources.get_source("demo", "validation"), multiple_of=16)
    assert [x.shape for x in demo] == [(288, 448, 3), (400, 592, 3)]  # chelsea, coffee
    assert all(x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1 for x in demo)
    images = pipeline.eval_images(sources.get_source(f"folder:{folder}", "train"),
                                  multiple_of=8, max_images=3)
    assert len(images) == 3 and all(x.shape[0] % 8 == x.shape[1] % 8 == 0 for x in images)
    resized = pipeline.eval_images(sources.get_source(f"folder:{folder}", "train"),
                                   image_size=16, max_images=2)  # the evaluation protocol
    assert [x.shape for x in resized] == [(16, 16, 3)] * 2
    out = pipeline.center_crop_resize(_rgb(30, 50), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32 and out.min() >= -1


def test_native_scale_random_crops_are_pixel_exact_windows():
    """crop_mode="random": every output is an image_size window of a photo, flipped or not."""
    src = sources.get_source("demo", "train")
    photos = [src[i]["image"] for i in range(len(src))]
    batch = next(pipeline.train_iterator(src, image_size=16, global_batch_size=4, seed=3,
                                         crop_mode="random"))
    for crop in batch["image"]:
        crop_u8 = np.round((crop + 1) * 127.5).astype(np.uint8)
        def occurs(window, photo):
            tops, lefts = np.nonzero((photo[:-15, :-15] == window[0, 0]).all(-1))
            return any((photo[t:t + 16, l:l + 16] == window).all() for t, l in zip(tops, lefts))
        assert any(occurs(c, p) for p in photos for c in (crop_u8, crop_u8[:, ::-1]))
    with pytest.raises(ValueError, match="config.crop_mode"):
        pipeline.train_iterator(src, image_size=16, global_batch_size=4, seed=0, crop_mode="x")


def test_folder_without_a_usable_image_is_a_clear_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "b.png").write_bytes(b"")
    src = sources.get_source(f"folder:{tmp_path}", "train")
    it = pipeline.train_iterator(src, image_size=8, global_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="none of its 2 images could be decoded"):
        next(it)
