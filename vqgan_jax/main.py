"""Train a model: ``python -m vqgan_jax.main --config=configs/imagenet_f16.py --workdir=DIR``.

``config.stage`` picks the trainer: ``tokenizer`` (stage 1), ``transformer`` (stage 2, a GPT)
or ``maskgit`` (stage 2, masked-token generation).

Any config field can be overridden on the command line, e.g. ``--config.num_train_steps=100``
or ``--config.dataset=folder:/path/to/images``. Re-running with the same --workdir resumes.

The job holds ``WORKDIR/LOCK`` while it runs (:func:`vqgan_jax.workdir.locked`): a second job on
the same workdir stops at once, naming the holder. Workdir faults (the workdir in use, no intact
checkpoint, a failed save) end the process with their message and exit status 1.

The console shows vqgan_jax's messages, warnings and a progress bar (a plain line every
``config.log_every_steps`` when stderr is not a terminal); ``--verbosity=1`` adds the INFO logs
of orbax, clu and jax (:mod:`vqgan_jax.console`).
"""

import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first: set it on every host of a "
    "multi-host TPU pod or GPU cluster (the launch/ scripts do); the coordinator, the number of "
    "processes and this process's index come from the cluster's environment (Cloud TPU "
    "metadata, SLURM, Open MPI, Kubernetes).")
_FORCE_UNLOCK = flags.DEFINE_bool(
    "force_unlock", False, "Take over WORKDIR/LOCK even if its holder may still run: only for a "
    "lock left by a job on another host that is certainly gone (a lock of a dead process on "
    "this host is taken over without it).")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = ("tokenizer", "transformer", "maskgit")  # modules of vqgan_jax.trainers


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from vqgan_jax import console
    console.quiet_logs()  # other libraries' INFO logs only with --verbosity=1
    config = _CONFIG.value
    if config.stage not in STAGES:
        raise ValueError(f"config.stage={config.stage!r}; known stages: {STAGES}.")
    import jax
    if _DISTRIBUTED.value:
        # CPU processes exchange collectives through gloo (TPU/GPU use their own interconnect).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # finds the cluster: Cloud TPU, SLURM, Open MPI, k8s
    logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].platform)
    import importlib
    from vqgan_jax import workdir
    if not _DISTRIBUTED.value:  # (jax.distributed handles SIGTERM itself)
        # SIGTERM outside the training loop (which saves first) exits through the lock's release.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with workdir.exit_on_error(), workdir.locked(_WORKDIR.value, force=_FORCE_UNLOCK.value):
        trainer = importlib.import_module(f"vqgan_jax.trainers.{config.stage}")
        trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
