"""The pre-norm transformer block shared by both towers and the prompter.

Math is Hugging Face `CLIPEncoderLayer` exactly (so the adapters map weights 1:1):
    x = x + out(attn(ln1(x)));  x = x + fc2(act(fc1(ln2(x))))
with attention scale Dh**-0.5, unmasked for vision and causal for text.

Speed choices (XLA CPU, where a plain Flax CLIP lost to PyTorch in the backward pass):
- one fused QKV matmul `[D, 3D]` (q, k, v concatenated along the output axis, heads
  contiguous inside each) instead of three, so the backward is one large GEMM too;
- q, k, v are moved once to `[B, H, T, Dh]` so both attention matmuls are plain batched
  GEMMs with leading batch dims (XLA CPU otherwise inserts a transpose per operand per
  matmul, in forward and again in backward);
- the softmax runs in float32 whatever the compute dtype (logits accumulate in f32).
- every Dense runs as a plain 2-D GEMM on [(B*T), D] (`dense_2d`): XLA CPU's gradient of
  the 3-D dot_general was ~1.5x slower;
- LayerNorm (`layer_norm`) and the attention core (`attention_core`) have hand-written
  backwards whose row reductions are materialised (`optimization_barrier`): XLA CPU fused
  them into their elementwise consumers and recomputed them per element;
- exact GELU is written out with `lax.erf` (4x faster forward than `jax.nn.gelu` on CPU);
- XLA CPU runs a dot whose LHS contracts its row axis (weight gradients x^T dy, attention's
  p^T dy and ds^T q) as a generic thunk at ~half its GEMM speed: the core's dk/dv for
  T <= 128 (`_transposed_grad`) and the weight gradient of in > out Dense layers
  (`narrowing_linear`) are computed from a materialised transpose instead;
- the text tower's last block computes q, scores and `out` at the pooled row only
  (`Attention.at_rows`), and the prompter's image prefix is never projected to keys and
  values (`flops.absorb_prefix`).
These backwards are XLA CPU tuning. On other backends (`cpu_kernels()`), the same functions
run through plain autodiff and flax's Dense. On an H100 that made no measurable difference
(ViT-B/16 bf16 step, 138.0 vs 137.1 ms; docs/benchmarks.md, "Encoder training step: MFU").
They are off there anyway: their barriers and materialised transposes only constrain XLA
GPU, whose cuBLAS calls read transposed operands for free. Off CPU, the position
embeddings' gradient is a GEMV (`add_positions`), which was measured to help.
`attention_impl='dot_product'` swaps in `jax.nn.dot_product_attention` (XLA's composition).
'cudnn' does the same with cuDNN's fused flash-attention kernel (CUDA GPUs, bf16/f16 only).
'auto' (the default) picks 'cudnn' where that kernel runs (`resolve_attention`) and
'einsum' otherwise. 'einsum_bthd' is the stock Flax [B, T, H, Dh] layout, kept for
comparison (scripts/bench/bench_encoder_attention.py).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clocmllm.encoder.flops import absorb_prefix

Dtype = jnp.dtype


def cpu_kernels() -> bool:
    """Whether to trace the XLA-CPU-tuned backwards (custom VJPs, barriers, transposes).

    Decided at trace time from `jax.default_backend()`. This is the backend of the trainer's
    jitted steps; a `jit(..., backend=...)` or an explicit placement on another backend is
    not seen. The environment variable CLOCMLLM_KERNELS=cpu|generic forces one side, so
    benchmarks can compare both. `cpu` also puts back the plain reduce for the position
    embeddings' gradient (`add_positions`). Both sides compute the same function; only the
    gradient's program differs. Read only by the kernels that have a CPU form
    (`layer_norm`, `narrowing_linear`, `attention_core`, `add_positions`): each picks its
    own, so modules call them without a backend test.
    """
    forced = os.environ.get("CLOCMLLM_KERNELS", "auto")
    if forced not in ("auto", "cpu", "generic"):
        raise ValueError(f"CLOCMLLM_KERNELS={forced!r}: expected auto, cpu or generic")
    return forced == "cpu" or (forced == "auto" and jax.default_backend() == "cpu")


def add_positions(x: jax.Array, pos: jax.Array) -> jax.Array:
    """x [B, T, D] + pos [T, D] (position embeddings), in x's dtype.

    Off CPU the gradient of `pos` is a GEMV (ones[B] @ dy) instead of a reduce over the batch
    axis: XLA GPU's layout assignment gave that reduce a batch-minor operand layout and
    propagated it up the whole residual stream ([T, D, B]: a transpose into and out of every
    GEMM and strided LayerNorm reductions in the ViT-B/16 step's profile).
    """
    if cpu_kernels():
        return x + pos.astype(x.dtype)
    return _add_positions_gemv(x, pos)


@jax.custom_vjp
def _add_positions_gemv(x: jax.Array, pos: jax.Array) -> jax.Array:
    return x + pos.astype(x.dtype)


def _add_positions_fwd(x, pos):
    return x + pos.astype(x.dtype), pos


def _add_positions_bwd(pos, dy):
    # the barrier keeps XLA from folding dot(ones, dy) back into a reduce
    ones = jax.lax.optimization_barrier(jnp.ones((dy.shape[0],), dy.dtype))
    dpos = jnp.einsum("b,btd->td", ones, dy, preferred_element_type=jnp.float32)
    return dy, dpos.astype(pos.dtype)


_add_positions_gemv.defvjp(_add_positions_fwd, _add_positions_bwd)


def resolve_attention(impl: str, dtype: Dtype, head_dim: int) -> str:
    """'auto' -> 'cudnn' where cuDNN's flash kernel runs, 'einsum' otherwise.

    cuDNN's flash kernel needs all of: a CUDA GPU of compute capability 8.0 or later (ROCm
    also reports backend 'gpu'; older cards have no flash kernel), bf16 or f16, and a head
    dim that is a multiple of 8 and at most 128. 128 is the limit on every generation.
    Any other value is returned as is. An explicit 'cudnn' that cuDNN refuses fails with
    cuDNN's message.
    """
    if impl != "auto":
        return impl
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    flash_head = head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if half and flash_head and cuda_flash_gpu() else "einsum"


def cuda_flash_gpu() -> bool:
    """Whether JAX's default device is a CUDA GPU with compute capability >= 8.0 (Ampere+)."""
    if jax.default_backend() != "gpu":
        return False
    device = jax.devices()[0]
    if "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return False
    try:
        return float(getattr(device, "compute_capability", "0")) >= 8.0
    except ValueError:
        return False


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU (HF `quick_gelu`)."""
    return x * jax.nn.sigmoid(1.702 * x)


_INV_SQRT2 = 0.7071067811865476


def exact_gelu(x: jax.Array) -> jax.Array:
    """erf GELU, HF `gelu` (OpenCLIP ViT-H/14): 0.5 x (1 + erf(x / sqrt 2)).

    Written out instead of `jax.nn.gelu(approximate=False)`: same function, but on XLA CPU
    the written-out form's forward ran 4x faster at ViT-S/16 MLP sizes (11.6 vs 46 ms for
    [32*197, 1536], one thread; docs/benchmarks.md "where the CPU time goes").
    """
    return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(_INV_SQRT2, x.dtype)))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": exact_gelu,
}


def normal(std: float) -> Callable:
    return nn.initializers.normal(stddev=std)


def dense_2d(layer: nn.Module, x: jax.Array) -> jax.Array:
    """Apply a Dense layer to x [..., D] as one plain 2-D GEMM [(prod ...), D] x [D, F].

    Same params and result as `layer(x)`; but XLA CPU runs the gradient of a [B, T, D] x
    [D, F] dot_general ~1.5x slower than that of the same dot on a 2-D reshaped operand
    (327 vs 211 ms fwd+bwd at [32, 197, 384] x [384, 1536], one thread): the 3-D form's
    weight gradient contracts two axes and misses the fast GEMM path.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > layer.features and layer.use_bias and not layer.is_initializing():
        # the bias is added outside: its gradient (a row sum) stays autodiff's
        p = layer.variables["params"]
        dt = layer.dtype or x.dtype
        y = narrowing_linear(x2.astype(dt), p["kernel"].astype(dt)) + p["bias"].astype(dt)
    else:
        y = layer(x2)
    return y.reshape(*lead, y.shape[-1])


def narrowing_linear(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [N, I] @ kernel [I, O] for I > O (MLP fc2, patch embedding): on CPU with the
    hand-written weight gradient of `_narrowing_linear_cpu`, elsewhere a plain dot."""
    return _narrowing_linear_cpu(x, kernel) if cpu_kernels() else jnp.dot(x, kernel)


@jax.custom_vjp
def _narrowing_linear_cpu(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x @ kernel with the weight gradient computed as (dy^T x)^T on a materialised dy^T [O, N].

    The plain weight gradient x^T dy contracts the row axis of both operands; XLA CPU runs
    it as a generic `dot` thunk at about half the speed of its YNNPACK GEMMs. Fenced by
    `optimization_barrier` (else XLA folds the transposes back into the dot), the canonical
    form ran faster whenever I > O: [4160, 256] -> 64 2.1 -> 1.4 ms, [6304, 1536] -> 384
    65 -> 58 ms; for I <= O it was slower, so those layers keep flax's Dense. Same forward.
    """
    return jnp.dot(x, kernel)


def _narrowing_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _narrowing_bwd(res, dy):
    x, kernel = res
    bar = jax.lax.optimization_barrier
    dkernel = bar(bar(dy.T) @ x).T
    return dy @ kernel.T, dkernel


_narrowing_linear_cpu.defvjp(_narrowing_fwd, _narrowing_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32: on CPU with the hand-written
    backward of `_layer_norm_cpu`, elsewhere autodiff through the same forward."""
    return _layer_norm_cpu(x, scale, bias, eps) if cpu_kernels() else _ln_fwd(x, scale, bias, eps)[0]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm_cpu(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """`layer_norm` with a hand-written backward.

    Two-pass mean/variance (as PyTorch; flax's default one-pass E[x^2] - E[x]^2 differs by
    rounding only). The backward is the closed form
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * scale, which XLA CPU runs
    ~2x faster than autodiff through the statistics (docs/benchmarks.md).
    """
    return _ln_fwd(x, scale, bias, eps)[0]


def _ln_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    xc = xf - mean
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)
    xhat = xc * rstd
    y = (xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)
    return y, (xhat, rstd, scale)


def _ln_bwd(eps, res, dy):
    xhat, rstd, scale = res
    dyf = dy.astype(jnp.float32)
    lead = tuple(range(dy.ndim - 1))
    dscale = jnp.sum(dyf * xhat, axis=lead).astype(scale.dtype)
    dbias = jnp.sum(dyf, axis=lead).astype(scale.dtype)
    g = dyf * scale.astype(jnp.float32)
    # the barrier materialises the two row means: fused into the elementwise consumer, XLA
    # CPU recomputed the reductions per element (fwd+bwd 27 -> 12 ms at [32, 197, 384]; docs/benchmarks.md)
    m_g, m_gx = jax.lax.optimization_barrier(
        (jnp.mean(g, axis=-1, keepdims=True), jnp.mean(g * xhat, axis=-1, keepdims=True))
    )
    dx = rstd * (g - m_g - xhat * m_gx)
    return dx.astype(dy.dtype), dscale, dbias


_layer_norm_cpu.defvjp(lambda x, s, b, eps: _ln_fwd(x, s, b, eps), _ln_bwd)


class LayerNorm(nn.Module):
    """Drop-in for `nn.LayerNorm` (same params `scale`, `bias`) using `layer_norm`."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,))
        bias = self.param("bias", nn.initializers.zeros, (d,))
        return layer_norm(x.astype(self.dtype), scale, bias, self.epsilon)


class MLP(nn.Module):
    """fc1 -> activation -> fc2 (HF CLIPMLP)."""

    width: int
    mlp_dim: int
    act: str
    layers: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # OpenAI CLIP init: fc std (2D)^-0.5, residual projections scaled by (2L)^-0.5.
        fc_std = (2 * self.width) ** -0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc1 = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=normal(fc_std), name="fc1")
        fc2 = nn.Dense(self.width, dtype=self.dtype, kernel_init=normal(proj_std), name="fc2")
        return dense_2d(fc2, ACTIVATIONS[self.act](dense_2d(fc1, x)))


def _split_heads(qkv: jax.Array, heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[..., T, 3D] -> three [..., H, T, Dh] (q, k, v blocks, heads contiguous in each).

    Split first, then one transpose per block: its backward is a concatenate. Indexing a
    [3, ..., H, T, Dh] transpose instead made the attention layer's gradient 1.5x slower on
    XLA CPU (scripts/bench/bench_encoder_attention.py history in docs/benchmarks.md).
    """
    *lead, t, three_d = qkv.shape
    dh = three_d // (3 * heads)
    n = len(lead)
    perm = (*range(n), n + 1, n, n + 2)  # [..., T, H, Dh] -> [..., H, T, Dh]
    return tuple(jnp.transpose(a.reshape(*lead, t, heads, dh), perm) for a in jnp.split(qkv, 3, axis=-1))


def _merge_heads(x: jax.Array) -> jax.Array:
    """[..., H, T, Dh] -> [..., T, H*Dh]."""
    *lead, h, t, dh = x.shape
    return jnp.swapaxes(x, -3, -2).reshape(*lead, t, h * dh)


def _core_forward(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """softmax(q k^T / sqrt(Dh)) v on [..., H, T, Dh]; also returns the float32 probs.
    `mask` [..., 1, Tq, Tk] (broadcast over heads): the keys each query may read."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum(
        "...qd,...kd->...qk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32
    )
    if causal:
        t = logits.shape[-1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), dtype=bool)), logits, jnp.finfo(jnp.float32).min)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("...qk,...kd->...qd", probs.astype(v.dtype), v), probs


def padded_dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool, implementation: str | None, multiple: int = 8
) -> jax.Array:
    """`jax.nn.dot_product_attention` on [B, T, H, Dh] with T padded up to a multiple of `multiple`.

    cuDNN's fused (flash) attention refuses odd sequence lengths in training, and ViT-B/16's
    197 tokens and CLIP's 77 text tokens are odd. The padded keys are masked out through
    `key_value_seq_lengths` (and padded queries through `query_seq_lengths`), and the padded
    rows are cut from the output, so the result and its gradient equal unpadded attention.
    """
    b, t = q.shape[:2]
    pad = -t % multiple
    if pad == 0:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, widths) for a in (q, k, v))
    lengths = jnp.full((b,), t, jnp.int32)
    y = jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation=implementation,
    )  # fmt: skip
    return y[:, :t]


def attention_core(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False, mask: jax.Array | None = None
) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v on [..., H, T, Dh], `mask` [..., 1, Tq, Tk] the keys each
    query may read (or None): on CPU with the hand-written backward of
    `_attention_core_cpu`, elsewhere autodiff through the same forward."""
    if cpu_kernels():
        return _attention_core_cpu(q, k, v, causal, mask)
    return _core_forward(q, k, v, causal, mask)[0]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_core_cpu(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False, mask: jax.Array | None = None
) -> jax.Array:
    """Scaled-dot-product attention core with a hand-written backward.

    Forward is exactly the autodiff version. The backward saves only the float32 probs and
    spells out the four gradient GEMMs plus the softmax VJP `p * (dp - sum(dp * p))` with
    the scale folded into `ds` once: on XLA CPU this ran the core's fwd+bwd ~13% faster than
    autodiff at ViT-S/16 sizes ([32, 6, 197, 64]: 140 vs 162 ms, one thread). Masked
    (causal or `mask`ed) positions have p = 0, so their ds is 0 without re-applying the mask.
    """
    return _core_forward(q, k, v, causal, mask)[0]


def _core_fwd(q, k, v, causal, mask):
    y, probs = _core_forward(q, k, v, causal, mask)
    return y, (q, k, v, probs)


# Sequence length up to which the core's backward computes dk and dv transposed (below).
TRANSPOSED_GRAD_MAX_T = 128


def _transposed_grad(x: jax.Array, s: jax.Array) -> jax.Array:
    """sum_q s[.., q, k] x[.., q, d] -> [.., K, Dh], computed as (x^T s)^T.

    The plain form contracts the row axis of both operands; XLA CPU runs it as a generic
    `dot` thunk, ~5x slower than its YNNPACK GEMMs for the many tiny matrices of short
    sequences (tiny: [64, 4, 65, 16]). With x^T [.., Dh, Q] materialised and the result
    fenced by `optimization_barrier` (else XLA folds both transposes back into the dot),
    it is a canonical GEMM; the two transposes are of the small [T, Dh] operands. Slower
    at long T (ViT-S/16, T = 197: 77 -> 102 ms a core), hence `TRANSPOSED_GRAD_MAX_T`.
    """
    nb = x.ndim - 2
    xt = jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))
    batch = (tuple(range(nb)), tuple(range(nb)))
    out = jax.lax.dot_general(xt, s.astype(x.dtype), (((nb + 1,), (nb,)), batch))
    return jnp.swapaxes(jax.lax.optimization_barrier(out), -1, -2)


def _core_bwd(causal, res, dy):
    q, k, v, probs = res
    f32 = jnp.float32
    short = q.shape[-2] <= TRANSPOSED_GRAD_MAX_T and k.shape[-2] <= TRANSPOSED_GRAD_MAX_T
    if short:
        dv = _transposed_grad(dy, probs)
    else:
        dv = jnp.einsum("...qk,...qd->...kd", probs.astype(dy.dtype), dy)
    dp = jnp.einsum("...qd,...kd->...qk", dy, v, preferred_element_type=f32)
    # materialised row sum: see `_ln_bwd` (XLA CPU otherwise recomputes it per element)
    row = jax.lax.optimization_barrier(jnp.sum(dp * probs, axis=-1, keepdims=True))
    ds = probs * (dp - row) * (q.shape[-1] ** -0.5)
    ds = ds.astype(q.dtype)
    dq = jnp.einsum("...qk,...kd->...qd", ds, k)
    dk = _transposed_grad(q, ds) if short else jnp.einsum("...qk,...qd->...kd", ds, q)
    return dq, dk, dv, None  # no gradient for the mask


_attention_core_cpu.defvjp(_core_fwd, _core_bwd)


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection (params `qkv`, `out`)."""

    width: int
    heads: int
    layers: int
    causal: bool = False
    impl: str = "auto"
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        self.qkv = nn.Dense(3 * self.width, dtype=self.dtype, kernel_init=normal(attn_std))
        self.out = nn.Dense(self.width, dtype=self.dtype, kernel_init=normal(proj_std))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        qkv = dense_2d(self.qkv, x)
        impl = resolve_attention(self.impl, self.dtype, self.width // self.heads)
        if impl in ("dot_product", "cudnn"):
            b, t, _ = qkv.shape
            q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.heads, -1), 3, axis=2)
            if impl == "cudnn":
                y = padded_dot_product_attention(q, k, v, self.causal, "cudnn", multiple=8)
            else:
                y = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
            return dense_2d(self.out, y.reshape(b, t, self.width))
        if impl == "einsum_bthd":
            return dense_2d(self.out, self._bthd(qkv))
        q, k, v = _split_heads(qkv, self.heads)
        return dense_2d(self.out, _merge_heads(attention_core(q, k, v, self.causal)))

    def _bthd(self, qkv: jax.Array) -> jax.Array:
        """Stock-Flax layout ([B, T, H, Dh] einsums, as nn.MultiHeadDotProductAttention):
        kept only as the benchmark baseline for the default layout."""
        b, t, _ = qkv.shape
        q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.heads, -1), 3, axis=2)
        q = q * jnp.asarray((self.width // self.heads) ** -0.5, q.dtype)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if self.causal:
            mask = jnp.tril(jnp.ones((t, t), dtype=bool))
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.width)

    def _qkv_columns(self, x: jax.Array, start: int, stop: int) -> jax.Array:
        """Columns [start, stop) of the fused QKV projection of x [N, D] (0:D = q, D:3D = k, v).

        Same params and numbers as `self.qkv(x)[:, start:stop]` (flax Dense: promote, dot,
        add bias) without computing the other columns: the text tower's last block needs q
        at the pooled rows only, and the prompter's image prefix needs no q at all (its
        backward also dropped a zero-filled concatenate).
        """
        if self.is_initializing():  # the Dense creates its params on its first call
            return self.qkv(x)[:, start:stop]
        p = self.qkv.variables["params"]
        kernel = p["kernel"][:, start:stop].astype(self.dtype)
        return jnp.dot(x.astype(self.dtype), kernel) + p["bias"][start:stop].astype(self.dtype)

    def _kv_heads(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, S, D] -> keys and values [B, H, S, Dh]."""
        b, s, d = x.shape
        kv = self._qkv_columns(x.reshape(b * s, d), d, 3 * d).reshape(b, s, 2 * d)
        k, v = jnp.split(kv, 2, axis=-1)
        heads = lambda a: jnp.transpose(a.reshape(b, s, self.heads, -1), (0, 2, 1, 3))  # noqa: E731
        return heads(k), heads(v)

    def at_rows(self, x: jax.Array, rows: jax.Array) -> jax.Array:
        """x [B, T, D], rows [B] -> the attention output at position rows[b] only [B, D].

        Same as `__call__(x)[arange(B), rows]`: keys and values of all T positions, but q,
        the T x T scores and the output projection for one query row a sequence (the text
        tower's last block, whose other rows nobody reads).
        """
        b, t, d = x.shape
        h = self.heads
        k, v = self._kv_heads(x)
        xr = jnp.take_along_axis(x, rows[:, None, None], axis=1)[:, 0]
        q = self._qkv_columns(xr, 0, d).reshape(b, h, 1, d // h)
        q = q * jnp.asarray((d // h) ** -0.5, q.dtype)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
        if self.causal:
            seen = jnp.arange(t)[None, None, None, :] <= rows[:, None, None, None]
            logits = jnp.where(seen, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        y = jnp.einsum("bhqk,bhkd->bhqd", probs, v).reshape(b, d)
        return self.out(y)

    def packed(self, x: jax.Array, allowed: jax.Array, first: jax.Array | None = None) -> jax.Array:
        """Attention within the segments of packed rows (encoder/text_packing.py).

        x [R, W, D]; allowed [R, W, W] which key each query may read (the earlier tokens of
        its own segment); first [1, D] or None: a row that every query also reads as its
        first key (the shared position 0, computed once: its key and value are broadcast to
        every row, whose gradients the broadcast sums). -> [R, W, D].
        """
        q, k, v = _split_heads(dense_2d(self.qkv, x), self.heads)  # [R, H, W, Dh]
        k, v, mask = self._first_key(k, v, allowed[:, None], first)
        return dense_2d(self.out, _merge_heads(attention_core(q, k, v, mask=mask)))

    def packed_at(
        self,
        x: jax.Array,
        allowed: jax.Array,
        rows: jax.Array,
        cols: jax.Array,
        first: jax.Array | None = None,
    ) -> jax.Array:
        """`packed(x, allowed, first)[rows, cols]` [N, D], with q, the scores and the output
        projection at those N positions only (the last block of the packed text pass)."""
        r, w, d = x.shape
        h = self.heads
        k, v = self._kv_heads(x)  # [R, H, W, Dh]
        q = self._qkv_columns(x.reshape(r * w, d)[rows * w + cols], 0, d).reshape(-1, h, 1, d // h)
        # [N, H, W, Dh] keys and values of each query's row, [N, 1, 1, W] which it may read
        k, v, mask = self._first_key(k[rows], v[rows], allowed[rows, cols][:, None, None, :], first)
        return self.out(attention_core(q, k, v, mask=mask).reshape(-1, d))

    def _first_key(
        self, k: jax.Array, v: jax.Array, mask: jax.Array, first: jax.Array | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Keys, values [N, H, K, Dh] and mask [N, 1, Q, K] with the shared first row's key
        and value (first [1, D], or None: unchanged) put in front, readable by every query.
        Broadcast, so their gradients sum over the N rows."""
        if first is None:
            return k, v, mask
        n = k.shape[0]
        k0, v0 = (jnp.broadcast_to(a, (n, *a.shape[1:])) for a in self._kv_heads(first[None]))
        seen = jnp.ones((*mask.shape[:-1], 1), bool)
        return jnp.concatenate([k0, k], 2), jnp.concatenate([v0, v], 2), jnp.concatenate([seen, mask], -1)

    def prefix_cache(self, prefix: jax.Array, queries: int) -> PrefixCache:
        """What `with_prefix` needs of a shared (normalised) prefix [B, S, D] that `queries`
        prompt rows an image will attend to: the prefix itself when the absorbed form is
        cheaper (`absorb_prefix`), else its keys and values [B, H, S, Dh]."""
        if absorb_prefix(prefix.shape[1], self.width, self.heads, queries):
            return PrefixCache(tokens=prefix)
        k, v = self._kv_heads(prefix)
        return PrefixCache(k=k, v=v)

    def with_prefix(self, x: jax.Array, cache: PrefixCache, bias: jax.Array | None = None) -> jax.Array:
        """Outputs for x [B, M, P, D] when each of the M sequences is [prefix_b ; x_bm].

        Equal to running `__call__` on the M concatenated sequences [B*M, S+P, D] and
        keeping the last P outputs, but what the prefix needs (`prefix_cache`) is computed
        once per image instead of once per prompt (the prompter's M regions, box and text
        prompts alike, share one image).
        """
        h, dh = self.heads, self.width // self.heads
        q, k, v = _split_heads(dense_2d(self.qkv, x), h)  # [B, M, H, P, Dh]
        q = q * jnp.asarray(dh**-0.5, q.dtype)
        f32 = jnp.float32
        if cache.tokens is None:
            l_pre = jnp.einsum("bmhqd,bhkd->bmhqk", q, cache.k, preferred_element_type=f32)
        else:
            wk, bk, wv, bv = self._kv_weights()
            qk = jnp.einsum("bmhqe,dhe->bmhqd", q, wk)  # q_h Wk_h^T: queries in the token space
            l_pre = jnp.einsum("bmhqd,bkd->bmhqk", qk, cache.tokens, preferred_element_type=f32)
            # q.bk is the same for every key of the softmax (own keys carry it too): kept exact
            l_pre = l_pre + jnp.einsum("bmhqe,he->bmhq", q, bk, preferred_element_type=f32)[..., None]
        if bias is not None:  # [B, M, S]: a per-prompt additive bias on the prefix keys
            l_pre = l_pre + bias[:, :, None, None, :].astype(f32)
        l_own = jnp.einsum("bmhqd,bmhkd->bmhqk", q, k, preferred_element_type=f32)
        probs = jax.nn.softmax(jnp.concatenate([l_pre, l_own], axis=-1), axis=-1)
        s = l_pre.shape[-1]
        p_pre, p_own = probs[..., :s].astype(v.dtype), probs[..., s:].astype(v.dtype)
        y = jnp.einsum("bmhqk,bmhkd->bmhqd", p_own, v)
        if cache.tokens is None:
            y = y + jnp.einsum("bmhqk,bhkd->bmhqd", p_pre, cache.v)
        else:
            mixed = jnp.einsum("bmhqk,bkd->bmhqd", p_pre, cache.tokens)  # sum_k p x_k, then Wv
            y = y + jnp.einsum("bmhqd,dhe->bmhqe", mixed, wv)
            y = y + p_pre.sum(axis=-1, keepdims=True) * bv[:, None, :]
        return dense_2d(self.out, _merge_heads(y))

    def _kv_weights(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """The fused projection's key and value weights by head: Wk, Wv [D, H, Dh], bk, bv [H, Dh]."""
        p = self.qkv.variables["params"]
        d, h = self.width, self.heads
        kernel, bias = p["kernel"].astype(self.dtype), p["bias"].astype(self.dtype)
        wk, wv = (kernel[:, i * d : (i + 1) * d].reshape(d, h, d // h) for i in (1, 2))
        bk, bv = (bias[i * d : (i + 1) * d].reshape(h, d // h) for i in (1, 2))
        return wk, bk, wv, bv


class PrefixCache(NamedTuple):
    """A shared prefix as `Attention.with_prefix` reads it: `tokens` (the normalised prefix,
    absorbed form) or its keys `k` and values `v` [B, H, S, Dh]."""

    tokens: jax.Array | None = None
    k: jax.Array | None = None
    v: jax.Array | None = None


class Block(nn.Module):
    """Pre-norm transformer block (HF CLIPEncoderLayer): ln1, attn, ln2, mlp."""

    width: int
    heads: int
    mlp_dim: int
    act: str = "quick_gelu"
    eps: float = 1e-5
    layers: int = 1  # depth of the stack, for the residual-projection init scale
    causal: bool = False
    impl: str = "auto"
    dtype: Dtype = jnp.float32

    def setup(self) -> None:
        self.ln1 = LayerNorm(epsilon=self.eps, dtype=self.dtype)
        self.attn = Attention(self.width, self.heads, self.layers, self.causal, self.impl, self.dtype)
        self.ln2 = LayerNorm(epsilon=self.eps, dtype=self.dtype)
        self.mlp = MLP(self.width, self.mlp_dim, self.act, self.layers, self.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def at_rows(self, x: jax.Array, rows: jax.Array) -> jax.Array:
        """x [B, T, D], rows [B] -> the block's output at position rows[b] of each sequence [B, D].

        Same as `__call__(x)[arange(B), rows]`, but the MLP (2/3 of a block's FLOPs), the
        attention's queries and its output projection run on the B kept rows only
        (`Attention.at_rows`): the text tower's last block, whose other outputs nobody reads.
        """
        x_rows = jnp.take_along_axis(x, rows[:, None, None], axis=1)[:, 0]
        x = x_rows + self.attn.at_rows(self.ln1(x), rows)
        return x + self.mlp(self.ln2(x))

    def packed(self, x: jax.Array, allowed: jax.Array, first: jax.Array | None = None) -> jax.Array:
        """x [R, W, D] packed rows (`Attention.packed`), first [1, D] the shared position-0 row
        (this block's input there) or None -> the block's output [R, W, D]."""
        ln_first = None if first is None else self.ln1(first)
        x = x + self.attn.packed(self.ln1(x), allowed, ln_first)
        return x + self.mlp(self.ln2(x))

    def packed_at(
        self,
        x: jax.Array,
        allowed: jax.Array,
        rows: jax.Array,
        cols: jax.Array,
        first: jax.Array | None = None,
    ) -> jax.Array:
        """`packed(x, allowed, first)[rows, cols]` [N, D], the MLP and the attention's query
        side at those positions only (the text tower's last block, as `at_rows`)."""
        r, w, d = x.shape
        ln_first = None if first is None else self.ln1(first)
        y = x.reshape(r * w, d)[rows * w + cols] + self.attn.packed_at(
            self.ln1(x), allowed, rows, cols, ln_first
        )
        return y + self.mlp(self.ln2(y))

    def prefix_cache(self, prefix: jax.Array, queries: int) -> PrefixCache:
        """prefix [B, S, D] shared tokens that `queries` prompt rows an image attend to -> what
        `with_prefix` needs of them (`Attention.prefix_cache`)."""
        return self.attn.prefix_cache(self.ln1(prefix), queries)

    def with_prefix(
        self,
        x: jax.Array,
        prefix: jax.Array | None = None,
        cache: PrefixCache | None = None,
        bias: jax.Array | None = None,
    ) -> jax.Array:
        """x [B, M, P, D] prompt tokens, prefix [B, S, D] shared tokens -> new x.

        Output of the block for the last P positions of each sequence [prefix ; x_m];
        the prefix's own outputs are not computed (nobody reads them). Pass `cache =
        prefix_cache(prefix, queries)` instead of `prefix` to reuse it across calls.
        """
        if cache is None:
            cache = self.prefix_cache(prefix, x.shape[1] * x.shape[2])
        x = x + self.attn.with_prefix(self.ln1(x), cache, bias)
        return x + self.mlp(self.ln2(x))


def block_class(remat: bool) -> type[Block]:
    """Block, or Block rematerialised in the backward pass (same params, less memory)."""
    return nn.remat(Block) if remat else Block


def block_kwargs(cfg, kind: str) -> dict:
    """Block hyper-parameters for `kind` in {'vision', 'text', 'prompter'} from a ModelConfig."""
    common = dict(
        act=cfg.hidden_act,
        eps=cfg.layer_norm_eps,
        impl=cfg.attention_impl,
        dtype=jnp.dtype(cfg.dtype),
    )
    if kind == "vision":
        return dict(
            width=cfg.vision_width,
            heads=cfg.vision_heads,
            mlp_dim=cfg.vision_mlp_dim,
            layers=cfg.vision_layers,
            causal=False,
            **common,
        )
    if kind == "text":
        return dict(
            width=cfg.text_width,
            heads=cfg.text_heads,
            mlp_dim=cfg.text_mlp_dim,
            layers=cfg.text_layers,
            causal=True,
            **common,
        )
    if kind == "prompter":
        return dict(
            width=cfg.vision_width,
            heads=cfg.prompter_heads,
            mlp_dim=cfg.vision_mlp_dim,
            layers=1,
            causal=False,
            **common,
        )
    raise ValueError(f"unknown block kind {kind!r}")


def scaled_width_init(width: int) -> Callable:
    """N(0, width^-0.5): OpenAI CLIP's init for class embedding and output projections."""
    return normal(width**-0.5)
