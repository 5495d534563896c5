"""Key masks the model passes (a text-padding mask), combined with the block mask: what they mean, in one place.

``key_mask`` is [B, N] (or [1, N], shared by the batch) over the N keys of q, k, v [B, H, N, D]:

* bool: True keeps key j for every query of batch element b, False removes it;
* floating point: added to the scaled scores of key j, as SDPA adds an ``attn_mask`` of shape
  [B, 1, 1, N]: -inf removes the key, 0 keeps it, other values bias it.

Query i of batch element b attends the keys its block keeps and the mask does not remove::

    out[b, h, i] = sum_j softmax_j(scale * q_i . k_j + bias[b, j]) v_j     over those keys j

A row left with no key at all comes out as zeros (log-sum-exp -inf), like a row whose block keeps
no key block. torch 2.13's SDPA also returns zeros for such rows on CPU (its math and flash
kernels, boolean or -inf masks; measured), while a hand-written masked softmax gives NaN there.
The mask takes no gradient: one that requires grad is refused.

A mask that keeps every key (HunyuanVideo passes an all-ones mask when no text is padded) is the
same as none: `effective` recognises it when the op runs and the kernels take their unmasked path,
so it costs one reduction over B x N values. Reading that answer back costs, on CUDA, one
synchronisation per call: the host waits for the work queued before it (microseconds, plus the
overlap between launching and running kernels that is lost once per attention call); small beside
an attention over thousands of tokens, and the price of not running the masked kernel. During
CUDA-graph capture, where synchronising is not allowed, the check is skipped and the masked path
runs (exact as well).
"""

from __future__ import annotations

import torch

from t4dopt.ops.schema import OP_NAME


def check(key_mask: torch.Tensor | None, q: torch.Tensor) -> None:
    """Shape, dtype and device checks of the op's `key_mask` (no tensor data read: they run on fake tensors too)."""
    if key_mask is None:
        return
    batch, _, seq_len, _ = q.shape
    if key_mask.dim() != 2 or key_mask.shape[1] != seq_len or key_mask.shape[0] not in (1, batch):
        raise ValueError(f"{OP_NAME}: key_mask must be [B, N] (or [1, N]) for q of shape {tuple(q.shape)}, "
                         f"got {tuple(key_mask.shape)}")
    if key_mask.dtype != torch.bool and not key_mask.dtype.is_floating_point:
        raise TypeError(f"{OP_NAME}: key_mask must be bool (True: attend) or floating point (added to the "
                        f"scores), got {key_mask.dtype}")
    if key_mask.device != q.device:
        raise ValueError(f"{OP_NAME}: key_mask is on {key_mask.device}, q on {q.device}")


def as_op_argument(key_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """A key mask as a model passes it to SDPA ([B, 1, 1, N], [B, N], or [N]) in the op's [B, N] form."""
    if key_mask is None:
        return None
    if key_mask.dim() == 4 and key_mask.shape[1:3] == (1, 1):
        key_mask = key_mask[:, 0, 0]
    elif key_mask.dim() == 1:
        key_mask = key_mask.unsqueeze(0)
    check(key_mask, q)
    return key_mask


def keeps_every_key(key_mask: torch.Tensor) -> bool:
    """Whether the mask removes and biases nothing (reads one value back from the device)."""
    if key_mask.dtype == torch.bool:
        return bool(key_mask.all())
    return bool((key_mask == 0).all())


def effective(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`key_mask`, or None when it keeps every key (not checked during CUDA-graph capture)."""
    if key_mask is None:
        return None
    if key_mask.is_cuda and torch.cuda.is_current_stream_capturing():
        return key_mask
    return None if keeps_every_key(key_mask) else key_mask


def as_bias(key_mask: torch.Tensor, batch: int | None, dtype: torch.dtype) -> torch.Tensor:
    """The additive bias in `dtype`: 0 / -inf for a bool mask, the values otherwise.

    [batch, N] and contiguous, or with `batch` None the mask's own [B or 1, N] (for code that broadcasts).
    """
    if key_mask.dtype == torch.bool:
        bias = torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill(~key_mask, -torch.inf)
    else:
        bias = key_mask.to(dtype)
    return bias if batch is None else bias.expand(batch, key_mask.shape[1]).contiguous()


def refuse_gradient(key_mask: torch.Tensor | None) -> None:
    if key_mask is not None and key_mask.requires_grad:
        raise ValueError(f"{OP_NAME}: key_mask requires grad, but the op gives it no gradient "
                         "(detach it, or keep the attention dense)")
