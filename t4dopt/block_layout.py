"""The block table: which key blocks each query block attends.

A `BlockLayout` is plain data shared by the mask policies (which build it), the passes (which
put it into the graph) and the kernels (which run it). Blocks need not be of equal length: a
frame whose token count is not a multiple of the block size ends in a partial block, and the
prefix tokens (text, global tokens) form blocks of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TOKEN_MASK_LIMIT = 32768


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Block-sparse attention pattern over one sequence of `seq_len` tokens.

    Attributes:
        block_starts: int64 [num_blocks + 1]; block b covers tokens
            ``block_starts[b] : block_starts[b + 1]``; the last entry is ``seq_len``.
        kv_counts: int32 [num_blocks]; how many key blocks query block b attends.
        kv_indices: int32 [num_blocks, max_kv]; row b lists the key blocks it attends in
            ascending order in its first ``kv_counts[b]`` entries; the rest is padding (0).
        block_size: the nominal (largest) block length.
        description: the policy and parameters that made it, for reports.
    """

    block_starts: torch.Tensor
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    description: str = ""
    _dense_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        block_starts: torch.Tensor,
        block_size: int,
        description: str = "",
    ) -> BlockLayout:
        """Build the table from a bool [num_blocks, num_blocks] block mask."""
        dense = dense.to(torch.bool).cpu()
        block_starts = block_starts.to(torch.int64).cpu()
        num_blocks = dense.shape[0]
        if dense.shape != (num_blocks, num_blocks) or block_starts.numel() != num_blocks + 1:
            raise ValueError(
                f"block mask of shape {tuple(dense.shape)} does not match "
                f"{block_starts.numel() - 1} blocks"
            )
        counts = dense.sum(dim=1).to(torch.int32)
        max_kv = max(int(counts.max()) if num_blocks else 0, 1)
        # Stable sort of ~dense puts the kept key blocks first, in ascending order.
        order = torch.sort((~dense).to(torch.int8), dim=1, stable=True).indices[:, :max_kv]
        keep = torch.arange(max_kv).unsqueeze(0) < counts.unsqueeze(1)
        indices = torch.where(keep, order, torch.zeros_like(order)).to(torch.int32)
        return cls(block_starts, counts, indices.contiguous(), int(block_size), description)

    @property
    def num_blocks(self) -> int:
        return int(self.kv_counts.numel())

    @property
    def seq_len(self) -> int:
        return int(self.block_starts[-1])

    @property
    def block_lengths(self) -> torch.Tensor:
        return self.block_starts[1:] - self.block_starts[:-1]

    def to_dense(self) -> torch.Tensor:
        """bool [num_blocks, num_blocks]: True where query block i attends key block j."""
        cached = self._dense_cache.get("dense")
        if cached is None:
            n = self.num_blocks
            max_kv = self.kv_indices.shape[1]
            keep = torch.arange(max_kv).unsqueeze(0) < self.kv_counts.cpu().unsqueeze(1)
            rows = torch.arange(n).unsqueeze(1).expand(n, max_kv)
            cached = torch.zeros(n, n, dtype=torch.bool)
            cached[rows[keep], self.kv_indices.cpu().long()[keep]] = True
            self._dense_cache["dense"] = cached
        return cached

    @property
    def density(self) -> float:
        """Fraction of query-key token pairs computed (equals the tile fraction for equal blocks)."""
        lengths = self.block_lengths.to(torch.float64)
        kept = (lengths.unsqueeze(1) * lengths.unsqueeze(0))[self.to_dense()].sum()
        return float(kept / float(self.seq_len) ** 2)

    def block_of_token(self) -> torch.Tensor:
        """int64 [seq_len]: the block each token belongs to."""
        return torch.repeat_interleave(torch.arange(self.num_blocks), self.block_lengths)

    def token_mask(self) -> torch.Tensor:
        """bool [seq_len, seq_len] token-level mask; only for small sequences."""
        if self.seq_len > TOKEN_MASK_LIMIT:
            raise ValueError(
                f"token_mask() of a {self.seq_len}-token layout would take "
                f"{self.seq_len ** 2 / 2 ** 30:.1f} GiB; it is meant for at most {TOKEN_MASK_LIMIT} tokens"
            )
        block = self.block_of_token()
        return self.to_dense()[block.unsqueeze(1), block.unsqueeze(0)]

    def tensors(self, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv_counts, kv_indices, block_starts) on `device`, the form the `t4d` op takes."""
        return (
            self.kv_counts.to(device),
            self.kv_indices.to(device),
            self.block_starts.to(device),
        )

    def __repr__(self) -> str:
        return (
            f"BlockLayout({self.description or 'custom'}, seq_len={self.seq_len}, "
            f"blocks={self.num_blocks}, block_size={self.block_size}, density={self.density:.3f})"
        )
