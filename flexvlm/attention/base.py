"""The attention-backend interface: one signature for every fused attention kernel flexvlm calls.

A backend takes queries (B, heads, R, d), keys and values (B, kv_heads, keys, d) (grouped-query when
kv_heads < heads) and which keys each row sees, ``mask`` (B, 1 or heads, R, keys): bool (True: seen),
float (added to the scores; -inf: unseen) or None (every key, or the causal rule with ``is_causal``:
row i sees keys 0 .. i). It returns the output (B, heads, R, d) and, where asked (``return_lse``), the
log-sum-exp of each row's scaled scores over the keys it sees (B, heads, R): from it the row's
probabilities over any keys follow, exp(q k^T / sqrt(d) - lse), without forming the map. A backend that
cannot give the lse on an input refuses it with the reason (``LseUnavailable``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from flexvlm.registry import Registry

ATTENTION_BACKENDS: Registry["AttentionBackend"] = Registry("attention backend", group="flexvlm.attention")


class LseUnavailable(NotImplementedError):
    """The backend gives no log-sum-exp for this input (device, dtype or autograd)."""


class AttentionBackend(ABC):
    """A fused attention kernel (the module docstring's signature). Stateless: one instance serves every
    layer of a model."""

    name: str

    @abstractmethod
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
                 return_lse: bool = False) -> tuple[Tensor, Tensor | None]:
        """-> (output (B, heads, R, d), lse (B, heads, R) when ``return_lse``, else None)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def build_backend(spec: str | AttentionBackend) -> AttentionBackend:
    """A backend instance from its registered name (plugins included) or as given."""
    if isinstance(spec, AttentionBackend):
        return spec
    return ATTENTION_BACKENDS.get(spec)()
