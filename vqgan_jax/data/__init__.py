"""Input pipeline: image sources (demo photos, image folders, TFDS) and grain iterators."""
