"""The block table: which key blocks each query block attends.

A `BlockLayout` is plain data shared by the mask policies (which build it), the passes (which
put it into the graph) and the kernels (which run it). Blocks need not be of equal length: a
frame whose token count is not a multiple of the block size ends in a partial block, and the
global tokens before and after the video (text, registers: `TokenGrid.prefix_tokens`,
`TokenGrid.suffix_tokens`) form blocks of their own.

Layouts combine at block level: ``a & b`` keeps the block pairs both keep (a policy and a
structured mask the model passes, such as block-causal over frames), and
`BlockLayout.from_token_mask` lifts a block-aligned token mask to a layout, refusing one that
is not constant on every block pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

TOKEN_MASK_LIMIT = 32768


@dataclass(frozen=True)
class TokenGrid:
    """The token order a policy built a layout for.

    ``prefix_tokens`` global tokens, then ``frames`` frames of ``tokens_per_frame`` tokens each,
    frame after frame, then ``suffix_tokens`` global tokens (text after the video, as
    HunyuanVideo, Mochi, Framepack and MotifVideo join ``[video, text]``).
    """

    frames: int
    tokens_per_frame: int
    prefix_tokens: int = 0
    suffix_tokens: int = 0

    @property
    def seq_len(self) -> int:
        return self.prefix_tokens + self.frames * self.tokens_per_frame + self.suffix_tokens

    def describe(self) -> str:
        return (f"frames={self.frames}, tokens_per_frame={self.tokens_per_frame}, "
                f"prefix_tokens={self.prefix_tokens}, suffix_tokens={self.suffix_tokens}")


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
        grid: the token grid a policy built it for (None for a table of unknown origin).
    """

    block_starts: torch.Tensor
    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_size: int
    description: str = ""
    grid: TokenGrid | None = None
    _dense_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dense(
        cls,
        dense: torch.Tensor,
        block_starts: torch.Tensor,
        block_size: int,
        description: str = "",
        grid: TokenGrid | None = None,
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
        if grid is not None and grid.seq_len != int(block_starts[-1]):
            raise ValueError(f"token grid ({grid.describe()}) has {grid.seq_len} tokens, "
                             f"the blocks cover {int(block_starts[-1])}")
        counts = dense.sum(dim=1).to(torch.int32)
        max_kv = max(int(counts.max()) if num_blocks else 0, 1)
        # Stable sort of ~dense puts the kept key blocks first, in ascending order.
        order = torch.sort((~dense).to(torch.int8), dim=1, stable=True).indices[:, :max_kv]
        keep = torch.arange(max_kv).unsqueeze(0) < counts.unsqueeze(1)
        indices = torch.where(keep, order, torch.zeros_like(order)).to(torch.int32)
        return cls(block_starts, counts, indices.contiguous(), int(block_size), description, grid)

    @classmethod
    def from_token_mask(
        cls,
        token_mask: torch.Tensor,
        block_starts: torch.Tensor,
        block_size: int,
        description: str = "token mask",
        grid: TokenGrid | None = None,
    ) -> BlockLayout:
        """The layout of a block-aligned token mask: bool [N, N] (True: attend) or additive 0 / -inf.

        Exact or refused: ValueError unless every block pair of `block_starts` is kept for all
        of its tokens or for none (such as block-causal over frames, which models pass for
        diffusion forcing), and for an additive mask with values other than 0 and -inf.
        Leading dimensions of size 1 ([1, 1, N, N], as models pass it) are accepted.
        """
        mask = token_mask
        while mask.dim() > 2 and mask.shape[0] == 1:
            mask = mask[0]
        starts = block_starts.to(torch.int64).cpu()
        seq_len = int(starts[-1])
        if mask.shape != (seq_len, seq_len):
            raise ValueError(f"token mask of shape {tuple(token_mask.shape)} is not [N, N] (or [1, 1, N, N]) "
                             f"for the {seq_len} tokens of the blocks")
        mask = mask.detach().cpu()
        if mask.dtype != torch.bool:
            if not mask.dtype.is_floating_point:
                raise ValueError(f"token mask of dtype {mask.dtype}: expected bool (True: attend) or an "
                                 "additive floating-point mask of 0 and -inf")
            if not bool(((mask == 0) | (mask == -math.inf)).all()):
                raise ValueError("an additive token mask with values other than 0 and -inf is a bias, "
                                 "not a block mask")
            mask = mask == 0
        blocks = starts.numel() - 1
        block = torch.repeat_interleave(torch.arange(blocks), starts[1:] - starts[:-1])
        kept = torch.zeros(blocks, blocks, dtype=torch.int64)
        for i in range(blocks):  # (one query block at a time: no N x N integer copy)
            per_key = mask[int(starts[i]):int(starts[i + 1])].sum(dim=0, dtype=torch.int64)
            kept[i].index_add_(0, block, per_key)
        lengths = starts[1:] - starts[:-1]
        area = lengths.unsqueeze(1) * lengths.unsqueeze(0)
        partial = (kept != 0) & (kept != area)
        if bool(partial.any()):
            i, j = (int(x) for x in partial.nonzero()[0])
            raise ValueError(
                f"token mask is not block-aligned: query block {i} (tokens {int(starts[i])}:{int(starts[i + 1])}) "
                f"keeps {int(kept[i, j])} of the {int(area[i, j])} token pairs with key block {j} "
                f"(tokens {int(starts[j])}:{int(starts[j + 1])})")
        return cls.from_dense(kept == area, starts, block_size, description, grid)

    def __and__(self, other: BlockLayout) -> BlockLayout:
        """The block pairs both layouts keep: a policy intersected with a structured mask, exactly.

        Both must cut the tokens into the same blocks; their token grids must agree where both
        are known.
        """
        if not isinstance(other, BlockLayout):
            return NotImplemented
        if not torch.equal(self.block_starts.cpu(), other.block_starts.cpu()):
            raise ValueError(f"cannot intersect {self!r} and {other!r}: they cut the tokens into different blocks")
        if self.grid is not None and other.grid is not None and self.grid != other.grid:
            raise ValueError(f"cannot intersect layouts of different token grids: ({self.grid.describe()}) "
                             f"and ({other.grid.describe()})")
        description = f"{self.description or 'custom'} & {other.description or 'custom'}"
        return BlockLayout.from_dense(self.to_dense() & other.to_dense(), self.block_starts,
                                      max(self.block_size, other.block_size), description,
                                      self.grid if self.grid is not None else other.grid)

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

    def describe(self) -> str:
        """The policy, the token grid and the block size in one line (ONNX's ``layout`` attribute)."""
        grid = f"{self.grid.describe()}, " if self.grid is not None else ""
        return f"{self.description or 'custom'}; {grid}block_size={self.block_size}"

    def __repr__(self) -> str:
        return (
            f"BlockLayout({self.description or 'custom'}, seq_len={self.seq_len}, "
            f"blocks={self.num_blocks}, block_size={self.block_size}, density={self.density:.3f})"
        )
