"""The engine's KV cache: one slot per running sequence, many sequences per model call.

`SlotKVCache` holds, for every block, keys and values of `num_slots` sequences of up to
`max_len` positions each ([slots, G, max_len, C]) and each slot's filled length. A step
of the engine packs the new tokens of several sequences into one row of the model's
input (`[1, T]`, T = the tokens of all segments): a prefilling sequence contributes its
prompt, a decoding one its last token. `SlotKVCache.step(segments)` returns one
`PackedAttention` per block; each is an `moe.attention.AttentionCache` that gives every
token its own position (RoPE) and attends each segment only over its own slot, so
sequences never see each other. Decode tokens (one per segment) attend in one batched
call over their slots, padded to the longest and masked; prefill segments attend one
call each, causally after what their slot already holds.

Legend: S slots, G key/value heads, N query heads, L max positions per slot, C head
width, T packed new tokens, Bd decoding sequences in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from moe.attention import attention_after


@dataclass(frozen=True)
class Segment:
    """`count` new tokens of the sequence in `slot`, at positions start..start+count-1."""

    slot: int
    start: int
    count: int


class SlotKVCache:
    """Keys and values of up to `num_slots` sequences, for every block."""

    def __init__(
        self,
        num_blocks: int,
        num_slots: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        shape = (num_slots, n_kv_heads, max_len, head_dim)
        self.k_SGLC = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_blocks)]
        self.v_SGLC = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_blocks)]
        self.num_slots = num_slots
        self.max_len = max_len
        self.lengths = [0] * num_slots

    def step(self, segments: list[Segment]) -> list[PackedAttention]:
        """The per-block caches of one model call over `segments` (in packed order).
        Call `commit(segments)` after the call to advance the slots' lengths."""
        for segment in segments:
            if not 0 <= segment.slot < self.num_slots or segment.count < 0:
                raise ValueError(f"{segment} is outside the cache's {self.num_slots} slots")
            if segment.start + segment.count > self.max_len:
                raise ValueError(
                    f"{segment} overflows the slot: {segment.start + segment.count} positions, "
                    f"capacity {self.max_len}"
                )
        layout = _PackedLayout.build(segments, self.k_SGLC[0].device)
        return [PackedAttention(k, v, layout) for k, v in zip(self.k_SGLC, self.v_SGLC)]

    def commit(self, segments: list[Segment]) -> None:
        for segment in segments:
            self.lengths[segment.slot] = segment.start + segment.count

    def reset(self, slot: int) -> None:
        """Free `slot` (its stale keys are overwritten before they are read again)."""
        self.lengths[slot] = 0


@dataclass(frozen=True)
class _PackedLayout:
    """Index tensors of one step, shared by every block."""

    positions_T: Tensor  # position of each packed token in its sequence
    slot_T: Tensor  # slot of each packed token
    decode_token_D: Tensor  # packed index of each one-token segment's token
    decode_slot_D: Tensor
    decode_length_D: Tensor  # the slot's length after this step
    prefills: tuple[tuple[int, Segment], ...]  # (packed offset, segment) of the others

    @classmethod
    def build(cls, segments: list[Segment], device: torch.device) -> _PackedLayout:
        positions: list[int] = []
        slots: list[int] = []
        decode_token: list[int] = []
        decode_slot: list[int] = []
        decode_length: list[int] = []
        prefills: list[tuple[int, Segment]] = []
        offset = 0
        for segment in segments:
            positions.extend(range(segment.start, segment.start + segment.count))
            slots.extend([segment.slot] * segment.count)
            if segment.count == 1:
                decode_token.append(offset)
                decode_slot.append(segment.slot)
                decode_length.append(segment.start + 1)
            elif segment.count > 1:
                prefills.append((offset, segment))
            offset += segment.count

        def tensor(values: list[int]) -> Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        return cls(
            tensor(positions),
            tensor(slots),
            tensor(decode_token),
            tensor(decode_slot),
            tensor(decode_length),
            tuple(prefills),
        )


class PackedAttention:
    """One block's `AttentionCache` for a packed step (see the module docstring)."""

    def __init__(self, k_SGLC: Tensor, v_SGLC: Tensor, layout: _PackedLayout) -> None:
        self.k_SGLC = k_SGLC
        self.v_SGLC = v_SGLC
        self.layout = layout

    def positions(self, num_new: int, device: torch.device) -> Tensor:
        if num_new != self.layout.positions_T.shape[0]:
            raise ValueError(
                f"the step packs {self.layout.positions_T.shape[0]} tokens, the model got {num_new}"
            )
        return self.layout.positions_T

    def attend(self, q_BNTC: Tensor, k_BGTC: Tensor, v_BGTC: Tensor) -> Tensor:
        if q_BNTC.shape[0] != 1:
            raise ValueError(f"packed steps have one row; got a batch of {q_BNTC.shape[0]}")
        layout = self.layout
        # Store every new key/value in its slot at its position: [T, G, C] each.
        self.k_SGLC[layout.slot_T, :, layout.positions_T] = k_BGTC[0].transpose(0, 1)
        self.v_SGLC[layout.slot_T, :, layout.positions_T] = v_BGTC[0].transpose(0, 1)
        y_BNTC = torch.empty_like(q_BNTC)
        if layout.decode_token_D.numel():
            y_BNTC[0, :, layout.decode_token_D] = self._decode(q_BNTC[0]).transpose(0, 1)
        for offset, segment in layout.prefills:
            stop = segment.start + segment.count
            slot = slice(segment.slot, segment.slot + 1)
            y_BNTC[:, :, offset : offset + segment.count] = attention_after(
                q_BNTC[:, :, offset : offset + segment.count],
                self.k_SGLC[slot, :, :stop],
                self.v_SGLC[slot, :, :stop],
                segment.start,
            )
        return y_BNTC

    def _decode(self, q_NTC: Tensor) -> Tensor:
        """The decode tokens' attention over their slots, one batched call -> [Bd, N, C]."""
        layout = self.layout
        longest = int(layout.decode_length_D.max())
        k_DGLC = self.k_SGLC[layout.decode_slot_D, :, :longest]
        v_DGLC = self.v_SGLC[layout.decode_slot_D, :, :longest]
        q_DN1C = q_NTC[:, layout.decode_token_D].transpose(0, 1).unsqueeze(2)
        key_L = torch.arange(longest, device=q_NTC.device)
        mask_D11L = (key_L[None, :] < layout.decode_length_D[:, None])[:, None, None, :]
        y_DN1C = F.scaled_dot_product_attention(
            q_DN1C, k_DGLC, v_DGLC, attn_mask=mask_D11L,
            enable_gqa=k_DGLC.shape[1] != q_DN1C.shape[1],
        )  # fmt: skip
        return y_DN1C[:, :, 0]
