"""Graph-break-free equivalents of diffusers attention processors that dynamo cannot trace, and
`make_traceable`, which installs them.

diffusers' ``MochiAttnProcessor2_0`` loops over the batch and keeps each element's valid text tokens
with ``torch.nonzero``: an output shape that depends on data, so dynamo breaks the graph inside the
attention and the joint attention runs outside every graph the backend sees (dense, and every block cut
in pieces). `TraceableMochiAttnProcessor` computes the same numbers with static shapes: every text token
stays in the sequence and the invalid ones are masked out as keys, a key-padding mask over
``[video, text]`` that the backend combines with its block mask at run time.

This module never imports diffusers: it reads the classes of the diffusers modules already imported.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from t4dopt.errors import T4DWarning


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's interleaved rotary embedding (even/odd channel pairs), computed in float32 as diffusers does."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], dim=-1).flatten(-2)


def _heads(projection: torch.nn.Module, norm: torch.nn.Module | None, x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, C] -> projected, split into heads, normalised: [B, N, H, D]."""
    x = projection(x).unflatten(2, (heads, -1))
    return norm(x) if norm is not None else x


class TraceableMochiAttnProcessor:
    """diffusers' ``MochiAttnProcessor2_0`` with static shapes: the same outputs for any text mask.

    Mochi attends over video + the valid text tokens of each batch element, then compacts the valid text
    outputs to the front of the text part and pads zeros after them. Here all text tokens stay in the
    sequence: a key mask ``[B, 1, 1, video + text]`` removes the invalid text keys (no query row is
    empty: video keys are always valid), so each valid row sees exactly the keys Mochi gives it; after the
    attention, the invalid text rows are zeroed and a stable sort of the mask moves the valid ones to the
    front in their order, as Mochi's ``nonzero`` + ``pad`` does (for masks that are not a prefix too). A
    valid token is a nonzero mask entry, as for ``torch.nonzero``.
    """

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        query = _heads(attn.to_q, attn.norm_q, hidden_states, attn.heads)
        key = _heads(attn.to_k, attn.norm_k, hidden_states, attn.heads)
        value = _heads(attn.to_v, None, hidden_states, attn.heads)
        text_query = _heads(attn.add_q_proj, attn.norm_added_q, encoder_hidden_states, attn.heads)
        text_key = _heads(attn.add_k_proj, attn.norm_added_k, encoder_hidden_states, attn.heads)
        text_value = _heads(attn.add_v_proj, None, encoder_hidden_states, attn.heads)
        if image_rotary_emb is not None:
            query, key = _rotary(query, *image_rotary_emb), _rotary(key, *image_rotary_emb)

        video_length, text_length = query.size(1), text_query.size(1)
        valid = attention_mask != 0  # [B, T]
        keep = torch.cat([valid.new_ones(valid.size(0), video_length), valid], dim=1)
        joint = [torch.cat(pair, dim=1).transpose(1, 2) for pair in
                 ((query, text_query), (key, text_key), (value, text_value))]
        out = F.scaled_dot_product_attention(*joint, attn_mask=keep[:, None, None, :], dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3)
        hidden_states, encoder_hidden_states = out.split_with_sizes((video_length, text_length), dim=1)

        # Mochi's text output: the valid rows first, in order, then zeros.
        encoder_hidden_states = encoder_hidden_states * valid[..., None].to(encoder_hidden_states.dtype)
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
        encoder_hidden_states = torch.take_along_dim(encoder_hidden_states, order[..., None], dim=1)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class Replacement(NamedTuple):
    """A diffusers processor dynamo cannot trace and its traceable equivalent."""

    module: str
    """The diffusers module that defines the processor and the attention it serves."""
    processor: str
    """The processor's class name there."""
    attention: str
    """The attention module's class name there (its other processors are reported as left)."""
    make: type
    """The equivalent processor's class."""


REPLACEMENTS = (Replacement("diffusers.models.attention_processor", "MochiAttnProcessor2_0", "MochiAttention",
                            TraceableMochiAttnProcessor),)


class Known(NamedTuple):
    """A `Replacement` with diffusers' classes loaded."""

    processor: type
    attention: type
    replacement: Replacement


def _known() -> list[Known]:
    """The `REPLACEMENTS` of diffusers modules already imported: a model or a frame holding one of their
    processors has imported its module, so nothing else needs diffusers imported."""
    found = []
    for replacement in REPLACEMENTS:
        module = sys.modules.get(replacement.module)
        processor, attention = (getattr(module, name, None) for name in (replacement.processor, replacement.attention))
        if isinstance(processor, type) and isinstance(attention, type):
            found.append(Known(processor, attention, replacement))
    return found


def break_fix(filename: str, lineno: int) -> str | None:
    """The call that avoids a graph break at `filename`:`lineno` when it lies in the ``__call__`` of a processor
    `make_traceable` replaces, else None (`t4dopt.passes.graph_breaks`).

    Matched by the source file and line range of the known processors' ``__call__``, so a user's processor
    of the same name is not mistaken for it.
    """
    for known in _known():
        call = known.processor.__call__
        try:
            lines, start = inspect.getsourcelines(call)
            source = inspect.getsourcefile(call)
        except (OSError, TypeError):  # no source shipped
            continue
        if source is not None and _same_file(source, filename) and start <= lineno < start + len(lines):
            name = known.replacement.processor
            return (f"call `t4dopt.make_traceable(model)` before compiling (`t4dopt.enable(model_or_pipe, ...)` "
                    f"does it): it installs a graph-break-free equivalent of diffusers' {name} (on attentions whose "
                    f"processor is that class exactly; a subclass of it is left as it is)")
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def make_traceable(model: torch.nn.Module) -> list[str]:
    """Install graph-break-free equivalents of the diffusers attention processors dynamo cannot trace; returns
    the module paths changed.

    Why: a processor that makes shapes from data (Mochi's ``torch.nonzero`` over the text mask) breaks
    dynamo's graph inside the attention, so the attention runs outside every graph turbo4d sees: never
    sparse, and the blocks are cut in pieces the cache cannot use. The replacement computes the same
    outputs (`TraceableMochiAttnProcessor`); call this before compiling (`t4dopt.enable` does).

    Only modules whose processor is exactly diffusers' class are changed; a subclass or another processor
    on such an attention may compute something else, so it is left as it is, with a `T4DWarning` naming it.
    Calling it again changes nothing (returns ``[]``). A model without diffusers' processors is left as it is
    (diffusers is not imported for it).
    """
    model = getattr(model, "_orig_mod", model)
    known = _known()
    if not known:
        return []
    swapped, left = [], []
    for path, module in model.named_modules():
        processor: Any = getattr(module, "processor", None)
        if processor is None:
            continue
        exact = next((k for k in known if type(processor) is k.processor), None)
        if exact is not None:
            module.processor = exact.replacement.make()
            swapped.append(path)
        elif any(isinstance(processor, k.processor) or (isinstance(module, k.attention) and
                                                        not isinstance(processor, k.replacement.make)) for k in known):
            left.append(f"{path or type(model).__name__} ({type(processor).__name__})")
    if left:
        warnings.warn(f"turbo4d: make_traceable left {len(left)} attention processor(s) as they are, not diffusers' "
                      f"own (a subclass or another processor may compute something else; a graph break inside one "
                      f"keeps its attention dense): {', '.join(left)}", T4DWarning, stacklevel=2)
    return swapped
