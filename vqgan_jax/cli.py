"""The ``vqgan-jax`` console script: ``vqgan-jax train|sample|evaluate|convert [--flags]``.

Each subcommand is the absl main of its module, with the same flags as its ``python -m`` form
(``vqgan-jax train`` is ``python -m vqgan_jax.main``); ``vqgan-jax SUBCOMMAND --helpshort``
lists them. Only the chosen module is imported (the modules define flags of the same name).
"""

import importlib
import sys

SUBCOMMANDS = {"train": "vqgan_jax.main", "sample": "vqgan_jax.sample",
               "evaluate": "vqgan_jax.evaluate", "convert": "vqgan_jax.convert"}
USAGE = ("usage: vqgan-jax {train,sample,evaluate,convert} [--flags]   (vqgan-jax SUBCOMMAND "
         "--helpshort lists its flags)")


def main(argv: list[str] | None = None) -> None:
    """Run ``argv[0]``'s module main with the remaining arguments (default: ``sys.argv[1:]``).

    Raises:
      SystemExit: with the usage (status 2) for a missing or unknown subcommand; otherwise as
        the subcommand's ``absl.app.run`` exits.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] not in SUBCOMMANDS:
        sys.exit(f"vqgan-jax: unknown subcommand {argv[0]!r}.\n{USAGE}")
    from absl import app
    name = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(name)
    # absl's --helpshort lists the flags of the module named by sys.argv[0].
    sys.argv = [name, *argv[1:]]
    app.run(module.main, argv=sys.argv)


if __name__ == "__main__":
    main()
