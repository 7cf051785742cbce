"""Sample a grid of images from a stage-2 workdir (a GPT or a MaskGIT):

    python -m vqgan_jax.sample --workdir=runs/demo/transformer --class_ids=0,1 --num=8 \
        --top_k=100 --top_p=0.95 --temperature=1.0 --out=samples.png
    python -m vqgan_jax.sample --workdir=runs/demo/maskgit --class_ids=0,1 --num=8 \
        --num_steps=8 --choice_temperature=4.5 --guidance_scale=2 --guidance_schedule=linear

A row per class id (``--num`` samples each); an unconditional model takes no --class_ids and
draws ``--num`` samples. For a GPT ``--height/--width`` (in codes) beyond the training grid
sample with a sliding window into larger images; a MaskGIT samples its training grid in
``--num_steps`` parallel steps. ``--guidance_scale`` applies classifier-free guidance, its scale
over the sampling scheduled by ``--guidance_schedule`` (constant, linear, power_cosine with
``--guidance_power``, interval with ``--guidance_interval=lo,hi``). Flags of the other kind of
model are refused. The work is done by :meth:`vqgan_jax.api.Generator.sample`, from the newest
intact checkpoints of the workdir and its tokenizer.
"""

from absl import app, flags

from vqgan_jax import sampling_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A stage-2 (transformer or maskgit) workdir.")
_OUT = flags.DEFINE_string("out", "samples.png", "PNG file to write.")
_CLASS_IDS = flags.DEFINE_list("class_ids", [], "Class ids, one row each (class models).")
_NUM = flags.DEFINE_integer("num", 8, "Samples per class (or in all, unconditional).")
_HEIGHT = flags.DEFINE_integer("height", None, "Code rows (default: the training grid).")
_WIDTH = flags.DEFINE_integer("width", None, "Code columns (default: the training grid).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from vqgan_jax import api, console, workdir
    from vqgan_jax.samplers import autoregressive
    console.quiet_logs()
    try:
        class_ids = [int(c) for c in _CLASS_IDS.value]
    except ValueError as e:
        raise app.UsageError(f"--class_ids={','.join(_CLASS_IDS.value)}: {e}") from e
    kwargs = sampling_flags.values()
    # No intact checkpoint or an argument that cannot work: the message, not a stack trace.
    with workdir.exit_on_error(ValueError):
        generator = api.load_generator(_WORKDIR.value)
        f = generator.tokenizer.downsample_factor
        images = generator.sample(
            class_ids=class_ids or None, num=_NUM.value,
            height=_HEIGHT.value and _HEIGHT.value * f, width=_WIDTH.value and _WIDTH.value * f,
            **kwargs)
    workdir.write_png(_OUT.value, autoregressive.image_grid(images, max(1, len(class_ids))))


if __name__ == "__main__":
    app.run(main)
