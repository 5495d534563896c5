import importlib.util

import pytest
import torch

import t4dopt
from support import cause_chain
from t4dopt.options import parse_options


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
    ],
)
def test_bad_options_name_option_value_and_allowed(options, names):
    with pytest.raises(t4dopt.T4DOptionError) as error:
        parse_options(options)
    for name in names:
        assert name in str(error.value)


def test_bad_options_raise_from_torch_compile():
    model = torch.nn.Linear(4, 4)
    compiled = torch.compile(model, backend="turbo4d", options={"target": "tvm"})
    with pytest.raises(Exception, match="target") as error:
        compiled(torch.randn(2, 4))
    assert t4dopt.T4DOptionError in cause_chain(error.value)


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
