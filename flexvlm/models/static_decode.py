"""A decoding step of static shapes, compiled with ``torch.compile`` (issue 22): what
``generation_steps(..., compiled=True)`` runs after the prefill.

The cached step of ``generation_steps`` changes shape at every step (a KV cache that grows, selections as
wide as the widest sample's), and reads values back to the host (selection counts, the last gather). This
one does neither, so that one graph serves every step of a generation, without a graph break:

- the KV cache (``StaticKVCache``) is preallocated at the prefill to the prompt's length plus the new
  tokens (rounded up to ``CAPACITY_BLOCK``, so that prompts of about the same length share a graph); a step
  writes its key at a position held in a tensor, and the keys it may see are a key-validity mask (the
  prompt's padding, and the slots not yet written), not a slice;
- the HR K/V of every FA layer are projected at the prefill into fixed buffers (``high_res_kv="static"``)
  and gathered at every step, without the comparison with the last gather that the uncompiled step reads back;
- a selection from a fixed budget (``ratio`` or ``top_k`` blocks) is padded to the most HR tokens a row can
  select on the batch's geometry (``SelectionStrategy.max_selected``): a fixed number of token indices per
  row, an image's other tokens masked (``HighResSelector.with_fixed_width``).

Refused, with the reason (``unsupported``): a strategy whose count the map decides (the release's threshold,
``attention_mass``), a token reduction in the decoder (per-stage caches of changing length), the release-style
layer (it scatters rows by index), the random baseline (its own generator), a sharded model, and attn_backend
``flex`` (not tried under the compiled step). On CUDA the step is compiled with ``mode="reduce-overhead"`` (CUDA graphs: the caches' buffers are
marked static), elsewhere in the default mode.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from flexvlm.attention import FlexAttentionBackend
from flexvlm.models.decoder import AttentionInputs, KVCache
from flexvlm.models.flex_attention import SelectingRows, SelectionRecord
from flexvlm.selection import RandomSelection

if TYPE_CHECKING:  # the model calls this module (through generation), not the other way round
    from flexvlm.models.vlm import FlexVLM, MultimodalInputs, StepOutput

CAPACITY_BLOCK = 64  # the KV cache's capacity is a multiple of it


class StaticKVCache(KVCache):
    """Per-layer keys and values in buffers of a fixed ``capacity``, allocated at the prefill (whose keys
    fill the first positions); a decoding step writes its key at ``position`` (a (1,) tensor, one column
    for every sample: the prompts are left-padded) and is handed the whole buffers, which keys of them a
    row sees being the caller's mask. ``len`` stays the prompt's length."""

    def __init__(self, capacity: int, position: Tensor) -> None:
        super().__init__()
        self.capacity, self.position = capacity, position

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if layer_idx in self._buffers:  # a decoding step
            k_buf, v_buf = self._buffers[layer_idx]
            k_buf.index_copy_(2, self.position, k)
            v_buf.index_copy_(2, self.position, v)
            return k_buf, v_buf
        n = k.shape[2]  # the prefill
        if n + 1 > self.capacity:
            raise ValueError(f"the prompt's {n} keys leave no room in a cache of {self.capacity}")
        k_buf, v_buf = (t.new_zeros(*t.shape[:2], self.capacity, t.shape[-1]) for t in (k, v))
        k_buf[:, :, :n], v_buf[:, :, :n] = k, v
        self._buffers[layer_idx], self._lengths[layer_idx] = (k_buf, v_buf), n
        return k_buf[:, :, :n], v_buf[:, :, :n]

    def buffers(self) -> list[Tensor]:
        """Every layer's K and V buffers."""
        return [t for kv in self._buffers.values() for t in kv]


def unsupported(model: FlexVLM, inputs: MultimodalInputs) -> str | None:
    """Why the static step cannot decode this model and batch, or None. A fixed-budget strategy's
    refusal is ``HighResSelector.with_fixed_width``'s."""
    if model.is_sharded:
        return "a sharded model gathers its layers at every step through FSDP's hooks"
    if inputs.pruning is not None:
        return f"the token reduction {model.reduction!r} keeps per-stage caches whose lengths change"
    if model.mode == "flex" and model.flex_impl == "release":
        return "the release-style layer scatters its rows' masks by index (shapes that depend on values): use fused"
    if isinstance(model.selection, RandomSelection):
        return f"{model.selection!r} draws from a torch.Generator of its own, which a compiled graph cannot trace"
    if isinstance(model.attn_backend, FlexAttentionBackend):
        return "attn_backend flex builds a block mask at every call, which the compiled step has not been tried with"
    return None


class StaticDecoding:
    """The decoding steps of one generation after its prefill, in static shapes: ``cache`` and
    ``high_res`` are what the (eager) prefill step takes, ``step`` the following steps, compiled where
    ``compiled`` (else the same step eagerly, the reference the compiled one is tested against)."""

    def __init__(self, model: FlexVLM, inputs: MultimodalInputs, max_new_tokens: int, compiled: bool = True) -> None:
        reason = unsupported(model, inputs)
        if reason is not None:
            raise ValueError(f"a compiled decode step cannot run this model: {reason}. Decode uncompiled")
        self.model = model
        mask = inputs.attention_mask
        b, n = mask.shape
        capacity = -(-(n + max_new_tokens) // CAPACITY_BLOCK) * CAPACITY_BLOCK
        self.position = torch.full((1,), n, dtype=torch.long, device=mask.device)  # the next key's slot
        self.cache = StaticKVCache(capacity, self.position)
        self.key_valid = F.pad(mask.bool(), (0, capacity - n), value=False)
        extended = F.pad(mask, (0, 1), value=1)  # the first generated token's position: the model's own rule
        self.position_ids = (inputs.positions.of_chunk(model.llm, extended, 1, n) if inputs.positions is not None
                             else model.llm.position_ids(extended, b, 1, n, mask.device)).clone()
        # the previous tokens, copied in at each step: one address, shape and stride for every step (a column
        # of the generated ids has a stride that changes at every step, which would recompile)
        self.token = torch.zeros(b, dtype=torch.long, device=mask.device)
        self.high_res = inputs.high_res
        if self.high_res is not None and self.high_res.selector is not None:
            self.high_res = replace(self.high_res, selector=self.high_res.selector.with_fixed_width())
        self._cuda_graphs = compiled and mask.device.type == "cuda"
        self._step = decode_step
        if compiled:
            self._step = torch.compile(decode_step, fullgraph=True, dynamic=False,
                                       mode="reduce-overhead" if self._cuda_graphs else None)
        self._to_mark = self._cuda_graphs  # the buffers' addresses, marked once the prefill has made them

    def step(self, token: Tensor) -> StepOutput:
        """The step of the previous tokens (B,): -> its ``StepOutput``."""
        from flexvlm.models.vlm import StepOutput

        if self._to_mark:
            self._mark_static()
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        self.token.copy_(token)
        logits, record = self._step(self.model, self, self.token)
        if self._cuda_graphs:  # a graph's outputs are overwritten by its next replay: the step keeps copies
            logits = logits.clone()
            if record is not None:
                record.masks = {layer: m.clone() for layer, m in record.masks.items()}
                record.maps = {layer: m.clone() for layer, m in record.maps.items()}
        return StepOutput(logits, record)

    def _mark_static(self) -> None:
        """The buffers that every step reads or writes in place keep their addresses: for CUDA graphs, no
        copy of them per step (no guard on the address: another generation's buffers reuse the graph)."""
        tensors = [self.token, self.position, self.position_ids, self.key_valid, *self.cache.buffers()]
        if self.high_res is not None:
            tensors += self.high_res.kv.buffers()
        for t in tensors:
            torch._dynamo.mark_static_address(t, guard=False)
        self._to_mark = False


def decode_step(model: FlexVLM, state: StaticDecoding, token: Tensor) -> tuple[Tensor, SelectionRecord | None]:
    """One decoding step of ``state``'s generation (the function that is compiled): the previous tokens
    (B,) -> the step's logits (B, 1, vocab) and, in flex mode, its ``SelectionRecord``; writes its keys and
    moves ``state``'s position on, in place."""
    llm = model.llm
    state.key_valid.index_fill_(1, state.position, True)
    embeds = llm.embed(token[:, None])
    cos, sin = llm.rope(state.position_ids, embeds.dtype)
    visible = state.key_valid[:, None, None]  # (B, 1, 1, capacity): the keys written, less the prompt's padding
    # past_len: the prompt's (unread here: the key mask tells which keys the row sees)
    inputs = AttentionInputs(cos, sin, len(state.cache), state.key_valid, visible)
    b = token.shape[0]
    rows = SelectingRows(token.new_zeros(b, 1), torch.ones(b, 1, dtype=torch.bool, device=token.device), visible, True)
    hidden, record = model.decode_layers(embeds, inputs, state.cache, rows, state.high_res)
    state.position.add_(1)
    state.position_ids.add_(1)
    return llm.logits(hidden[:, -1:]), record
