"""The VQ-VAE baseline (van den Oord et al. 2017) on the demo photos: the tokenizer of
configs/demo.py (same model, data, optimizer and steps) trained with the L2 reconstruction
loss and the VQ loss only: no L1, no perceptual and no adversarial term.

    python -m vqgan_jax.main --config=configs/vqvae_demo.py --workdir=runs/vqvae_demo
"""

import importlib.util
import pathlib


def _demo_config():
    """configs/demo.py's get_config() (configs are files, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "configs_demo", pathlib.Path(__file__).with_name("demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    c = _demo_config()
    c.loss.update(l1_weight=0.0, l2_weight=1.0, perceptual_weight=0.0,
                  disc_factor=0.0,              # no adversarial term at any step
                  disc_start=c.num_train_steps + 1)
    return c
