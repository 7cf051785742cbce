"""Sample a grid of images from a stage-2 workdir:

    python -m vqgan_jax.sample --workdir=runs/demo/transformer --class_ids=0,1 --num=8 \
        --top_k=100 --top_p=0.95 --temperature=1.0 --out=samples.png

A row per class id (``--num`` samples each); an unconditional model takes no --class_ids and
draws ``--num`` samples. ``--height/--width`` (in codes) beyond the training grid sample with a
sliding window into larger images; ``--guidance_scale`` applies classifier-free guidance.
The work is done by :meth:`vqgan_jax.api.Generator.sample`, from the newest intact checkpoints
of the workdir and its tokenizer.
"""

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "A stage-2 (transformer) workdir.")
_OUT = flags.DEFINE_string("out", "samples.png", "PNG file to write.")
_CLASS_IDS = flags.DEFINE_list("class_ids", [], "Class ids, one row each (class models).")
_NUM = flags.DEFINE_integer("num", 8, "Samples per class (or in all, unconditional).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely codes; 0 keeps all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: smallest set of codes of mass >= p.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Divides the logits.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 1.0, "Classifier-free guidance; 1 is off.")
_HEIGHT = flags.DEFINE_integer("height", None, "Code rows (default: the training grid).")
_WIDTH = flags.DEFINE_integer("width", None, "Code columns (default: the training grid).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same seed gives the same images.")
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
    # No intact checkpoint or an argument that cannot work: the message, not a stack trace.
    with workdir.exit_on_error(ValueError):
        generator = api.load_generator(_WORKDIR.value)
        f = generator.tokenizer.downsample_factor
        images = generator.sample(
            class_ids=class_ids or None, num=_NUM.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
            temperature=_TEMPERATURE.value, guidance_scale=_GUIDANCE.value,
            height=_HEIGHT.value and _HEIGHT.value * f, width=_WIDTH.value and _WIDTH.value * f,
            seed=_SEED.value)
    workdir.write_png(_OUT.value, autoregressive.image_grid(images, max(1, len(class_ids))))


if __name__ == "__main__":
    app.run(main)
