"""The layer on an accelerator agrees with the float64 CPU reference (skipped without CUDA)."""

import pytest
import torch

from hippos.layers import H3
from tolerances import assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("mode", ["fft", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_h3_on_cuda_matches_cpu_float64(mode, dtype):
    torch.manual_seed(0)
    layer = H3(64, 16, mode=mode, chunk=16)
    x = torch.randn(2, 300, 64)
    expected = layer.double()(x.double())[0]
    got = layer.to("cuda", dtype)(x.to("cuda", dtype))[0]
    assert got.dtype == dtype and got.device.type == "cuda"
    # Compared relative to the largest output, in the layer's dtype. Half-precision weights and matmuls dominate
    # the error (four projections); the SSM part runs in float32 whatever the input dtype.
    peak = expected.abs().max()
    scale = 1.0 if dtype == torch.float32 else 2.5
    assert_close((got.double().cpu() / peak).to(dtype), (expected / peak).to(dtype), scale=scale)


def test_h3_steps_on_cuda_match_parallel():
    torch.manual_seed(0)
    layer = H3(32, 8).to("cuda")
    x = torch.randn(1, 40, 32, device="cuda")
    y, _ = layer(x)
    state = layer.init_state(1, device="cuda")
    outs = []
    for t in range(x.shape[1]):
        out, state = layer.step(x[:, t], state)
        outs.append(out)
    assert_close(torch.stack(outs, 1), y)
