"""Writes docs/demo_photos.jpg: the demo dataset's photos, training split then held-out split.

    python docs/demo_photos.py [--out=docs/demo_photos.jpg] [--height=160]

Two rows of training photos, then one of held-out photos, each scaled to ``--height`` pixels
high and captioned with its name and class id (the label stage 2 conditions on); the photos
come from :class:`vqgan_jax.data.sources.DemoSource`, so the grid shows what ``make demo``
trains on.
"""

from absl import app, flags
from PIL import Image, ImageDraw

from vqgan_jax.data.sources import DemoSource

_OUT = flags.DEFINE_string("out", "docs/demo_photos.jpg", "Where to write the grid (JPEG).")
_HEIGHT = flags.DEFINE_integer("height", 160, "Height of every photo in the grid, in pixels.")

_CAPTION = 16  # pixels under each photo for its caption
_GAP = 4


def _tiles(split: str, height: int) -> list[Image.Image]:
    source = DemoSource(split)
    tiles = []
    for index in range(len(source)):
        record = source[index]
        photo = Image.fromarray(record["image"])
        width = round(photo.width * height / photo.height)
        tile = Image.new("RGB", (width, height + _CAPTION), "white")
        tile.paste(photo.resize((width, height), Image.Resampling.LANCZOS), (0, 0))
        name = record["path"].rsplit(".", 1)[-1]
        caption = f"{index}: {name}" if split == "train" else f"held out: {name}"
        ImageDraw.Draw(tile).text((2, height + 2), caption, fill="black")
        tiles.append(tile)
    return tiles


def _row(tiles: list[Image.Image]) -> Image.Image:
    height = tiles[0].height
    row = Image.new("RGB", (sum(t.width for t in tiles) + _GAP * (len(tiles) - 1),
                            height), "white")
    x = 0
    for tile in tiles:
        row.paste(tile, (x, 0))
        x += tile.width + _GAP
    return row


def main(argv):
    del argv
    train = _tiles("train", _HEIGHT.value)
    half = (len(train) + 1) // 2  # the training photos in two rows, the held-out ones in a third
    rows = [_row(train[:half]), _row(train[half:]), _row(_tiles("validation", _HEIGHT.value))]
    grid_width = max(r.width for r in rows)
    grid = Image.new("RGB", (grid_width, sum(r.height for r in rows) + _GAP * 2), "white")
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height + _GAP
    grid.save(_OUT.value, quality=88)
    print(f"wrote {_OUT.value} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    app.run(main)
