"""The quantizer family: ``z_e -> (z_q, aux)`` with one interface, chosen by a config switch.

Kinds (``config.quantizer.kind``; :func:`quantizer_spec` reads the config):

* ``vq``: nearest-neighbour vector quantization with a learned codebook and the
  straight-through estimator (van den Oord et al. 2017, VQ-VAE); optional l2-normalized codes
  (Yu et al. 2021) and dead-code restart.
* ``ema_vq``: the same lookup, the codebook updated by exponential moving averages of the
  vectors assigned to each code, with Laplace smoothing (van den Oord et al. 2017, appendix A.1;
  Razavi et al. 2019) instead of by gradient.
* ``gumbel``: Gumbel-softmax VQ (Jang et al. 2017; taming-transformers' ``GumbelQuantize``,
  used by its f8 Gumbel model): logits over the codes, a hard one-hot sample forward, the
  relaxed sample's gradient backward, and a KL term to the uniform prior.
* ``fsq``: finite scalar quantization (Mentzer et al. 2023): each channel bounded and rounded
  to a few levels; the codebook is the product grid, no parameters.
* ``lfq``: lookup-free quantization (Yu et al. 2023, MAGVIT-v2): each channel's sign is a
  bit; the codebook is ``{-1, 1}^embed_dim``, no parameters.

Every quantizer has ``__call__(z_e, train=False, step=None) -> (z_q, aux)``, ``lookup(indices)
-> z_q`` and ``n_codes`` (the vocabulary size stage 2 sees, equal to ``n_embed``). aux always
holds ``indices`` (int32), the float32 scalars ``vq_loss`` (the total auxiliary loss, weighted by
``codebook_weight`` in the trainer), ``codebook_loss``, ``commitment_loss``, ``entropy_loss``,
``kl_loss`` (0.0 where a kind has no such term), ``perplexity`` and ``codebook_usage``, plus
the kind's own scalars.

Training-time state. Inference applies a tokenizer with ``{"params": g_params}`` only, so the
codebook is always a parameter. What is not a parameter (EMA cluster sizes and sums, the
steps each code has gone unused) lives in the mutable collection :data:`STATS`, which only the
trainer passes (``mutable=[STATS]``). When ``train=True`` and that collection is mutable, a
quantizer that replaces codebook rows outside the gradient (``ema_vq``, and ``vq`` with
``restart_unused_steps > 0``) returns in aux ``codebook_update`` (float32[n_embed, embed_dim])
and ``codebook_update_mask`` (bool[n_embed]); the trainer writes those rows into the codebook
parameter after its optimizer update. Random draws in training (Gumbel noise, restart samples)
come from the ``"quantizer"`` rng stream.
"""

import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

STATS = "quantizer_stats"   # the mutable collection of quantizer training state
RNG = "quantizer"           # the rng stream of Gumbel noise and restart samples
KINDS = ("vq", "ema_vq", "gumbel", "fsq", "lfq")
_HIGHEST = jax.lax.Precision.HIGHEST


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def _entropy(probs: jax.Array, axis: int = -1) -> jax.Array:
    """Entropy in nats of the distributions ``probs`` along ``axis``."""
    return -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10)), axis=axis)


def codebook_stats(indices: jax.Array, n_embed: int) -> tuple[jax.Array, jax.Array]:
    """Perplexity and usage of the codes in ``indices``.

    Args:
      indices: int32[...] code indices in [0, n_embed).
      n_embed: codebook size.

    Returns:
      ``(perplexity, usage)``, float32 scalars: exp of the entropy (nats) of the empirical code
      distribution, in [1, n_embed]; and the fraction of the n_embed codes used at least once,
      in (0, 1].
    """
    counts = jnp.zeros((n_embed,), jnp.float32).at[indices.reshape(-1)].add(1.0)
    probs = counts / jnp.maximum(counts.sum(), 1.0)
    perplexity = jnp.exp(-jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-10))))
    usage = jnp.mean((counts > 0).astype(jnp.float32))
    return perplexity, usage


def entropy_terms(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean per-sample entropy and batch entropy of ``softmax(logits)`` (nats, float32).

    The entropy penalty of MaskGIT's tokenizer (Chang et al. 2022) and MAGVIT-v2 (Yu et al.
    2023, eq. 5), ``L = E_z[H(q(z))] - gamma * H(E_z[q(z)])``: a small per-sample entropy makes
    each vector's assignment confident, a large batch entropy spreads the batch over the codes.

    Args:
      logits: float[..., K]; every leading position is one sample.

    Returns:
      ``(per_sample_entropy, batch_entropy)``, float32 scalars in [0, log K].
    """
    logits = logits.astype(jnp.float32).reshape(-1, logits.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1)
    per_sample = jnp.mean(-jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1))
    return per_sample, _entropy(jnp.mean(probs, axis=0))


def _aux(indices: jax.Array, n_codes: int, **terms: jax.Array) -> dict[str, jax.Array]:
    """The fixed aux dict: every standard loss term (0.0 if absent), vq_loss their sum."""
    zero = jnp.zeros((), jnp.float32)
    losses = {k: jnp.asarray(terms.pop(k, zero), jnp.float32)
              for k in ("codebook_loss", "commitment_loss", "entropy_loss", "kl_loss")}
    perplexity, usage = codebook_stats(indices, n_codes)
    return dict(indices=indices.astype(jnp.int32), vq_loss=sum(losses.values()), **losses,
                perplexity=perplexity, codebook_usage=usage,
                **{k: jnp.asarray(v, jnp.float32) for k, v in terms.items()})


def _check_channels(z_e: jax.Array, embed_dim: int) -> None:
    if z_e.shape[-1] != embed_dim:
        raise ValueError(f"z_e has {z_e.shape[-1]} channels; the quantizer expects "
                         f"embed_dim={embed_dim}.")


def _bad_restart(steps: int) -> None:
    raise ValueError(f"config.quantizer.restart_unused_steps={steps}: use 0 (off) or, with kind "
                     "vq or ema_vq, a positive number of steps.")


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """The settings of one quantizer kind (``config.quantizer`` less the other kinds' knobs):
    frozen and hashable (a model field), checked on construction (a ValueError naming the
    field). Built from a config by :func:`quantizer_spec`; :meth:`make` builds the module."""
    kind: ClassVar[str]

    def n_codes(self, n_embed: int, embed_dim: int) -> int:
        """The codebook size this kind has with ``config.model``'s n_embed and embed_dim."""
        return n_embed

    def make(self, n_embed: int, embed_dim: int, beta: float = 0.25, l2_normalize: bool = False,
             dtype: Dtype = jnp.float32, name: str | None = None) -> nn.Module:
        """The quantizer module of this kind: an unbound flax module with ``__call__(z_e,
        train=False, step=None) -> (z_q, aux)``, ``lookup(indices)`` and ``n_codes``.

        Args: ``config.model``'s n_embed (codebook size; for fsq and lfq it must equal the
        derived :meth:`n_codes`), embed_dim (for fsq, len(fsq_levels)), beta (commitment weight
        of vq, ema_vq, lfq) and l2_normalize (vq, ema_vq only); the dtype of z_q; a name.

        Raises:
          ValueError: l2_normalize with a kind that has no codebook to normalize, or an
            n_embed / embed_dim that disagrees with the kind.
        """
        if l2_normalize and self.kind in ("gumbel", "fsq", "lfq"):
            raise ValueError(f"config.model.l2_normalize_codes=True has no meaning for the "
                             f"{self.kind} quantizer; set it to False.")
        if isinstance(self, FSQSpec) and embed_dim != len(self.fsq_levels):
            raise ValueError(f"config.model.embed_dim={embed_dim} must equal "
                             f"len(config.quantizer.fsq_levels)={len(self.fsq_levels)}.")
        size = self.n_codes(n_embed, embed_dim)
        if n_embed != size:
            what = "prod(config.quantizer.fsq_levels)" if self.kind == "fsq" else "2 ** embed_dim"
            raise ValueError(f"config.model.n_embed={n_embed}, but the {self.kind} codebook has "
                             f"{what} = {size} codes; set config.model.n_embed={size}.")
        cls, common = _CLASSES[self.kind], dict(beta=beta, l2_normalize=l2_normalize)
        common = {k: v for k, v in common.items() if k in {f.name for f in dataclasses.fields(cls)}}
        return cls(n_embed=n_embed, embed_dim=embed_dim, dtype=dtype, spec=self, name=name,
                   **common)


@dataclasses.dataclass(frozen=True)
class _EntropySpec(QuantizerSpec):
    """The entropy loss of vq, ema_vq and lfq (off at weight 0): ``entropy_weight *
    (per_sample_entropy - entropy_gamma * batch_entropy)`` of the soft assignments
    ``softmax(-||z - e||^2 / entropy_temperature)`` (temperature > 0)."""
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    entropy_gamma: float = 1.0

    def __post_init__(self):
        if self.entropy_weight and self.entropy_temperature <= 0:
            raise ValueError(f"config.quantizer.entropy_temperature={self.entropy_temperature} "
                             "must be > 0.")


@dataclasses.dataclass(frozen=True)
class LFQSpec(_EntropySpec):
    """Kind ``lfq`` (:class:`LFQuantizer`): the entropy loss; ``n_codes = 2 ** embed_dim``."""
    kind: ClassVar[str] = "lfq"

    def n_codes(self, n_embed: int, embed_dim: int) -> int:
        return 2 ** embed_dim


@dataclasses.dataclass(frozen=True)
class VQSpec(_EntropySpec):
    """Kind ``vq`` (:class:`VectorQuantizer`): the entropy loss, and ``restart_unused_steps``:
    re-seed a code unchosen this many train steps (0: off)."""
    kind: ClassVar[str] = "vq"
    restart_unused_steps: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.restart_unused_steps < 0:
            _bad_restart(self.restart_unused_steps)


@dataclasses.dataclass(frozen=True)
class EMAVQSpec(VQSpec):
    """Kind ``ema_vq`` (:class:`EMAVectorQuantizer`): :class:`VQSpec`'s fields, the decay
    ``ema_decay`` in (0, 1) and the Laplace smoothing ``ema_epsilon`` > 0."""
    kind: ClassVar[str] = "ema_vq"
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.ema_decay < 1 and self.ema_epsilon > 0):
            raise ValueError(f"config.quantizer.ema_decay={self.ema_decay} must be in (0, 1) and "
                             f"config.quantizer.ema_epsilon={self.ema_epsilon} > 0.")


@dataclasses.dataclass(frozen=True)
class GumbelSpec(QuantizerSpec):
    """Kind ``gumbel`` (:class:`GumbelQuantizer`): temperatures ``gumbel_tau_start`` and
    ``gumbel_tau_end`` (> 0), the cosine's length ``gumbel_anneal_steps`` (0: tau_start
    throughout), the KL term's weight ``gumbel_kl_weight``."""
    kind: ClassVar[str] = "gumbel"
    gumbel_tau_start: float = 0.9
    gumbel_tau_end: float = 1e-6
    gumbel_anneal_steps: int = 1_000_001
    gumbel_kl_weight: float = 1e-8

    def __post_init__(self):
        if not (self.gumbel_tau_start > 0 and self.gumbel_tau_end > 0):
            raise ValueError(f"config.quantizer.gumbel_tau_start={self.gumbel_tau_start} and "
                             f"gumbel_tau_end={self.gumbel_tau_end} must be > 0.")


@dataclasses.dataclass(frozen=True)
class FSQSpec(QuantizerSpec):
    """Kind ``fsq`` (:class:`FSQuantizer`): ``fsq_levels``, levels per channel, each >= 2 with
    a product (``n_codes``) < 2**31, the int32 index range; the paper's (8, 5, 5, 5) has 1000
    codes. ``embed_dim`` must equal len(fsq_levels)."""
    kind: ClassVar[str] = "fsq"
    fsq_levels: tuple[int, ...] = (8, 5, 5, 5)

    def __post_init__(self):
        if min(self.fsq_levels, default=0) < 2 or math.prod(self.fsq_levels) >= 2 ** 31:
            raise ValueError(f"config.quantizer.fsq_levels={self.fsq_levels}: every level must be "
                             ">= 2 and their product (the codebook size) < 2**31, the int32 index "
                             "range.")

    def n_codes(self, n_embed: int, embed_dim: int) -> int:
        return math.prod(self.fsq_levels)


class _Quantizer(nn.Module):
    """The fields every kind has: ``n_embed`` (codebook size K), ``embed_dim`` (code dimension
    D), ``dtype`` (of z_q; distances and losses are float32); each kind adds ``spec``."""
    n_embed: int
    embed_dim: int
    dtype: Dtype = jnp.float32

    @property
    def n_codes(self) -> int:
        """Vocabulary size (what stage 2 sees): ``spec.n_codes(n_embed, embed_dim)``."""
        return self.spec.n_codes(self.n_embed, self.embed_dim)


class VectorQuantizer(_Quantizer):
    """Nearest-neighbour vector quantizer with the straight-through estimator.

    Implements van den Oord et al. 2017, eq. 3 (as used by Esser et al. 2021, eq. 4)::

        L_VQ = ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2

    The first (codebook) term moves the codebook toward the encoder outputs, the second
    (commitment) term, weighted by ``beta``, moves the encoder toward its codes. Both are
    means over all elements. (taming-transformers' legacy ``VectorQuantizer2`` puts beta on the
    codebook term instead; we follow the paper.)

    Optional, both off by default:

    * entropy loss (``entropy_weight > 0``): :func:`entropy_terms` of the soft assignments
      ``softmax(-||z - e_k||^2 / entropy_temperature)``, added to vq_loss as
      ``entropy_weight * (per_sample_entropy - entropy_gamma * batch_entropy)``.
    * dead-code restart (``restart_unused_steps = N > 0``, training only): a code no vector
      chose for N consecutive train steps is re-seeded with an encoder output of the current
      batch drawn uniformly at random (Dhariwal et al. 2020, Jukebox, sec. 2.3 / Zeghidour et
      al. 2021, SoundStream, sec. 3.3); its counter restarts at 0.

    Attributes (besides n_embed >= 2, embed_dim, dtype):
      beta: commitment weight (0.25 in the papers).
      l2_normalize: if True, both z_e and the codebook are l2-normalized before the lookup
        (Yu et al. 2021, sec. 3.2); this keeps low-dimensional codebooks alive.
      spec: :class:`VQSpec`: restart_unused_steps (N above; 0 turns restarts off) and
        entropy_weight, entropy_temperature, entropy_gamma (the entropy loss above).
    """
    beta: float = 0.25
    l2_normalize: bool = False
    spec: VQSpec = VQSpec()

    uses_ema = False  # class constant (not a field): EMAVectorQuantizer sets it

    def setup(self):
        # taming: nn.Embedding initialised U(-1/K, 1/K).
        limit = 1.0 / self.n_embed
        init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -limit, limit)
        self.codebook = self.param(
            "codebook", nn.with_logical_partitioning(init, ("codebook_n", "codebook_d")),
            (self.n_embed, self.embed_dim), jnp.float32)
        if self.is_mutable_collection(STATS):
            self._declare_stats()

    def _declare_stats(self) -> None:
        """Declare the :data:`STATS` variables (called from setup while STATS is mutable).

        ``unused_steps``: int32[n_embed], consecutive train steps each code went unchosen
        (only with restart_unused_steps > 0).
        """
        if self.spec.restart_unused_steps > 0:
            self.unused_steps = self.variable(STATS, "unused_steps", jnp.zeros,
                                              (self.n_embed,), jnp.int32)

    @property
    def _has_stats(self) -> bool:
        return self.uses_ema or self.spec.restart_unused_steps > 0

    def embeddings(self) -> jax.Array:
        """The codebook as used for lookup: float32[n_embed, embed_dim]."""
        codebook = jnp.asarray(self.codebook, jnp.float32)
        return _l2_normalize(codebook) if self.l2_normalize else codebook

    def __call__(self, z_e: jax.Array, train: bool = False, step: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Quantize.

        Args:
          z_e: float[..., embed_dim], e.g. [B, h, w, D], the encoder output after quant_conv.
          train: training mode: updates the :data:`STATS` collection when it is mutable
            (restart needs the ``"quantizer"`` rng then).
          step: unused (the interface's train step).

        Returns:
          ``(z_q, aux)``: z_q has z_e's shape and ``self.dtype``, equal in value to the chosen
          codes and in gradient to z_e (straight-through; through the normalization when
          l2_normalize). aux holds ``indices`` (int32[...]), ``codebook_loss`` and
          ``commitment_loss`` (float32 scalars, the second already multiplied by beta),
          ``entropy_loss``, ``kl_loss`` (0), ``vq_loss`` (their sum), ``perplexity`` and
          ``codebook_usage`` over the batch (see :func:`codebook_stats`),
          ``per_sample_entropy`` and ``batch_entropy`` (nats; 0 when entropy_weight is 0),
          ``restarted_codes`` (codes re-seeded this step); and in a training step that
          updates the codebook, ``codebook_update``/``codebook_update_mask`` (module doc).

        Raises:
          ValueError: if z_e's last dimension is not embed_dim.
        """
        _check_channels(z_e, self.embed_dim)
        z = z_e.astype(jnp.float32)
        if self.l2_normalize:
            z = _l2_normalize(z)
        codebook = self.embeddings()
        if self.uses_ema:  # the EMA, not the gradient, moves the codebook
            codebook = jax.lax.stop_gradient(codebook)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, in float32 at full matmul precision.
        dots = jnp.einsum("...d,kd->...k", z, codebook, precision=_HIGHEST)
        distances = (jnp.sum(z * z, axis=-1, keepdims=True) - 2.0 * dots
                     + jnp.sum(codebook * codebook, axis=-1))
        indices = jnp.argmin(distances, axis=-1).astype(jnp.int32)
        e = jnp.take(codebook, indices, axis=0)
        terms = dict(commitment_loss=self.beta * jnp.mean((z - jax.lax.stop_gradient(e)) ** 2))
        if not self.uses_ema:
            terms["codebook_loss"] = jnp.mean((jax.lax.stop_gradient(z) - e) ** 2)
        per_sample = batch = jnp.zeros((), jnp.float32)
        if self.spec.entropy_weight > 0:
            per_sample, batch = entropy_terms(-distances / self.spec.entropy_temperature)
            terms["entropy_loss"] = self.spec.entropy_weight * (
                per_sample - self.spec.entropy_gamma * batch)
        z_q = z + jax.lax.stop_gradient(e - z)

        update = {}
        restarted = jnp.zeros((), jnp.float32)
        if train and self._has_stats and self.is_mutable_collection(STATS):
            update, restarted = self._update_stats(jax.lax.stop_gradient(z), indices)
        aux = _aux(indices, self.n_embed, **terms, per_sample_entropy=per_sample,
                   batch_entropy=batch, restarted_codes=restarted)
        return z_q.astype(self.dtype), dict(aux, **update)

    def _ema_update(self, flat_z: jax.Array, flat_idx: jax.Array, counts: jax.Array
                    ) -> jax.Array:  # EMAVectorQuantizer's; plain VQ has no EMA
        raise NotImplementedError

    def _update_stats(self, z: jax.Array, indices: jax.Array
                      ) -> tuple[dict[str, jax.Array], jax.Array]:
        """Advance the STATS variables by one train step; the codebook rows to write."""
        flat_z = z.reshape(-1, self.embed_dim)
        flat_idx = indices.reshape(-1)
        counts = jnp.zeros((self.n_embed,), jnp.float32).at[flat_idx].add(1.0)
        if self.uses_ema:
            new_codebook = self._ema_update(flat_z, flat_idx, counts)
            mask = jnp.ones((self.n_embed,), bool)
        else:
            new_codebook = jnp.zeros((self.n_embed, self.embed_dim), jnp.float32)
            mask = jnp.zeros((self.n_embed,), bool)
        restarted = jnp.zeros((), jnp.float32)
        if self.spec.restart_unused_steps > 0:
            unused = jnp.where(counts > 0, 0, self.unused_steps.value + 1)
            dead = unused >= self.spec.restart_unused_steps
            picks = jax.random.randint(self.make_rng(RNG), (self.n_embed,), 0, flat_z.shape[0])
            samples = jnp.take(flat_z, picks, axis=0)
            new_codebook = jnp.where(dead[:, None], samples, new_codebook)
            mask = mask | dead
            self.unused_steps.value = jnp.where(dead, 0, unused).astype(jnp.int32)
            if self.uses_ema:  # a re-seeded code starts as one vector's worth of statistics
                self.cluster_size.value = jnp.where(dead, 1.0, self.cluster_size.value)
                self.embed_sum.value = jnp.where(dead[:, None], samples, self.embed_sum.value)
            restarted = jnp.sum(dead.astype(jnp.float32))
        return dict(codebook_update=new_codebook, codebook_update_mask=mask), restarted

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for ``indices``: int[...] in [0, n_embed) -> self.dtype[..., embed_dim]."""
        return jnp.take(self.embeddings(), indices, axis=0).astype(self.dtype)


class EMAVectorQuantizer(VectorQuantizer):
    """:class:`VectorQuantizer` whose codebook follows exponential moving averages.

    van den Oord et al. 2017, appendix A.1 (eq. 6-8), with the Laplace smoothing of the
    cluster sizes used by Sonnet's VQ-VAE-EMA. Per train step, with n_k the number of batch
    vectors assigned to code k, s_k their sum, n = sum_k n_k, decay d, epsilon eps::

        N_k <- d N_k + (1 - d) n_k           m_k <- d m_k + (1 - d) s_k
        N~_k = (N_k + eps) / (sum_j N_j + K eps) * sum_j N_j       (Laplace smoothing)
        e_k <- m_k / N~_k

    N (``cluster_size``, float32[K]) and m (``embed_sum``, float32[K, D]) live in
    :data:`STATS`, initialised to 1 and to the initial codebook (so a code never chosen keeps
    its value, shrinking by d^t / N~_k ~ 1, instead of collapsing to 0). The codebook gets no
    gradient (codebook_loss is 0); the trainer writes e into the parameter. With l2_normalize
    the averages are of normalized vectors, and lookups normalize e. Restarted codes (if
    restart_unused_steps > 0) reset to N_k = 1, m_k = the sample.

    Attributes: :class:`VectorQuantizer`'s, with ``spec`` an :class:`EMAVQSpec` (ema_decay: d
    in (0, 1), 0.99 in van den Oord et al.; ema_epsilon: eps > 0 of the smoothing, 1e-5).
    """
    spec: EMAVQSpec = EMAVQSpec()

    uses_ema = True

    def _declare_stats(self) -> None:
        """As :meth:`VectorQuantizer._declare_stats`, plus ``cluster_size`` float32[K] (ones) and
        ``embed_sum`` float32[K, D] (the codebook parameter's value)."""
        super()._declare_stats()
        self.cluster_size = self.variable(STATS, "cluster_size", jnp.ones,
                                          (self.n_embed,), jnp.float32)
        self.embed_sum = self.variable(STATS, "embed_sum",
                                       lambda: jnp.array(self.codebook, jnp.float32, copy=True))

    def _ema_update(self, flat_z: jax.Array, flat_idx: jax.Array, counts: jax.Array) -> jax.Array:
        d, eps, k = self.spec.ema_decay, self.spec.ema_epsilon, self.n_embed
        sums = jnp.zeros((k, self.embed_dim), jnp.float32).at[flat_idx].add(flat_z)
        cluster_size = d * self.cluster_size.value + (1.0 - d) * counts
        embed_sum = d * self.embed_sum.value + (1.0 - d) * sums
        self.cluster_size.value, self.embed_sum.value = cluster_size, embed_sum
        total = jnp.sum(cluster_size)
        smoothed = (cluster_size + eps) / (total + k * eps) * total
        return embed_sum / smoothed[:, None]


class GumbelQuantizer(_Quantizer):
    """Gumbel-softmax VQ (Jang et al. 2017; taming-transformers' ``GumbelQuantize``).

    A 1x1 projection (``proj``, Dense embed_dim -> n_embed) gives logits l over the codes. In
    training, y = softmax((l + g) / tau) with Gumbel noise g (rng stream ``"quantizer"``); the
    forward pass uses the hard one-hot of argmax y and the backward pass the gradient of y
    (straight-through Gumbel-softmax, Jang et al. 2017 sec. 2.2), so
    ``z_q = (onehot + y - sg[y]) @ codebook``. The temperature tau follows a cosine from
    ``gumbel_tau_start`` at step 0 to ``gumbel_tau_end`` at ``gumbel_anneal_steps`` (taming's
    ``LambdaWarmUpCosineScheduler`` without warm-up). Outside training the code is the argmax of
    l, deterministically (taming still samples noise there). Loss (taming)::

        kl_loss = gumbel_kl_weight * mean_positions sum_k q_k log(q_k K),   q = softmax(l)

    i.e. KL(q || uniform); vq_loss = kl_loss.

    Attributes: n_embed (K), embed_dim (D), dtype (of z_q; logits and losses are float32),
    spec (:class:`GumbelSpec`: the temperatures, the cosine's steps, the KL weight).
    """
    spec: GumbelSpec = GumbelSpec()

    def setup(self):
        # torch nn.Embedding's N(0, 1), as taming's GumbelQuantize leaves it.
        self.codebook = self.param(
            "codebook", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                     ("codebook_n", "codebook_d")),
            (self.n_embed, self.embed_dim), jnp.float32)
        self.proj = nn.Dense(self.n_embed, dtype=jnp.float32, name="proj")

    def temperature(self, step: jax.Array | None) -> jax.Array:
        """tau at train step ``step`` (float32 scalar); tau_start when step is None."""
        if step is None or self.spec.gumbel_anneal_steps <= 0:
            return jnp.asarray(self.spec.gumbel_tau_start, jnp.float32)
        t = jnp.minimum(jnp.asarray(step, jnp.float32) / self.spec.gumbel_anneal_steps, 1.0)
        lo, hi = self.spec.gumbel_tau_end, self.spec.gumbel_tau_start
        return lo + 0.5 * (hi - lo) * (1.0 + jnp.cos(jnp.pi * t))

    def __call__(self, z_e: jax.Array, train: bool = False, step: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Quantize.

        Args:
          z_e: float[..., embed_dim].
          train: sample (needs the ``"quantizer"`` rng) instead of taking the argmax.
          step: int32 scalar train step, for the temperature (None: gumbel_tau_start).

        Returns:
          ``(z_q, aux)``: z_q self.dtype[..., embed_dim], exactly codebook rows; aux as
          :class:`VectorQuantizer`'s standard keys (``kl_loss`` the only nonzero loss) plus
          ``temperature``.

        Raises:
          ValueError: if z_e's last dimension is not embed_dim.
        """
        _check_channels(z_e, self.embed_dim)
        logits = self.proj(z_e.astype(jnp.float32))
        tau = self.temperature(step)
        if train:
            one_hot, indices = gumbel_softmax_st(logits, self.make_rng(RNG), tau)
            z_q = jnp.einsum("...k,kd->...d", one_hot, self.codebook, precision=_HIGHEST)
        else:
            indices = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            z_q = jnp.take(self.codebook, indices, axis=0)
        q = jax.nn.softmax(logits, axis=-1)
        kl = self.spec.gumbel_kl_weight * jnp.mean(
            jnp.sum(q * jnp.log(q * self.n_embed + 1e-10), axis=-1))
        return z_q.astype(self.dtype), _aux(indices, self.n_embed, kl_loss=kl, temperature=tau)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for ``indices``: int[...] in [0, n_embed) -> self.dtype[..., embed_dim]."""
        return jnp.take(self.codebook, indices, axis=0).astype(self.dtype)


def gumbel_softmax_st(logits: jax.Array, key: jax.Array, tau: jax.Array | float
                      ) -> tuple[jax.Array, jax.Array]:
    """Straight-through Gumbel-softmax sample (Jang et al. 2017, sec. 2.2).

    Args:
      logits: float[..., K].
      key: PRNG key of the Gumbel noise g ~ Gumbel(0, 1), shaped like logits.
      tau: temperature > 0.

    Returns:
      ``(one_hot, indices)``: float32[..., K] equal in value to the one-hot of
      ``indices = argmax(logits + g)`` (int32[...]) and in gradient to
      ``y = softmax((logits + g) / tau)``.
    """
    logits = logits.astype(jnp.float32)
    noisy = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
    y = jax.nn.softmax(noisy / tau, axis=-1)
    indices = jnp.argmax(noisy, axis=-1).astype(jnp.int32)
    hard = jax.nn.one_hot(indices, logits.shape[-1], dtype=jnp.float32)
    return hard + y - jax.lax.stop_gradient(y), indices


class FSQuantizer(_Quantizer):
    """Finite scalar quantization (Mentzer et al. 2023, sec. 3; their reference code).

    Channel i (of D = len(fsq_levels)) with L_i levels is bounded and rounded as in the
    paper's reference code (appendix A.1)::

        half_l = (L_i - 1)(1 - 1e-3) / 2,   offset = 0.5 if L_i even else 0
        z_b = tanh(z + tan(offset / half_l)) * half_l - offset
        z_q = round_ste(z_b) / (L_i // 2)

    Since half_l < (L_i - 1) / 2, z_b lies strictly inside [-(L_i - 1) / 2 - offset,
    (L_i - 1) / 2 - offset], whose ends are integers, so round(z_b) is always one of the L_i
    grid values ``(j - L_i // 2) / (L_i // 2)``, j in [0, L_i), in
    [-1, 1] (for even L_i the grid is -L_i/2 .. L_i/2 - 1, over L_i // 2). z = 0 lands on the
    level 0 (odd L_i: exactly; even L_i: z_b is just below 0). For L_i = 2 and z ~ N(0, 1) the
    level -1 is taken with probability Phi(-tan(1/0.999)) = 5.9%. Gradients pass straight
    through the rounding: dz_q/dz = half_l (1 - tanh^2(z + shift)) / (L_i // 2). The codebook
    is the grid, ``n_codes = prod(fsq_levels)``; index = sum_i j_i prod_{l<i} L_l (channel 0
    least significant). No parameters, no losses (all aux losses 0).

    Attributes: n_embed (= prod(fsq_levels)), embed_dim (= len(fsq_levels)), dtype (of z_q),
    spec (:class:`FSQSpec`: fsq_levels, the levels per channel).
    """
    spec: FSQSpec = FSQSpec()

    def _levels(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        fsq_levels = self.spec.fsq_levels
        levels = jnp.asarray(fsq_levels, jnp.int32)
        basis = jnp.asarray([math.prod(fsq_levels[:i]) for i in range(len(fsq_levels))], jnp.int32)
        return levels, levels // 2, basis

    def __call__(self, z_e: jax.Array, train: bool = False, step: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Quantize ``z_e: float[..., embed_dim]`` -> ``(z_q, aux)``, z_q on the level grid in
        [-1, 1] (self.dtype); aux with the standard keys (losses 0). train, step: unused.

        Raises:
          ValueError: if z_e's last dimension is not embed_dim.
        """
        _check_channels(z_e, self.embed_dim)
        levels, half_width, basis = self._levels()
        z = z_e.astype(jnp.float32)
        half_l = (levels - 1).astype(jnp.float32) * (1.0 - 1e-3) / 2.0
        offset = jnp.where(levels % 2 == 0, 0.5, 0.0)
        bounded = jnp.tanh(z + jnp.tan(offset / half_l)) * half_l - offset
        rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
        z_q = rounded / half_width
        indices = self.codes_to_indices(jax.lax.stop_gradient(z_q))
        return z_q.astype(self.dtype), _aux(indices, self.n_codes)

    def codes_to_indices(self, codes: jax.Array) -> jax.Array:
        """Inverse of :meth:`lookup`: float[..., D] on the level grid -> int32[...]."""
        levels, half_width, basis = self._levels()
        digits = jnp.round(codes.astype(jnp.float32) * half_width).astype(jnp.int32) + half_width
        return jnp.sum(digits * basis, axis=-1).astype(jnp.int32)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for ``indices``: int[...] in [0, prod(fsq_levels)) -> self.dtype[..., D] in
        [-1, 1]."""
        levels, half_width, basis = self._levels()
        digits = (jnp.asarray(indices, jnp.int32)[..., None] // basis) % levels
        return ((digits - half_width) / half_width).astype(self.dtype)


class LFQuantizer(_Quantizer):
    """Lookup-free quantization (Yu et al. 2023, MAGVIT-v2, sec. 3.1).

    Each channel becomes one bit: ``z_q = sign(z)`` in {-1, 1}^D (0 maps to -1), with the
    straight-through gradient ``dz_q/dz = 1``; index = sum_i [z_i > 0] 2^(D-1-i) (channel 0 the
    most significant bit), so ``n_codes = 2 ** embed_dim``. Losses::

        commitment_loss = beta * mean (z - sg[z_q])^2
        entropy_loss = entropy_weight * (E_z[H(q(z))] - entropy_gamma * H(E_z[q(z)]))  (eq. 5)
        q(c | z) = softmax_c(-||z - c||^2 / entropy_temperature)  over c in {-1, 1}^D

    q factorizes over channels (q(c_i = 1 | z_i) = sigmoid(4 z_i / T)), so the per-sample
    entropy is a sum of D binary entropies; the batch entropy H(E_z[q]) is computed exactly
    over all 2^D codes, which costs float32[N, 2^D] memory for N vectors (computed only when
    entropy_weight > 0; keep embed_dim <= ~14 with the entropy loss on).

    Attributes: n_embed (= 2 ** embed_dim), embed_dim (D, the bits per code), dtype (of z_q;
    losses are float32), beta (commitment weight), spec (:class:`LFQSpec`: entropy_weight,
    entropy_temperature, entropy_gamma as above; MAGVIT-v2: 0.1, -, 1).
    """
    beta: float = 0.25
    spec: LFQSpec = LFQSpec()

    def _bits(self) -> jax.Array:
        """int32[D] place values, most significant first."""
        return 2 ** jnp.arange(self.embed_dim - 1, -1, -1, dtype=jnp.int32)

    def entropy_terms(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(per_sample_entropy, batch_entropy)`` in nats of q(c | z) for z float[..., D]."""
        z = z.astype(jnp.float32).reshape(-1, self.embed_dim)
        logit = 4.0 * z / self.spec.entropy_temperature           # log q(1|z_i) - log q(-1|z_i)
        log_p, log_m = jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)
        per_sample = jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p + jnp.exp(log_m) * log_m, -1))
        codes = ((jnp.arange(self.n_codes)[:, None] // self._bits()) % 2).astype(jnp.float32)
        log_q = (jnp.einsum("nd,kd->nk", log_p, codes, precision=_HIGHEST)
                 + jnp.einsum("nd,kd->nk", log_m, 1.0 - codes, precision=_HIGHEST))
        return per_sample, _entropy(jnp.mean(jnp.exp(log_q), axis=0))

    def __call__(self, z_e: jax.Array, train: bool = False, step: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Quantize ``z_e: float[..., embed_dim]`` -> ``(z_q, aux)``: z_q in {-1, 1}
        (self.dtype); aux with the standard keys plus ``per_sample_entropy`` and
        ``batch_entropy`` (nats; 0 when entropy_weight is 0). train, step: unused.

        Raises:
          ValueError: if z_e's last dimension is not embed_dim.
        """
        _check_channels(z_e, self.embed_dim)
        z = z_e.astype(jnp.float32)
        positive = z > 0
        codes = jnp.where(positive, 1.0, -1.0)
        z_q = z + jax.lax.stop_gradient(codes - z)
        indices = jnp.sum(positive.astype(jnp.int32) * self._bits(), axis=-1)
        terms = dict(commitment_loss=self.beta * jnp.mean((z - codes) ** 2))
        per_sample = batch = jnp.zeros((), jnp.float32)
        if self.spec.entropy_weight > 0:
            per_sample, batch = self.entropy_terms(z)
            terms["entropy_loss"] = self.spec.entropy_weight * (
                per_sample - self.spec.entropy_gamma * batch)
        return z_q.astype(self.dtype), _aux(indices, self.n_codes, **terms,
                                            per_sample_entropy=per_sample, batch_entropy=batch)

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes for ``indices``: int[...] in [0, 2**D) -> self.dtype[..., D] in {-1, 1}."""
        bits = (jnp.asarray(indices, jnp.int32)[..., None] // self._bits()) % 2
        return (2.0 * bits - 1.0).astype(self.dtype)


_CLASSES = {"vq": VectorQuantizer, "ema_vq": EMAVectorQuantizer, "gumbel": GumbelQuantizer,
            "fsq": FSQuantizer, "lfq": LFQuantizer}
SPECS = {"vq": VQSpec, "ema_vq": EMAVQSpec, "gumbel": GumbelSpec, "fsq": FSQSpec, "lfq": LFQSpec}


def quantizer_spec(quantizer: Any = None) -> QuantizerSpec:
    """The typed spec of ``config.quantizer``: the one place a quantizer config is read.

    Args:
      quantizer: ``config.quantizer`` (a ConfigDict or a mapping): ``kind`` (default "vq")
        and knobs of every kind (those of other kinds are ignored); None (a config written
        before quantizers were selectable) is plain VQ. Lists (JSON) become tuples.

    Raises:
      ValueError: for an unknown kind or knob name, restart_unused_steps with a kind that
        has no restarts, or a value the kind's spec rejects (each names the field).
    """
    items = {} if quantizer is None else dict(
        quantizer.to_dict() if hasattr(quantizer, "to_dict") else quantizer)
    kind = items.pop("kind", "vq")
    if kind not in SPECS:
        raise ValueError(f"config.quantizer.kind={kind!r} is not a quantizer; use one of "
                         f"{list(KINDS)}.")
    knobs = {f.name for spec in SPECS.values() for f in dataclasses.fields(spec)}
    if set(items) - knobs:
        raise ValueError(f"unknown config.quantizer field(s) {sorted(set(items) - knobs)}; the "
                         f"quantizers take {sorted(knobs)}.")
    if items.get("restart_unused_steps", 0) and kind not in ("vq", "ema_vq"):
        _bad_restart(items["restart_unused_steps"])
    cls = SPECS[kind]
    return cls(**{f.name: tuple(items[f.name]) if isinstance(items[f.name], list)
                  else items[f.name] for f in dataclasses.fields(cls) if f.name in items})

