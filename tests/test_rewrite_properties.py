"""Property: a compiled model equals either the unmasked model (site left dense) or the model with the mask
computed from its TRUE token layout (site made sparse), never anything else.

Hypothesis builds small random attention models: the token layout of the input (frame-major [B, F, P, C],
token-major [B, P, F, C], [B, F, H, W, C] and [B, H, W, F, C] flattened, already packed [B, F*P, C], a Conv3d
or a per-frame Conv2d patch embedding), a reordering of the tokens (flip, roll, an index permutation,
index_select) before queries, keys and values or before keys and values only, global tokens before and after
the video (a learned parameter or another input), where keys and values come from (the same tensor, another
tensor of the same length, partly another), rotary embeddings (rotate-half, interleaved, complex), every
unmasked spelling of `t4dopt.passes.spellings` (the rows of tests/test_spellings.py), dtypes, layout options
(none, right, with height and width, wrong) and ``trust_layout`` (with a right option on a frame-major model).
Each is compiled with turbo4d (``target="eager"``, a small block size); the report says what became of its
one attention site, and the output must equal the matching reference: the model run eagerly, or the model
with that attention computed here in float64 under the boolean mask built from the token labels the
construction knows (frame and token of each position, or global), by the Sculpt4D rule written out below
(`tests/reference.py`; nothing of t4dopt's masks is used for it).

Beside soundness, `expected_sparse` says when the construction is one the graph proves (frame-major order,
one sequence, a patch embedding or a right and unambiguous option): there the site must be sparse, so the
property cannot hold by leaving everything dense.

Profiles: ``ci`` (default; fixed seed, derandomized, about a minute on 2 CPU cores) and ``long`` (by hand):

    HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_rewrite_properties.py -s
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import t4dopt
from reference import sculpt4d_token_mask
from t4dopt.report import collecting
from test_spellings import D as HEAD_DIM
from test_spellings import ROWS

settings.register_profile("ci", max_examples=80, derandomize=True, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("long", max_examples=1500, deadline=None, database=None,
                          suppress_health_check=list(HealthCheck), print_blob=True)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HEADS = 2
DIM = HEADS * HEAD_DIM
IN_CHANNELS = 3
STRIDES, ANCHOR = (1, 2), 1
SPELLINGS = [row for row in ROWS if not row.masked and "N" not in row.fn.__code__.co_names]
LAYOUTS = ("frame-major", "token-major", "bfhwc", "bhwfc", "packed", "conv3d", "conv2d")
FRAME_MAJOR_LAYOUTS = ("frame-major", "bfhwc", "packed", "conv3d", "conv2d")
REORDERS = ("none", "flip", "roll", "perm", "index_select")
PROVENANCES = ("same", "kv-other", "kv-partly-other", "v-other")
ROPES = ("none", "rotate-half", "interleaved", "complex")
HINTS = ("none", "frames+tokens", "frames+hw", "all", "wrong")
MASKS = ("none", "keys-bool", "keys-additive", "ones", "frame-causal")


@dataclass(frozen=True)
class Spec:
    batch: int
    frames: int
    height: int
    width: int
    layout: str
    reorder: str
    reorder_kv_only: bool
    prefix: int
    suffix: int
    global_from_input: bool
    provenance: str
    rope: str
    spelling: int
    dtype: torch.dtype
    hints: str
    trust: bool
    block_size: int
    mask: str = "none"

    @property
    def tokens(self) -> int:
        return self.height * self.width

    @property
    def video(self) -> int:
        return self.frames * self.tokens

    @property
    def length(self) -> int:
        return self.prefix + self.video + self.suffix


@st.composite
def specs(draw) -> Spec:
    layout = draw(st.sampled_from(LAYOUTS + FRAME_MAJOR_LAYOUTS))  # provable ones twice as often
    frames = draw(st.integers(2, 4))
    height, width = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    if height * width < 2:
        width = 2
    dtype = draw(st.sampled_from([torch.float32] * 6 + [torch.bfloat16, torch.float16, torch.float64]))
    spelling = draw(st.integers(0, len(SPELLINGS) - 1)) if dtype == torch.float32 else 0  # unmasked sites only
    trust = draw(st.booleans()) if layout in FRAME_MAJOR_LAYOUTS else False
    return Spec(
        batch=draw(st.integers(1, 2)), frames=frames, height=height, width=width, layout=layout,
        reorder=draw(st.sampled_from(REORDERS[:1] * 6 + REORDERS[1:])), reorder_kv_only=draw(st.booleans()),
        prefix=draw(st.sampled_from([0, 0, 1, 3])), suffix=draw(st.sampled_from([0, 0, 0, 2])),
        global_from_input=draw(st.booleans()),
        provenance=draw(st.sampled_from(PROVENANCES[:1] * 7 + PROVENANCES[1:])),
        rope=draw(st.sampled_from(ROPES)), spelling=spelling, dtype=dtype,
        hints=draw(st.sampled_from(HINTS)) if not trust else draw(st.sampled_from(HINTS[1:4])),
        trust=trust, block_size=draw(st.sampled_from([1, 2, 3])),
        mask=draw(st.sampled_from(MASKS[:1] * 4 + MASKS[1:])),
    )


# --- the model, and the labels its construction gives each position -----------------------------


def video_labels(spec: Spec) -> list[tuple[int, int]]:
    """(frame, token in frame) of each position of the video tokens, as the layout builds them."""
    f_, p_ = spec.frames, spec.tokens
    if spec.layout == "token-major":
        return [(n % f_, n // f_) for n in range(spec.video)]
    if spec.layout == "bhwfc":
        return [(n % f_, n // f_) for n in range(spec.video)]
    return [(n // p_, n % p_) for n in range(spec.video)]


def _reordering(spec: Spec) -> torch.Tensor:
    """The index of the original position each reordered position reads (identity for "none")."""
    n = torch.arange(spec.video)
    if spec.reorder == "flip":
        return n.flip(0)
    if spec.reorder == "roll":
        return n.roll(spec.tokens + 1)
    if spec.reorder in ("perm", "index_select"):
        return torch.randperm(spec.video, generator=torch.Generator().manual_seed(spec.video))
    return n


class RandomAttention(nn.Module):
    """One self-attention over prefix + video + suffix tokens, built as `spec` says."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        torch.manual_seed(100 * spec.frames + 10 * spec.height + spec.width)
        in_dim = IN_CHANNELS if spec.layout in ("conv3d", "conv2d") else DIM
        self.conv3d = nn.Conv3d(in_dim, DIM, (1, 2, 2), (1, 2, 2))
        self.conv2d = nn.Conv2d(in_dim, DIM, 2, 2)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.prefix = nn.Parameter(torch.randn(spec.prefix, DIM))
        self.suffix = nn.Parameter(torch.randn(spec.suffix, DIM))
        n = spec.length
        self.register_buffer("cos", torch.randn(n, HEAD_DIM))
        self.register_buffer("sin", torch.randn(n, HEAD_DIM))
        self.register_buffer("angles", torch.randn(n, HEAD_DIM // 2))
        self.register_buffer("order", _reordering(spec))
        self.query_frames = [-1 if label[0] == "g" else label[0] for label in true_labels_of_queries(spec)]
        self.attend = self._spelled

    def inputs(self, seed: int = 0) -> list[torch.Tensor]:
        s, g = self.spec, torch.Generator().manual_seed(seed)
        shape = {
            "frame-major": (s.batch, s.frames, s.tokens, DIM), "token-major": (s.batch, s.tokens, s.frames, DIM),
            "bfhwc": (s.batch, s.frames, s.height, s.width, DIM), "bhwfc": (s.batch, s.height, s.width, s.frames, DIM),
            "packed": (s.batch, s.video, DIM), "conv3d": (s.batch, IN_CHANNELS, s.frames, 2 * s.height, 2 * s.width),
            "conv2d": (s.batch, s.frames, IN_CHANNELS, 2 * s.height, 2 * s.width),
        }[s.layout]
        x, other = (torch.randn(*shape, generator=g) for _ in range(2))
        text = torch.randn(s.batch, s.prefix + s.suffix, DIM, generator=g)
        keep = torch.ones(s.batch, s.length, dtype=torch.bool)  # text padding: some global tokens masked as keys
        globals_ = [n for n in range(s.length) if n < s.prefix or n >= s.prefix + s.video]
        for b in range(s.batch):
            for n in globals_[b::2]:
                keep[b, n] = False
        return [t.to(s.dtype) for t in (x, other, text)] + [keep]

    def _video(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.layout in ("frame-major", "token-major"):
            return x.flatten(1, 2)
        if s.layout in ("bfhwc", "bhwfc"):
            return x.flatten(1, 3)
        if s.layout == "packed":
            return x
        if s.layout == "conv3d":
            return self.conv3d(x).flatten(2).transpose(1, 2)
        b, f, c, h, w = x.shape
        patches = self.conv2d(x.reshape(b * f, c, h, w))
        return patches.view(b, f, DIM, -1).transpose(2, 3).flatten(1, 2)

    def _reordered(self, t: torch.Tensor) -> torch.Tensor:
        s = self.spec
        if s.reorder == "flip":
            return t.flip(1)
        if s.reorder == "roll":
            return t.roll(s.tokens + 1, 1)
        if s.reorder == "perm":
            return t[:, self.order]
        if s.reorder == "index_select":
            return t.index_select(1, self.order)
        return t

    def _sequence(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        s, b = self.spec, video.shape[0]
        if s.global_from_input:
            prefix, suffix = text[:, :s.prefix], text[:, s.prefix:]
        else:
            prefix, suffix = self.prefix.expand(b, -1, -1), self.suffix.expand(b, -1, -1)
        return torch.cat([prefix, video, suffix], 1)

    def _rope(self, z: torch.Tensor) -> torch.Tensor:
        rope = self.spec.rope
        if rope == "rotate-half":
            z1, z2 = z.chunk(2, -1)
            return z * self.cos + torch.cat([-z2, z1], -1) * self.sin
        if rope == "interleaved":
            z1, z2 = z.unflatten(-1, (-1, 2)).unbind(-1)
            cos, sin = self.cos, self.sin
            out = torch.empty_like(z)
            out[..., 0::2] = z1 * cos[..., 0::2] - z2 * sin[..., 1::2]
            out[..., 1::2] = z1 * sin[..., 1::2] + z2 * cos[..., 0::2]
            return out.type_as(z)
        if rope == "complex":
            zc = torch.view_as_complex(z.float().reshape(*z.shape[:-1], -1, 2))
            freqs = torch.polar(torch.ones_like(self.angles.float()), self.angles.float())
            return torch.view_as_real(zc * freqs).flatten(-2).to(z.dtype)
        return z

    def _model_mask(self, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask the model passes its attention (a key mask from an input, or a constant one)."""
        s, n = self.spec, self.spec.length
        if s.mask == "keys-bool":
            return keep.view(s.batch, 1, 1, n)
        if s.mask == "keys-additive":
            return torch.zeros(s.batch, 1, 1, n, dtype=dtype).masked_fill(~keep.view(s.batch, 1, 1, n), float("-inf"))
        if s.mask == "ones":
            return torch.ones(n, n, dtype=torch.bool)
        if s.mask == "frame-causal":  # block-causal over the true frames: built from constants in the graph
            frames = torch.tensor(self.query_frames)
            later = frames.view(1, n) <= frames.view(n, 1)
            return (later | (frames.view(1, n) < 0) | (frames.view(n, 1) < 0)).view(1, 1, n, n)
        return None

    def _spelled(self, q, k, v, mask=None):
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=_scale_of(self.spec))
        row = SPELLINGS[self.spec.spelling]
        if row.batched_3d:
            b, h = q.shape[:2]
            q3, k3, v3 = (t.reshape(b * h, *t.shape[2:]) for t in (q, k, v))
            return row.fn(q3, k3.transpose(-2, -1) if row.key_given_transposed else k3, v3, None).view(b, h, *q.shape[2:])
        return row.fn(q, k.transpose(-2, -1) if row.key_given_transposed else k, v, None)

    def forward(self, x, other, text, keep):
        s = self.spec
        video = self._video(x)
        videos = {"q": self._reordered(video) if not s.reorder_kv_only else video,
                  "k": self._reordered(video), "v": self._reordered(video)}
        if s.provenance != "same":
            alien = self._video(other)
            if s.provenance == "kv-partly-other":
                alien = torch.cat([videos["k"][:, :s.tokens], alien[:, s.tokens:]], 1)
            for role in ("v",) if s.provenance == "v-other" else ("k", "v"):
                videos[role] = alien
        weights, biases = self.qkv.weight.chunk(3), self.qkv.bias.chunk(3)
        q, k, v = (F.linear(self._sequence(videos[r], text), w, b_) for r, w, b_ in zip("qkv", weights, biases))
        q, k, v = [t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in (q, k, v)]
        out = self.attend(self._rope(q), self._rope(k), v, self._model_mask(keep, x.dtype))
        return self.out(out.transpose(1, 2).flatten(2))


# --- the reference: the true labels, the Sculpt4D rule on them (tests/reference.py), a float64 softmax ------


def true_labels_of_queries(spec: Spec) -> list:
    """Labels of the query positions as the construction builds them (("g",) for global tokens)."""
    video = video_labels(spec)
    if not spec.reorder_kv_only:
        video = [video[i] for i in _reordering(spec).tolist()]
    return [("g",)] * spec.prefix + video + [("g",)] * spec.suffix


def true_labels(spec: Spec) -> tuple[list, list] | None:
    """Labels of each query and key position (("g",) for global tokens), or None when keys and values
    are not the queries' tokens (no mask has a meaning there)."""
    if spec.provenance != "same" or (spec.reorder != "none" and spec.reorder_kv_only):
        return None
    video = video_labels(spec)
    order = _reordering(spec).tolist()
    video = [video[i] for i in order]
    labels = [("g",)] * spec.prefix + video + [("g",)] * spec.suffix
    return labels, labels


def true_mask(spec: Spec) -> torch.Tensor | None:
    found = true_labels(spec)
    if found is None:
        return None
    queries, keys = found
    queries, keys = ([None if x[0] == "g" else x for x in labels] for labels in (queries, keys))
    return sculpt4d_token_mask(queries, keys, block_size=spec.block_size, strides=STRIDES, anchor_frames=ANCHOR)


def _scale_of(spec: Spec) -> float:
    scale = SPELLINGS[spec.spelling].scale
    return 1.0 / math.sqrt(HEAD_DIM) if scale is None else scale


def masked_model(model: RandomAttention, mask: torch.Tensor, inputs) -> torch.Tensor:
    """The model with its attention computed in float64 under `mask` (query, key), written out here."""
    scale = _scale_of(model.spec)

    def attend(q, k, v, model_mask=None):
        scores = (q.double() @ k.double().transpose(-2, -1)) * scale
        if model_mask is not None and model_mask.dtype == torch.bool:
            scores = scores.masked_fill(~model_mask, float("-inf"))
        elif model_mask is not None:
            scores = scores + model_mask.double()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1).matmul(v.double()).to(q.dtype)

    model.attend = attend
    try:
        return model(*inputs)
    finally:
        model.attend = model._spelled


def wrong_hint(spec: Spec) -> dict:
    """A layout option that is wrong about the model: frames and tokens swapped on a frame-major model, else a
    wrong prefix count.

    A swapped option on a token-major model is not among them: there it reads the graph exactly as the right
    option reads the frame-major model with swapped sizes (the two draw the same graph), so no analysis can
    tell; the layout option is the user's word about which axis is time, checked wherever the graph can check it.
    """
    if spec.layout in FRAME_MAJOR_LAYOUTS and spec.frames != spec.tokens:
        return {"frames": spec.tokens, "tokens_per_frame": spec.frames}
    return {"frames": spec.frames, "tokens_per_frame": spec.tokens, "prefix_tokens": spec.prefix + 1}


def options_for(spec: Spec) -> dict:
    layout = {}
    if spec.hints in ("frames+tokens", "all"):
        layout = {"frames": spec.frames, "tokens_per_frame": spec.tokens}
    elif spec.hints == "frames+hw":
        layout = {"frames": spec.frames, "height": spec.height, "width": spec.width}
    elif spec.hints == "wrong":  # wrong in a way the graph shows (see `wrong_hint`)
        layout = wrong_hint(spec)
    if spec.hints == "all":
        layout.update(prefix_tokens=spec.prefix, suffix_tokens=spec.suffix)
    return {"layout": layout, "target": "eager", "trust_layout": spec.trust,
            "sparse": {"policy": "sculpt4d", "block_size": spec.block_size, "strides": STRIDES, "anchor_frames": ANCHOR}}


def expected_sparse(spec: Spec) -> bool:
    """Whether the graph proves this construction (or the option is trusted on a frame-major one): sparse."""
    if (spec.provenance != "same" or spec.reorder != "none" or spec.dtype == torch.float64
            or spec.hints == "wrong" or spec.layout not in FRAME_MAJOR_LAYOUTS):
        return False
    if spec.layout in ("conv3d", "conv2d"):
        return True
    if spec.hints == "none":
        return False
    if spec.trust:
        return True
    digits = {"frame-major": [spec.frames, spec.tokens], "bfhwc": [spec.frames, spec.height, spec.width],
              "packed": [spec.video]}[spec.layout]
    digits = [d for d in digits if d > 1]
    if spec.layout == "packed" or digits[0] != spec.frames:
        return False
    return spec.frames not in digits[1:]


TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-6, torch.bfloat16: 4e-2, torch.float16: 1e-2}


def check(spec: Spec) -> str:
    """Compile the model of `spec`, check its output against the reference its decision names; the decision."""
    model = RandomAttention(spec).to(spec.dtype).eval()
    inputs = model.inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="turbo4d", options=options_for(spec))
    with torch.no_grad(), collecting() as report, warnings.catch_warnings():
        warnings.simplefilter("ignore", t4dopt.T4DWarning)
        got = compiled(*inputs)
    (site,) = report.sites
    with torch.no_grad():
        if site.action == "sparse":
            mask = true_mask(spec)
            assert mask is not None, f"sparse although keys/values are not the queries' tokens: {site.evidence}"
            want = masked_model(model, mask, inputs)
        else:
            want = model(*inputs)
    scale = want.double().abs().max().clamp(min=1e-3)
    error = float((got.double() - want.double()).abs().max() / scale)
    assert error <= TOLERANCE[spec.dtype], (site.action, site.evidence, site.reason, error)
    if expected_sparse(spec):
        assert site.action == "sparse", (site.evidence, site.reason)
    return site.action


@PROFILE
@given(spec=specs())
def test_compiled_output_is_the_dense_model_or_the_true_layout_mask(spec):
    event(check(spec))
