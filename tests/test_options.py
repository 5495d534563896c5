import importlib.util
import re
from pathlib import Path

import pytest
import torch

import t4dopt
from support import cause_chain
from t4dopt.options import CacheSpec, parse_options


@pytest.mark.parametrize(
    "options, names",
    [
        ({"sparsity": "sculpt4d"}, ["sparsity", "allowed", "layout"]),
        ({"target": "tvm"}, ["target", "tvm", "inductor", "eager", "tensorrt"]),
        ({"strict": "yes"}, ["strict", "yes", "True or False"]),
        ({"verify": 1}, ["verify", "1", "True or False"]),
        ({"layout": {"frame": 16}}, ["layout['frame']", "tokens_per_frame"]),
        ({"layout": {"frames": 0}}, ["layout['frames']", "0", ">= 1"]),
        ({"layout": {"frames": 2.5}}, ["layout['frames']", "2.5"]),
        ({"layout": {"prefix_tokens": -1}}, ["layout['prefix_tokens']", "-1", ">= 0"]),
        ({"layout": {"suffix_tokens": -3}}, ["layout['suffix_tokens']", "-3", ">= 0"]),
        ({"layout": {"suffix_tokens": True}}, ["layout['suffix_tokens']", "True", "integer"]),
        ({"layout": {"suffix_tokens": 1.5}}, ["layout['suffix_tokens']", "1.5"]),
        ({"layout": {"height": 4, "width": 4, "tokens_per_frame": 15}}, ["tokens_per_frame", "15", "16"]),
        ({"layout": [16, 4096]}, ["layout", "dict"]),
        ({"sparse": "sculpt5d"}, ["sparse['policy']", "sculpt5d", "sculpt4d"]),
        ({"sparse": 3}, ["sparse", "3", "policy name"]),
        ({"sparse": {"policy": "window", "stride": 2}}, ["sparse['stride']", "window", "block_size"]),
        ({"sparse": {"block_size": 0}}, ["block_size", "0"]),
        ({"sparse": {"strides": []}}, ["strides", "[]"]),
        ({"sparse": {"anchor_frames": -2}}, ["anchor_frames", "-2"]),
        ("sculpt4d", ["options", "dict"]),
        # parameters that leave nothing to skip on any video
        ({"sparse": {"strides": [1]}}, ["sparse=", "'strides': [1]", "keeps every block pair", "sparse=None"]),
        ({"sparse": {"strides": (1, 1, 1)}}, ["keeps every block pair"]),
        ({"sparse": {"policy": "window", "window": 1000}}, ["'window': 1000", "keeps every block pair"]),
        ({"sparse": {"anchor_frames": 10**6}}, ["'anchor_frames': 1000000", "keeps every block pair"]),
        ({"sparse": {"policy": "fixed-stride", "stride": 1}}, ["'stride': 1", "keeps every block pair"]),
        ({"sparse": lambda qf, qb, kf, kb: True}, ["<lambda>", "keeps every block pair"]),
        # parameters the layout option contradicts
        ({"layout": {"frames": 4}, "sparse": {"anchor_frames": 5}}, ["sparse['anchor_frames']=5", "layout['frames']=4"]),
        ({"layout": {"frames": 2}, "sparse": {"policy": "fixed-stride", "anchor_frames": 3}},
         ["sparse['anchor_frames']=3", "layout['frames']=2"]),
        # cache settings
        ({"cache": {"levels": []}}, ["cache['levels']=[]", "non-empty", "cache=None"]),
        ({"cache": {"levels": ()}}, ["cache['levels']=()", "non-empty"]),
        ({"cache": {"order": 1.0}}, ["cache['order']=1.0", "an integer"]),
        ({"cache": {"order": True}}, ["cache['order']=True"]),
        ({"cache": {"order": 0.0}}, ["cache['order']=0.0"]),
        ({"cache": {"final": 2}}, ["cache['final']=2", "cache['steps']"]),
        ({"cache": {"final": 1, "warmup": 1}}, ["cache['final']=1", "cache['steps']"]),
        ({"cache": {"final": 1, "steps": None}}, ["cache['final']=1", "cache['steps']"]),
        ({"cache": {"threshold": float("nan")}}, ["cache['threshold']=nan", ">= 0"]),
        ({"cache": {"threshold": float("inf")}}, ["cache['threshold']=inf"]),
        ({"cache": {"token_ratio": float("nan")}}, ["cache['token_ratio']=nan"]),
        ({"cache": {"token_ratio": 0}}, ["cache['token_ratio']=0", "(0, 1]"]),
        ({"cache": {"steps": 2.0}}, ["cache['steps']=2.0", "integer"]),
        ({"cache": {"warmup": None}}, ["cache['warmup']=None"]),
        ({"cache": CacheSpec(threshold=-1.0)}, ["cache['threshold']=-1.0"]),
        ({"cache": CacheSpec(levels=())}, ["cache['levels']=()"]),
        ({"cache": CacheSpec(order=5)}, ["cache['order']=5"]),
    ],
)
def test_bad_options_name_option_value_and_allowed(options, names):
    with pytest.raises(t4dopt.T4DOptionError) as error:
        t4dopt.check_options(options)
    for name in names:
        assert name in str(error.value)
    with pytest.raises(t4dopt.T4DOptionError, match=re.escape(str(error.value))):
        parse_options(options)  # the backend's own check is the same one


def _none(qf, qb, kf, kb):
    return None


def _int_valued(qf, qb, kf, kb):
    return (qb - kb) % 2


def _raises_far_away(i, u, j, v):
    if abs(i - j) > 40:
        raise IndexError("no stride table entry that far")
    return u == v


def _keeps_nothing(qf, qb, kf, kb):
    return qf < 0


def _forgets_block_one(qf, qb, kf, kb):
    return (qf == kf) & (qb != 1)


@pytest.mark.parametrize("rule, names", [
    (_none, ["_none", "sparse={'policy': '_none'}", "returned None", "query (frame 0, block 0)"]),
    (_int_valued, ["_int_valued", "returned torch.int64 values", "bool"]),
    (_raises_far_away, ["_raises_far_away", "raised IndexError (no stride table entry that far)",
                        "query (frame 0, block 0) and key (frame 41, block 0)"]),
    (_keeps_nothing, ["_keeps_nothing", "query block (frame 0, block 0) keeps no key block (192 such"]),
    (_forgets_block_one, ["_forgets_block_one", "query block (frame 0, block 1) keeps no key block (64 such"]),
])
def test_a_callable_policy_is_tried_on_a_grid_before_the_first_call(rule, names):
    with pytest.raises(t4dopt.T4DOptionError) as error:
        t4dopt.check_options({"sparse": rule})
    for name in names:
        assert name in str(error.value)
    with pytest.raises(t4dopt.T4DOptionError, match=re.escape(names[0])):
        t4dopt.check_options({"sparse": {"policy": rule, "block_size": 32}})


def test_a_policy_that_raises_keeps_its_error_as_the_cause():
    with pytest.raises(t4dopt.T4DOptionError) as error:
        t4dopt.check_options({"sparse": _raises_far_away})
    assert isinstance(error.value.__cause__, ValueError) and isinstance(error.value.__cause__.__cause__, IndexError)


def test_option_errors_carry_the_option_the_value_and_what_is_allowed():
    with pytest.raises(t4dopt.T4DOptionError) as error:
        t4dopt.check_options({"cache": {"order": 5}})
    assert (error.value.option, error.value.value) == ("cache['order']", 5)
    assert "0 (reuse the residual as stored), 1 (extrapolate it along its slope) or 2" in error.value.allowed


@pytest.mark.parametrize("options", [{"target": "tvm"}, {"cache": {"levels": []}}, {"sparse": _none}])
def test_bad_options_raise_from_torch_compile_as_the_inner_exception(options):
    """Dynamo wraps what a backend raises in BackendCompilerFailed; the T4DOptionError check_options raises
    directly is its ``inner_exception`` (README, Errors)."""
    with pytest.raises(t4dopt.T4DOptionError) as direct:
        t4dopt.check_options(options)
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="turbo4d", options=options)
    with pytest.raises(Exception) as error:
        compiled(torch.randn(2, 4))
    assert t4dopt.T4DOptionError in cause_chain(error.value)
    assert type(error.value).__name__ == "BackendCompilerFailed"
    assert isinstance(error.value.inner_exception, t4dopt.T4DOptionError)
    assert str(error.value.inner_exception) == str(direct.value)
    torch._dynamo.reset()


def test_tensorrt_target_without_tensorrt_names_the_extra():
    if importlib.util.find_spec("torch_tensorrt") is not None:
        pytest.skip("torch_tensorrt is installed: the target lowers instead of failing")
    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(4, 4), backend="turbo4d", options={"target": "tensorrt"})
    with pytest.raises(Exception, match="t4dopt\\[tensorrt\\]"):
        compiled(torch.randn(2, 4))


def test_good_options_are_normalised():
    options = parse_options({"layout": {"frames": 4, "height": 8, "width": 6}, "sparse": {"block_size": 16},
                             "target": "eager", "strict": True, "verify": True})
    assert options.layout.tokens_per_frame == 48
    assert options.layout.suffix_tokens is None
    with_text = parse_options({"layout": {"frames": 4, "tokens_per_frame": 6, "prefix_tokens": 0, "suffix_tokens": 7}})
    assert (with_text.layout.prefix_tokens, with_text.layout.suffix_tokens) == (0, 7)
    assert options.sparse.policy == "sculpt4d" and dict(options.sparse.params) == {"block_size": 16}
    assert (options.target, options.strict, options.verify) == ("eager", True, True)
    assert parse_options(None).sparse is None
    assert parse_options({"sparse": "window"}).sparse.policy == "window"
    rule = lambda qf, qb, kf, kb: qb == kb  # noqa: E731
    assert parse_options({"sparse": rule}).sparse.policy is rule


def test_good_cache_options_are_normalised():
    assert t4dopt.check_options({"cache": {"final": 2, "steps": 10}}).cache.final == 2
    assert t4dopt.check_options({"cache": {"final": 0}}).cache.final == 0
    assert t4dopt.check_options({"cache": {"steps": 10}}).cache.final == 1   # the default, with steps
    assert t4dopt.check_options({"cache": {}}).cache == CacheSpec()          # final=1 without steps: the default
    assert t4dopt.check_options({"cache": True}).cache == CacheSpec()
    spec = t4dopt.check_options({"cache": {"levels": {"chain", "block"}, "order": 0, "threshold": 1}}).cache
    assert (spec.levels, spec.order, spec.threshold) == (("block", "chain"), 0, 1.0)
    assert t4dopt.check_options({"cache": spec}).cache == spec


def test_check_options_returns_the_parsed_options_and_leaves_good_callables_alone():
    def rule(qf, qb, kf, kb):
        return (qf == kf) | (qb == kb)

    options = t4dopt.check_options({"sparse": {"policy": rule, "block_size": 64}, "target": "eager"})
    assert options.sparse.policy is rule and options.sparse.params == {"block_size": 64}
    assert t4dopt.check_options({"layout": {"frames": 4}, "sparse": {"anchor_frames": 4}}).sparse.params == {
        "anchor_frames": 4}
    assert t4dopt.check_options(options) is options
    assert t4dopt.check_options(None) == parse_options(None)


def test_the_readme_errors_example_runs_and_prints_what_it_says(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Errors", 1)[1].split("\n### ", 1)[0]
    example = re.findall(r"```python\n(.+?)\n```", section, flags=re.S)[0]
    exec(compile(example, "README errors example", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("turbo4d option sparse['anchor_frames']=5 is not valid; allowed: at most layout['frames']=4")
