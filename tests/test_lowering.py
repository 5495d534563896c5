"""The table of lowering targets: every target named in options lowers both kinds of graph it takes."""

import pytest
import torch
import torch.fx as fx

from t4dopt import lowering
from t4dopt.errors import T4DOptionError
from t4dopt.options import parse_options


class Tiny(torch.nn.Module):
    def forward(self, x):
        return (x * 2 + 1).relu()


def test_options_accept_exactly_the_targets_of_the_table():
    for name in lowering.TARGETS:
        assert parse_options({"target": name}).target == name
    with pytest.raises(T4DOptionError, match=r"target='cpp'.*" + "".join(f"(?=.*{n})" for n in lowering.TARGETS)):
        parse_options({"target": "cpp"})


@pytest.mark.parametrize("name", [n for n, t in lowering.TARGETS.items() if t.unavailable() is None])
def test_each_available_target_lowers_a_whole_graph_and_a_segment(name):
    x = torch.randn(3, 5)
    gm = fx.symbolic_trace(Tiny())
    target = lowering.target(name)
    whole = target.whole(gm, [x])
    segment = target.segment(fx.symbolic_trace(Tiny()), [x])
    expected = Tiny()(x)
    torch.testing.assert_close(whole(x), expected)
    result = segment(x)
    torch.testing.assert_close(result[0] if isinstance(result, (tuple, list)) else result, expected)


def test_unavailable_targets_say_why():
    for target in lowering.TARGETS.values():
        reason = target.unavailable()
        assert reason is None or (isinstance(reason, str) and reason)
    if not torch.cuda.is_available():
        assert "CUDA" in lowering.TARGETS["tensorrt"].unavailable() or "install" in lowering.TARGETS["tensorrt"].unavailable()
