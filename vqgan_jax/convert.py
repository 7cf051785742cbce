"""Convert taming-transformers checkpoints to vqgan_jax workdirs, and back.

A taming VQModel (stage 1) -> a stage-1 workdir that main (resume), the sampler and the
evaluator load::

    python -m vqgan_jax.convert --from_taming=last.ckpt --config=configs/imagenet_f16.py \
        --out=runs/taming_f16

A class-conditional Net2NetTransformer -> a stage-2 workdir (and the stage-1 workdir of its
first stage, by default OUT/tokenizer)::

    python -m vqgan_jax.convert --from_taming=cin.ckpt \
        --config=configs/imagenet_cond_transformer.py \
        --tokenizer_config=configs/imagenet_f16_16384.py --out=runs/taming_cin

A stage-1 workdir -> a file taming's VQModel loads with strict=True::

    python -m vqgan_jax.convert --to_taming=vqgan.ckpt --workdir=runs/demo

A LlamaGen VQModel (their released ``vq_ds16_c2i.pt``) -> a stage-1 workdir; without
--config the layout is read off the file on top of configs/llamagen_vq16.py::

    python -m vqgan_jax.convert --from_llamagen=vq_ds16_c2i.pt --out=runs/llamagen_vq16

A stage-1 workdir -> ``{"model": ...}`` that LlamaGen's VQModel loads with strict=True::

    python -m vqgan_jax.convert --to_llamagen=vq.pt --workdir=runs/llamagen_vq16

Config fields can be overridden as in main (``--config.model.n_embed=16384``). Files are read
with ``torch.load(weights_only=True)``; ``--trust_pickle`` unpickles one file you trust. The
work is done by :mod:`vqgan_jax.interop.taming` and :mod:`vqgan_jax.interop.llamagen`.
"""

from absl import app, flags
from ml_collections import config_flags

_FROM = flags.DEFINE_string("from_taming", None, "A taming .ckpt (VQModel or Net2NetTransformer).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "With --from_taming (optional with --from_llamagen): the recipe describing "
    "the checkpoint's model (stage 1 for a VQModel, stage 2 for a Net2NetTransformer).",
    lock_config=True)
_TOKENIZER_CONFIG = config_flags.DEFINE_config_file(
    "tokenizer_config", None, "With a Net2NetTransformer: the stage-1 recipe of its "
    "first_stage_model.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "With --from_taming / --from_llamagen: the workdir to "
                           "write (new or empty).")
_TOKENIZER_OUT = flags.DEFINE_string(
    "tokenizer_out", None, "With a Net2NetTransformer: the stage-1 workdir to write for its "
    "first stage (default OUT/tokenizer).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to write (default: the file's "
                             "global_step (taming) or steps (LlamaGen), else 0).")
_SOS_TOKEN = flags.DEFINE_integer("sos_token", 0, "Unconditional Net2Net: its SOSProvider token.")
_TRUST = flags.DEFINE_bool("trust_pickle", False, "Unpickle the whole --from_* file (runs "
                           "any code it holds); only for a file you trust.")
_TO = flags.DEFINE_string("to_taming", None, "Write the stage-1 --workdir as a taming .ckpt here.")
_WORKDIR = flags.DEFINE_string("workdir", None, "With --to_taming / --to_llamagen: a stage-1 "
                                "workdir.")
_FROM_LLAMAGEN = flags.DEFINE_string(
    "from_llamagen", None, "A LlamaGen VQModel .pt (e.g. vq_ds16_c2i.pt); --config is optional "
    "(default: configs/llamagen_vq16.py with the layout read off the file).")
_TO_LLAMAGEN = flags.DEFINE_string("to_llamagen", None, "Write the stage-1 --workdir as a "
                                   "LlamaGen VQModel .pt here.")
_LOSS = flags.DEFINE_enum("taming_loss", "vqlpips", ["vqlpips", "dummy"],
                          "With --to_taming: the loss of the taming VQModel that loads the file "
                          "(vqlpips: VQLPIPSWithDiscriminator; dummy: DummyLoss, no loss.* keys).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    directions = [f for f in (_FROM, _TO, _FROM_LLAMAGEN, _TO_LLAMAGEN) if f.value]
    if len(directions) != 1:
        raise app.UsageError("Pass exactly one of --from_taming=FILE, --to_taming=FILE, "
                             "--from_llamagen=FILE or --to_llamagen=FILE.")
    from vqgan_jax import console, workdir
    from vqgan_jax.interop import llamagen, taming
    console.quiet_logs()  # other libraries' INFO logs only with --verbosity=1
    if _FROM_LLAMAGEN.value:
        if not _OUT.value:
            raise app.UsageError("--from_llamagen needs --out=DIR.")
        with workdir.exit_on_error(taming.ConversionError):  # e.g. torch missing: the message
            out = llamagen.convert_from_llamagen(_FROM_LLAMAGEN.value, _OUT.value, _CONFIG.value,
                                                 step=_STEP.value, trust_pickle=_TRUST.value)
        print(f"Wrote the tokenizer workdir {out}")
    elif _TO_LLAMAGEN.value:
        if not _WORKDIR.value:
            raise app.UsageError("--to_llamagen needs --workdir=DIR (a stage-1 workdir).")
        with workdir.exit_on_error(taming.ConversionError):  # no intact checkpoint, no torch
            state_dict = llamagen.convert_to_llamagen(_WORKDIR.value, _TO_LLAMAGEN.value)
        print(f"Wrote {_TO_LLAMAGEN.value} ({len(state_dict)} tensors)")
    elif _FROM.value:
        if _CONFIG.value is None or not _OUT.value:
            raise app.UsageError("--from_taming needs --config=RECIPE.py and --out=DIR.")
        with workdir.exit_on_error(taming.ConversionError):  # e.g. torch missing: the message
            written = taming.convert_from_taming(
                _FROM.value, _CONFIG.value, _OUT.value, tokenizer_config=_TOKENIZER_CONFIG.value,
                tokenizer_out=_TOKENIZER_OUT.value, step=_STEP.value, sos_token=_SOS_TOKEN.value,
                trust_pickle=_TRUST.value)
        for stage, out in written.items():
            print(f"Wrote the {stage} workdir {out}")
    else:
        if not _WORKDIR.value:
            raise app.UsageError("--to_taming needs --workdir=DIR (a stage-1 workdir).")
        # No intact checkpoint, torch missing: the message, no stack trace.
        with workdir.exit_on_error(taming.ConversionError):
            state_dict = taming.convert_to_taming(_WORKDIR.value, _TO.value, _LOSS.value)
        print(f"Wrote {_TO.value} ({len(state_dict)} tensors)")


if __name__ == "__main__":
    app.run(main)
