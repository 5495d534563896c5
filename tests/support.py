"""Test support: small attention models in the spellings real video DiTs use, and helpers."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def captured_graph(fn, *inputs):
    """The one FX graph dynamo captures for `fn(*inputs)` (fullgraph), as a backend receives it."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, fullgraph=True)(*inputs)
    torch._dynamo.reset()
    return graphs[0]


class JointVideoAttention(nn.Module):
    """Per-frame spatial SDPA, then joint attention over prefix + frames x tokens in a chosen spelling."""

    def __init__(self, dim=32, heads=2, spelling="sdpa", prefix=0, position_major=False):
        super().__init__()
        self.heads, self.spelling, self.prefix, self.position_major = heads, spelling, prefix, position_major
        self.spatial = nn.Linear(dim, 3 * dim)
        self.joint = nn.Linear(dim, 3 * dim)
        self.text = nn.Parameter(torch.randn(prefix, dim)) if prefix else None

    def _heads(self, x):
        b, n, c = x.shape
        return x.view(b, n, 3, self.heads, c // (3 * self.heads)).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        b, f, p, c = x.shape
        q, k, v = self._heads(self.spatial(x.reshape(b * f, p, c)))
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, f, p, c)
        if self.position_major:
            tokens = x.transpose(1, 2).reshape(b, p * f, c)
        else:
            tokens = x.reshape(b, f * p, c)
        if self.text is not None:
            tokens = torch.cat([self.text.expand(b, -1, -1), tokens], dim=1)
        q, k, v = self._heads(self.joint(tokens))
        d = c // self.heads
        if self.spelling == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.spelling == "sdpa_kwargs":
            out = F.scaled_dot_product_attention(query=q, key=k, value=v, scale=0.3, is_causal=False)
        elif self.spelling == "matmul_div":
            w = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)
            out = torch.matmul(w.softmax(dim=-1), v)
        elif self.spelling == "operator_mul_upcast":
            w = (q @ k.transpose(-1, -2)) * (d ** -0.5)
            out = w.float().softmax(-1).to(q.dtype) @ v
        elif self.spelling == "einsum":
            w = torch.einsum("bhid,bhjd->bhij", q, k).mul(0.2)
            out = torch.einsum("bhij,bhjd->bhid", F.softmax(w, dim=-1), v)
        elif self.spelling == "bmm_scaled_q":
            q3, k3, v3 = (t.reshape(b * self.heads, -1, d) for t in (q, k, v))
            w = torch.bmm(q3 * d ** -0.5, k3.transpose(1, 2))
            out = torch.bmm(torch.softmax(w, dim=-1), v3).view(b, self.heads, -1, d)
        elif self.spelling == "baddbmm":
            q3, k3, v3 = (t.reshape(b * self.heads, -1, d) for t in (q, k, v))
            unused = torch.empty(b * self.heads, q3.shape[1], q3.shape[1], dtype=q.dtype, device=q.device)
            w = torch.baddbmm(unused, q3, k3.transpose(-1, -2), beta=0, alpha=d ** -0.5)
            out = w.softmax(-1).bmm(v3).view(b, self.heads, -1, d)
        elif self.spelling == "masked":
            mask = torch.zeros(q.shape[-2], q.shape[-2], dtype=q.dtype, device=q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            raise ValueError(self.spelling)
        out = out.transpose(1, 2).reshape(b, -1, c)
        return out[:, self.prefix:].reshape(b, f, p, c) if not self.position_major else out


def dense_reference(model: JointVideoAttention, x: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """The same model with its joint attention computed in float64 under an explicit boolean mask."""
    b, f, p, c = x.shape
    d = c // model.heads
    q, k, v = model._heads(model.spatial(x.reshape(b * f, p, c)))
    x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, f, p, c)
    tokens = x.reshape(b, f * p, c)
    if model.text is not None:
        tokens = torch.cat([model.text.expand(b, -1, -1), tokens], dim=1)
    q, k, v = (t.double() for t in model._heads(model.joint(tokens)))
    scale = {"sdpa": d ** -0.5, "sdpa_kwargs": 0.3, "matmul_div": d ** -0.5, "operator_mul_upcast": d ** -0.5,
             "einsum": 0.2, "bmm_scaled_q": d ** -0.5, "baddbmm": d ** -0.5}[model.spelling]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~token_mask, float("-inf"))
    out = scores.softmax(-1) @ v
    out = out.transpose(1, 2).reshape(b, -1, c)
    return out[:, model.prefix:].reshape(b, f, p, c)


class OpAttention(nn.Module):
    """Attention through ``t4d::block_sparse_attention`` itself (a graph the passes leave as it is): the
    layout's table as buffers and an optional key mask argument, as a rewrite with those would write it."""

    def __init__(self, layout, dim=32, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.block_size = heads, layout.block_size
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        for name, tensor in zip(("kv_counts", "kv_indices", "block_starts"), layout.tensors()):
            self.register_buffer(name, tensor)

    def _heads(self, x):
        b, n, c = x.shape
        return self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)

    def forward(self, x, key_mask=None):
        q, k, v = self._heads(x)
        # (the overload, as the rewrite pass writes it: export code looks for that target)
        out = torch.ops.t4d.block_sparse_attention.default(q, k, v, self.kv_counts, self.kv_indices,
                                                            self.block_starts, self.block_size, None, key_mask)
        return self.proj(out.transpose(1, 2).reshape(x.shape))

    def reference(self, x, token_mask, key_mask=None):
        """The same model with `dense_masked_attention` (float64) in place of the op."""
        from reference import dense_masked_attention

        q, k, v = self._heads(x)
        out = dense_masked_attention(q, k, v, token_mask, key_mask=key_mask).to(x.dtype)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


def cause_chain(error: BaseException) -> list[type]:
    """Types along an exception's causes: dynamo wraps a backend's exception in BackendCompilerFailed."""
    chain = []
    while error is not None:
        chain.append(type(error))
        error = error.__cause__ or getattr(error, "inner_exception", None)
    return chain


class NoResidual(nn.Module):
    """Attention whose output replaces the tokens: no residual sublayer for the cache to reuse."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 4)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
