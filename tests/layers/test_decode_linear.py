"""decode_linear equals F.linear on every path: blocked (small batch, wide output) and plain."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hippos.layers.decode_linear import decode_linear
from tolerances import assert_close


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows, out_features", [(1, 64), (4, 64), (16, 64), (16, 8192), (1, 60), (3, 1)])
def test_equals_f_linear(bias, rows, out_features):
    torch.manual_seed(0)
    linear = nn.Linear(24, out_features, bias=bias).double()
    x = torch.randn(rows, 24, dtype=torch.float64)
    expected = F.linear(x, linear.weight, linear.bias)
    assert_close(decode_linear(linear, x), expected, strict=True)  # the same sums, in another order
