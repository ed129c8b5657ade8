"""Causal self-attention with rotary positions, grouped-query heads and a KV cache.

Legend: B batch, T query positions, S key positions (cache + new), D model width,
N query heads, G key/value heads (N % G == 0; G = 1 is multi-query, G = N multi-head),
C head width.

A cache is anything with the `AttentionCache` interface: it says where the new tokens
sit (their positions) and attends the new queries over everything it holds after
storing the new keys and values. `KVCache` is the one-batch cache of single-sequence
decoding; the inference engine (`moe.inference.cache`) supplies caches that keep many
sequences of different lengths, each in its own slot.

Training in bf16 on a CPU without AMX, the attention itself runs in fp32
(`fp32_attention`): torch's bf16 flash-attention backward on such a CPU took 4x its fp32
time (demo model, AMD EPYC with avx512_bf16: 17 against 4.2 ms a layer), which made
bf16 training slower than fp32 (0.81x the tokens/s); with fp32 attention it is 1.17x
faster (`scripts/bench_precision.py`, docs/BENCHMARKS.md "Mixed precision"). The forward
in bf16 costs about what fp32 does, so inference keeps bf16.

RoPE follows the "rotate half" convention (GPT-NeoX, Llama in HF): channel c of the first
half is paired with channel c + C/2, rotated by position * theta^(-2c/C). The frequencies
are computed in float32 on the fly (no buffer, so a cast to bfloat16 cannot degrade them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import QKNorm
from moe.precision import cpu_flags
from routing.config import parse_enum

HALF_DTYPES = (torch.bfloat16, torch.float16)
# Read once (a constant under torch.compile).
CPU_HAS_AMX = "amx_bf16" in cpu_flags()


def fp32_attention(q: torch.Tensor) -> bool:
    """Whether attention over these queries runs in fp32 (see the module docstring): a
    half-precision query that needs a gradient, on a CPU without AMX tiles."""
    return (
        q.device.type == "cpu"
        and q.dtype in HALF_DTYPES
        and q.requires_grad
        and torch.is_grad_enabled()
        and not CPU_HAS_AMX
    )


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: object) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, in fp32 where `fp32_attention` says so (the
    result back in the queries' dtype)."""
    if not fp32_attention(q):
        return F.scaled_dot_product_attention(q, k, v, **options)  # type: ignore[arg-type]
    with torch.autocast("cpu", enabled=False):
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **options)  # type: ignore[arg-type]
    return y.to(q.dtype)


class AttentionCache(Protocol):
    """Keys and values of one attention layer across calls (see the module docstring)."""

    def positions(self, num_new: int, device: torch.device) -> torch.Tensor:
        """int64 [T]: the positions of the T new tokens (RoPE)."""
        ...

    def attend(
        self, q_BNTC: torch.Tensor, k_BGTC: torch.Tensor, v_BGTC: torch.Tensor
    ) -> torch.Tensor:
        """Store the new keys/values and return y_BNTC: each new query attends to the
        positions before it and itself (rotary already applied)."""
        ...


@dataclass
class KVCache:
    """Keys and values of one attention layer for incremental decoding.

    `k_BGSC`/`v_BGSC` are preallocated to the maximum length; `length` positions are
    filled. Owned by one generation loop (not shared, not global).
    """

    k_BGSC: torch.Tensor
    v_BGSC: torch.Tensor
    length: int = 0

    @classmethod
    def empty(
        cls,
        batch: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> KVCache:
        shape = (batch, n_kv_heads, max_len, head_dim)
        return cls(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
        )

    @property
    def capacity(self) -> int:
        return self.k_BGSC.shape[2]

    def append(
        self, k_BGTC: torch.Tensor, v_BGTC: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store T new positions; return all filled keys and values (views, [B, G, S, C])."""
        end = self.length + k_BGTC.shape[2]
        if end > self.capacity:
            raise ValueError(
                f"KV cache overflow: {end} positions needed, capacity is {self.capacity}"
            )
        self.k_BGSC[:, :, self.length : end] = k_BGTC
        self.v_BGSC[:, :, self.length : end] = v_BGTC
        self.length = end
        return self.k_BGSC[:, :, :end], self.v_BGSC[:, :, :end]

    def positions(self, num_new: int, device: torch.device) -> torch.Tensor:
        return torch.arange(self.length, self.length + num_new, device=device)

    def attend(
        self, q_BNTC: torch.Tensor, k_BGTC: torch.Tensor, v_BGTC: torch.Tensor
    ) -> torch.Tensor:
        start = self.length
        k_BGSC, v_BGSC = self.append(k_BGTC, v_BGTC)
        return attention_after(q_BNTC, k_BGSC, v_BGSC, start)


def attention_after(
    q_BNTC: torch.Tensor, k_BGSC: torch.Tensor, v_BGSC: torch.Tensor, start: int
) -> torch.Tensor:
    """The T queries sit at positions start..start+T-1 of the S = start + T keys: query
    t sees keys 0..start+t (SDPA's `is_causal` aligns top-left, so with start > 0 and
    T > 1 an explicit mask is needed)."""
    T, S = q_BNTC.shape[2], k_BGSC.shape[2]
    mask_TS = None
    if start > 0 and T > 1:
        key_pos_S = torch.arange(S, device=q_BNTC.device)
        mask_TS = (
            key_pos_S[None, :] <= torch.arange(start, start + T, device=q_BNTC.device)[:, None]
        )
    return sdpa(
        q_BNTC, k_BGSC, v_BGSC, attn_mask=mask_TS, is_causal=start == 0 and T > 1,
        enable_gqa=k_BGSC.shape[1] != q_BNTC.shape[1],
    )  # fmt: skip


def rotary_cos_sin(
    positions_T: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each [T, C] in float32."""
    exponents = torch.arange(0, head_dim, 2, device=positions_T.device, dtype=torch.float32)
    inv_freq = theta ** (-exponents / head_dim)
    angles_TH = positions_T.to(torch.float32)[:, None] * inv_freq[None, :]
    angles_TC = torch.cat([angles_TH, angles_TH], dim=-1)
    return angles_TC.cos(), angles_TC.sin()


def apply_rotary(x_BNTC: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (c, c + C/2) of every head by the position's angles."""
    half = x_BNTC.shape[-1] // 2
    x = x_BNTC.to(torch.float32)
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos_TC + rotated * sin_TC).to(x_BNTC.dtype)


class CausalSelfAttention(nn.Module):
    """Multi-head / grouped-query / multi-query causal attention with RoPE.

    Uses `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU) with
    `enable_gqa`, so key/value heads are never materialised N/G times.

    Options (`moe.config.ModelConfig` documents them; all off by default): `head_dim`
    (default d_model // n_heads), `qkv_bias` / `out_bias`, `qk_norm` (RMSNorm of q and k
    per head or over the whole projection, epsilon `norm_eps`) and `clip_qkv`. Order, as
    the HF families compute it: project, q/k norm, clip, split into heads, RoPE.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        rope_theta: float = 10000.0,
        dropout: float = 0.0,
        *,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: QKNorm | str = QKNorm.NONE,
        norm_eps: float = 1e-6,
        clip_qkv: float = 0.0,
    ) -> None:
        super().__init__()
        if head_dim is None and d_model % n_heads != 0:
            raise ValueError(f"n_heads={n_heads} must divide d_model={d_model} (or give head_dim)")
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.clip_qkv = clip_qkv
        self.qk_norm = parse_enum(QKNorm, qk_norm, "qk_norm")
        C = self.head_dim
        self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * C, bias=qkv_bias)
        self.out_proj = nn.Linear(n_heads * C, d_model, bias=out_bias)
        self.q_norm: nn.RMSNorm | None = None
        self.k_norm: nn.RMSNorm | None = None
        if self.qk_norm == QKNorm.HEAD:
            self.q_norm = nn.RMSNorm(C, eps=norm_eps)
            self.k_norm = nn.RMSNorm(C, eps=norm_eps)
        elif self.qk_norm == QKNorm.PROJECTION:
            self.q_norm = nn.RMSNorm(n_heads * C, eps=norm_eps)
            self.k_norm = nn.RMSNorm(n_kv_heads * C, eps=norm_eps)

    def _project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_BTNC, k_BTGC, v_BTGC: projected, normalised and clipped (no RoPE yet)."""
        B, T, _ = x_BTD.shape
        N, G, C = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv_proj(x_BTD)
        q, k, v = qkv[..., : N * C], qkv[..., N * C : (N + G) * C], qkv[..., (N + G) * C :]
        if self.q_norm is not None and self.k_norm is not None:
            if self.qk_norm == QKNorm.HEAD:
                q = self.q_norm(q.reshape(B, T, N, C))
                k = self.k_norm(k.reshape(B, T, G, C))
            else:
                q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv > 0:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        return q.reshape(B, T, N, C), k.reshape(B, T, G, C), v.reshape(B, T, G, C)

    def rotary(
        self, num_new: int, cache: AttentionCache | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_TC, sin_TC of the new tokens' positions (after the cached ones)."""
        if cache is None:
            positions_T = torch.arange(num_new, device=device)
        else:
            positions_T = cache.positions(num_new, device)
        return rotary_cos_sin(positions_T, self.head_dim, self.rope_theta)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cache: AttentionCache | None = None,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x_BTD -> y_BTD. With a cache, the new positions follow the cached ones.
        `rotary`: (cos_TC, sin_TC) of those positions, computed once by the caller for
        every layer (None: computed here, `rotary()`)."""
        B, T, _ = x_BTD.shape
        N, G, C = self.n_heads, self.n_kv_heads, self.head_dim
        q_BTNC, k_BTGC, v_BTGC = self._project(x_BTD)
        q_BNTC, k_BGTC, v_BGTC = (t.transpose(1, 2) for t in (q_BTNC, k_BTGC, v_BTGC))
        cos_TC, sin_TC = rotary if rotary is not None else self.rotary(T, cache, x_BTD.device)
        q_BNTC = apply_rotary(q_BNTC, cos_TC, sin_TC)
        k_BGTC = apply_rotary(k_BGTC, cos_TC, sin_TC)
        if cache is not None:
            y_BNTC = cache.attend(q_BNTC, k_BGTC, v_BGTC)
        else:
            y_BNTC = sdpa(
                q_BNTC, k_BGTC, v_BGTC, is_causal=True, enable_gqa=G != N,
                dropout_p=self.dropout if self.training else 0.0,
            )  # fmt: skip
        return self.out_proj(y_BNTC.transpose(1, 2).reshape(B, T, N * C))
