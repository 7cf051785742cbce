"""taming-transformers' stage-1 training step in PyTorch, for benchmarks/peer_taming.py.

:class:`TamingLoop` runs taming's ``VQModel.training_step`` with ``VQLPIPSWithDiscriminator``
as PyTorch Lightning (automatic optimization, two optimizers) runs them: per batch,

* optimizer 0 (generator): ``xrec, qloss = model(x)``; loss = mean(|x - xrec| +
  perceptual_weight * LPIPS(x, xrec)) + d_weight * disc_factor * (-mean D(xrec)) +
  codebook_weight * qloss, with ``d_weight`` from two ``autograd.grad`` calls on the decoder's
  last layer (``calculate_adaptive_weight``); zero_grad, backward, Adam step;
* optimizer 1 (discriminator): Lightning calls ``training_step`` again, so ``model(x)`` runs
  again; hinge loss on D(x) and D(xrec.detach()); zero_grad, backward, Adam step.

Lightning's ``toggle_optimizer`` leaves only the current optimizer's parameters requiring
grad. ``reuse_xrec=True`` is the lean variant: the discriminator step reuses the generator
pass's ``xrec``. The models are tests/taming_reference.py's; LPIPS has VGG16's shapes with
random frozen weights (the FLOPs of the real one), the discriminator's BatchNorm trains.
"""

import functools
import pathlib
import sys

import ml_collections
import torch
import torch.nn.functional as F

from vqgan_jax.state import tokenizer as state1

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import taming_reference as ref  # noqa: E402


def lpips_distance(net: ref.LPIPS, x, y):
    """taming's LPIPS forward (eval mode): x, y [B, 3, H, W] -> [B, 1, 1, 1]."""
    unit = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)
    feats = []
    for img in (x, y):
        h, fs = (img - net.scaling_layer.shift) / net.scaling_layer.scale, []
        for s in range(1, 6):  # relu1_2 [B,64,H,W] ... relu5_3 [B,512,H/16,W/16]
            h = getattr(net.net, f"slice{s}")(h)
            fs.append(h)
        feats.append(fs)
    heads = (getattr(net, f"lin{k}").model for k in range(5))  # 1x1 conv to [B, 1, h, w]
    return sum(head((unit(f0) - unit(f1)) ** 2).mean([2, 3], keepdim=True)
               for head, f0, f1 in zip(heads, *feats))


class TamingLoop:
    """One model pair and its two Adam optimizers (lr = base_learning_rate * batch_size, the
    config's betas); :meth:`step` trains on one batch. ``dtype="bfloat16"``: autocast."""

    def __init__(self, config: ml_collections.ConfigDict, device: str = "cpu",
                 dtype: str = "float32", reuse_xrec: bool = False):
        m, d, self.loss = config.model, config.disc, config.loss
        torch.manual_seed(0)
        self.model = ref.VQModel(
            m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attn_resolutions), m.z_channels,
            config.image_size, m.embed_dim, m.n_embed, groups=m.norm_groups, ndf=d.ndf,
            n_layers=d.n_layers).to(device)
        self.beta, self.device, self.reuse_xrec = m.beta, device, reuse_xrec
        self.disc, self.lpips = self.model.loss.discriminator, self.model.loss.perceptual_loss
        with torch.no_grad():  # taming's codebook init and LPIPS input scaling
            self.model.quantize.embedding.weight.uniform_(-1 / m.n_embed, 1 / m.n_embed)
            scaling = self.lpips.scaling_layer
            scaling.shift.copy_(torch.tensor([-.030, -.088, -.188]).reshape(1, 3, 1, 1))
            scaling.scale.copy_(torch.tensor([.458, .448, .450]).reshape(1, 3, 1, 1))
        self.lpips.eval().requires_grad_(False)
        self.g_params = [p for n, p in self.model.named_parameters() if not n.startswith("loss.")]
        adam = functools.partial(torch.optim.Adam, lr=state1.learning_rate(config),
                                 betas=(config.optimizer.b1, config.optimizer.b2))
        self.opt_ae, self.opt_disc = adam(self.g_params), adam(self.disc.parameters())
        self.autocast = functools.partial(torch.autocast, device, dtype=torch.bfloat16,
                                          enabled=dtype == "bfloat16")

    def _toggle(self, params):
        """Lightning's toggle_optimizer: only ``params`` require grad (LPIPS stays frozen)."""
        self.model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

    def forward(self, x):
        """VQModel.forward: x [B, 3, H, W] -> (xrec [B, 3, H, W], qloss [])."""
        z = self.model.quant_conv(self.model.encoder(x))                # [B, D, H/f, W/f]
        z_q, _ = self.model.quantize(z)
        qloss = (torch.mean((z_q.detach() - z) ** 2)                    # taming's legacy loss
                 + self.beta * torch.mean((z_q - z.detach()) ** 2))
        return self.model.decode(z + (z_q - z).detach()), qloss       # straight-through

    def step(self, x):
        """One batch; x [B, 3, H, W] in [-1, 1]. Returns (loss, d_loss, d_weight)."""
        L = self.loss
        self._toggle(self.g_params)                       # optimizer_idx 0: the generator
        with self.autocast():
            xrec, qloss = self.forward(x)
            rec = torch.abs(x - xrec)                     # + LPIPS [B, 1, 1, 1] if weighted
            if L.perceptual_weight > 0:
                rec = rec + L.perceptual_weight * lpips_distance(self.lpips, x, xrec)
            nll = torch.mean(rec)
            g_loss = -torch.mean(self.disc(xrec))
        last = self.model.decoder.conv_out.weight         # calculate_adaptive_weight
        nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach()
        d_weight = d_weight * L.disc_weight
        loss = nll + d_weight * L.disc_factor * g_loss + L.codebook_weight * qloss.mean()
        self.opt_ae.zero_grad()
        loss.backward()
        self.opt_ae.step()

        self._toggle(self.disc.parameters())              # optimizer_idx 1: the discriminator
        with self.autocast():
            if not self.reuse_xrec:                       # Lightning calls training_step again
                xrec, _ = self.forward(x)
            logits_real, logits_fake = self.disc(x.detach()), self.disc(xrec.detach())
            d_loss = L.disc_factor * 0.5 * (torch.mean(F.relu(1.0 - logits_real))
                                            + torch.mean(F.relu(1.0 + logits_fake)))
        self.opt_disc.zero_grad()
        d_loss.backward()
        self.opt_disc.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return loss.detach(), d_loss.detach(), d_weight
