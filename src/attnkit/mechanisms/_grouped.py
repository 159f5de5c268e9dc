"""Base of the mechanisms in which a query sees the keys that share its group (an LSH bucket, a k-means
cluster) in some round: one reference and one ``bucketed`` fast path, the subclass says how tokens are grouped.
"""

from __future__ import annotations

import torch

from ..inputs import AttentionInputs
from ..mechanism import Mechanism, fast_path
from ..ops.bucketed import bucketed_attention, group_predicate
from ..ops.reference import dense_softmax_attention
from ..patterns import Pattern


class GroupedAttention(Mechanism):
    """Softmax over the keys that share a group with the query in some round (and the pattern, padding)."""

    def group_ids(self, x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Group of every query and key per round: ``[B, Hq, R, Tq]``, ``[B, Hq, R, Tk]`` (keys per query head)."""
        raise NotImplementedError

    def n_groups(self) -> int:
        """How many groups a round has (ids lie in ``[0, n_groups)``)."""
        raise NotImplementedError

    def reference(self, x: AttentionInputs):
        q_ids, k_ids = self.group_ids(x)
        return dense_softmax_attention(x, group_predicate(q_ids, k_ids, x.q_offset)), None

    @fast_path("bucketed", priority=10)
    def bucketed(self, x: AttentionInputs):
        q_ids, k_ids = self.group_ids(x)
        out = bucketed_attention(
            x.q,
            x.k,
            x.v,
            q_ids,
            k_ids,
            n_groups=self.n_groups(),
            scale=x.scale,
            causal=x.pattern is Pattern.CAUSAL_SELF,
            q_offset=x.q_offset,
            key_padding_mask=x.key_padding_mask,
            block=self.options.block_size,
        )
        return out, None
