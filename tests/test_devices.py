"""Everything that runs on an accelerator, with every tensor on one: forward and backward passes, an optimizer step,
generation, the Hugging Face wrapper and saved generation states.

Without HIPPOS_TEST_DEVICE the accelerator is simulated, so these tests run on CPU-only machines: PyTorch's fake
tensors (shape, dtype and device, no values) on a device named "fakegpu". Fake tensors raise for operands on two
devices (FakeTensorDeviceMismatchError), for a value read back to the host (DataDependentOutputException) and for
a shape that depends on values (DynamicOutputShapeException, e.g. indexing by a mask), and `DeviceAudit` reports
every operation that made a CPU tensor with dimensions (0-dim CPU scalars are allowed in device operations).

Why not fake "cuda": in a CPU-only build of PyTorch (2.13) any autograd operation on a fake CUDA tensor aborts the
process, since autograd asks the CUDA device guard for a stream and there is none. "fakegpu" is PyTorch's
PrivateUse1 device renamed, with the no-op device guard PyTorch provides for Python backends; it reports itself
unavailable, so that nothing else in the process picks it as an accelerator. No code under test branches on the
name "cuda". A fake device cannot check the device of a torch.Generator either (torch.multinomial on a GPU refuses
a CPU one): the library checks that itself, and a test below checks the library.

HIPPOS_TEST_DEVICE=cuda (or cuda:1, ...) runs the same tests on that real device, where values exist and checks
read them as they do in use (`python -m hippos.benchmarks.gpu_check` does this).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import hippos
from hippos import H3LM, H3Config, LMState, generate
from hippos.generation import read_state, sample_next, save_state
from hippos.ops import linear_cross_entropy
from hippos.training.distributed import Distributed, Parallel
from hippos.training.optim import lr_factor, make_optimizer

# Every model path on a simulated accelerator: about 15 s, so `make test` runs it and `make test-fast` does not.
pytestmark = pytest.mark.slow

DEVICE_VARIABLE = "HIPPOS_TEST_DEVICE"
SIMULATED = "fakegpu"  # registered by tests/conftest.py before any test runs (see register_simulated_device there)
VOCAB = 257  # the tiny preset's

KINDS = {
    "h3": {"attn_layer_idx": ()},
    "h3-heads-chunked": {"attn_layer_idx": (), "head_dim": 4, "ssm_mode": "chunked"},
    "hybrid-rotary": {"attn_layer_idx": (1,), "rotary_dim": 8},
    "s4d": {"attn_layer_idx": (), "ssm_mixer": "s4d"},
}


def tiny(kind: str) -> H3LM:
    """A tiny model on the CPU: built there, then moved (fake tensors cannot run every initialiser)."""
    torch.manual_seed(0)
    return H3LM(H3Config.preset("tiny", **KINDS[kind]))


# ---- the device ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def device() -> torch.device:
    """HIPPOS_TEST_DEVICE (a real device, index made explicit), or the simulated accelerator."""
    name = os.environ.get(DEVICE_VARIABLE)
    if not name:
        if torch._C._get_privateuse1_backend_name() != SIMULATED:  # registered by conftest.py, when it could be
            pytest.skip(f"no simulated device: this PyTorch cannot register one; set {DEVICE_VARIABLE} instead")
        return torch.device(SIMULATED, 0)
    device = torch.device(name)
    if device.type == "cpu":
        pytest.fail(f"{DEVICE_VARIABLE} must name an accelerator (cuda, cuda:1, ...); unset, a simulated one is used")
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_VARIABLE}={name} but no CUDA device is available")
    return torch.device(device.type, device.index or 0)


def is_simulated(device: torch.device) -> bool:
    """Whether tensors on `device` are fake (no values)."""
    return device.type == SIMULATED


def device_generator(device: torch.device) -> torch.Generator | None:
    """A seeded generator on a real device; None (the global RNG) on the simulated one, which has no generators."""
    return None if is_simulated(device) else torch.Generator(device=device).manual_seed(0)


# ---- the audit -------------------------------------------------------------------------------------------------
_TORCH_DIR = os.path.dirname(torch.__file__)
_HIPPOS_DIR = os.path.dirname(hippos.__file__)


def _caller() -> traceback.FrameSummary | None:
    """The innermost frame of the stack outside PyTorch and outside the audit itself."""
    for frame in reversed(traceback.extract_stack()):
        in_audit = frame.filename == __file__ and frame.name in ("_caller", "__torch_dispatch__")
        if not frame.filename.startswith(_TORCH_DIR) and not in_audit:
            return frame
    return None


def _where(frame: traceback.FrameSummary | None) -> str:
    return "?" if frame is None else f"{frame.filename}:{frame.lineno} ({frame.line})"


class DeviceAudit(TorchDispatchMode):
    """Records every operation whose outputs include a CPU tensor with dimensions, and the line that ran it.

    `answer_fake_reads(answer)`: reads of fake values from outside hippos get answer() instead of an error. Only
    transformers' generate() needs that: it reads whether every sequence has finished after each token.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._answer: Callable[[], bool] | None = None

    def answer_fake_reads(self, answer: Callable[[], bool]) -> None:
        """Answer host reads of fake tensors made outside hippos with answer()."""
        self._answer = answer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self._answer is not None and func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            caller = _caller()
            if caller is not None and not caller.filename.startswith(_HIPPOS_DIR):
                return self._answer()
        out = func(*args, **(kwargs or {}))
        if any(isinstance(t, Tensor) and t.device.type == "cpu" and t.dim() > 0 for t in tree_leaves(out)):
            self.found.append(f"{func} made a CPU tensor at {_where(_caller())}")
        return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, Tensor) and is_fake(t)


@pytest.fixture
def on_device(device: torch.device):
    """on_device(): a context that runs its block on the device under a DeviceAudit, failing on what it found."""

    @contextlib.contextmanager
    def run() -> Iterator[DeviceAudit]:
        with contextlib.ExitStack() as stack:
            if is_simulated(device):
                from torch._subclasses.fake_tensor import FakeTensorMode

                stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
            audit = stack.enter_context(DeviceAudit())
            yield audit
        assert not audit.found, "tensors made on the CPU:\n" + "\n".join(audit.found)

    return run


def all_on(tensors, device: torch.device) -> bool:
    """Whether every tensor among `tensors` (any nesting of lists, dicts, states) is on `device`."""
    leaves = [t for t in tree_leaves(tensors) if isinstance(t, Tensor)]
    return bool(leaves) and all(t.device == device for t in leaves)


def state_tensors(state: LMState) -> list[Tensor]:
    """Every tensor of a model's generation state."""
    return list(state.to_tensors().values())


# ---- the tests -------------------------------------------------------------------------------------------------
def test_the_audit_reports_tensors_made_on_the_cpu(device, on_device):
    expected = r"aten\.zeros\.default made a CPU tensor at .*test_devices\.py"
    with pytest.raises(AssertionError, match=expected), on_device():
        torch.ones(3, device=device) * torch.zeros(())  # a 0-dim CPU scalar is allowed next to device tensors
        torch.zeros(3)  # made on the CPU and never mixed with device tensors: only the audit sees it
    with on_device():  # and a block that makes none passes
        torch.zeros(3, device=device) + torch.zeros(())


@pytest.mark.parametrize("length", [24, 200])  # a Toeplitz matmul up to 128 steps, an FFT beyond
@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_backward(kind, length, device, on_device):
    model = tiny(kind).train()
    with on_device():
        model.to(device)
        ids = torch.randint(0, VOCAB, (2, length), device=device)
        out = model(ids, labels=ids, return_state=True)
        out.loss.backward()
        assert all_on([out.logits, out.loss], device) and all_on(state_tensors(out.state), device)
        assert all_on([p.grad for p in model.parameters()], device)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step(checkpointing, device, on_device):
    """One step as hippos.training.loop takes it: the loss through Parallel, clipping, AdamW with the SSM groups,
    the schedule. (The loop itself also reads the loss and the label count to the host each step, for its log and
    for weighting micro-batches: that runs on real devices only, below.)"""
    model = tiny("hybrid-rotary").train()
    model.gradient_checkpointing = checkpointing
    with on_device():
        model.to(device)
        optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.1)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 10, 2))
        inputs = torch.randint(0, VOCAB, (2, 16), device=device)
        targets = inputs.roll(-1, 1)
        targets[:, -1] = -100  # no label for the last position
        Parallel(model, Distributed()).loss(inputs, targets).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        assert all_on(list(model.parameters()), device)
        moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
        assert all_on(moments, device)


def test_chunked_loss_and_its_gradients(device, on_device):
    """The LM head and cross-entropy in row chunks (hippos.ops.loss), whose forward also makes the gradients."""
    with on_device():
        h = torch.randn(50, 16, device=device, requires_grad=True)
        W = torch.randn(40, 16, device=device, requires_grad=True)
        labels = torch.randint(0, 40, (50,), device=device)
        loss = linear_cross_entropy(h, W, labels)
        (2 * loss).backward()  # a gradient other than 1: the scaled path of the backward
        assert all_on([loss, h.grad, W.grad], device)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_left_padding_and_sampling(kind, device, on_device):
    model = tiny(kind).eval()
    with on_device():
        model.to(device)
        ids = torch.randint(1, VOCAB, (2, 7), device=device)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # the first prompt is 4 tokens, left-padded
        out, state = generate(
            model, ids, 5, temperature=0.8, top_k=50, top_p=0.9, eos_token_id=0, attention_mask=mask,
            generator=device_generator(device), return_state=True,
        )  # fmt: skip
        assert all_on(out, device) and all_on(state_tensors(state), device)
        assert out.shape[0] == 2 and 7 < out.shape[1] <= 12


def test_a_generator_on_another_device_is_refused(device, on_device):
    model = tiny("h3").eval()
    with on_device():
        model.to(device)
        ids = torch.randint(0, VOCAB, (1, 4), device=device)
        with pytest.raises(ValueError, match="generator is on cpu"):
            generate(model, ids, 2, generator=torch.Generator())
        with pytest.raises(ValueError, match="generator is on cpu"):
            sample_next(torch.randn(1, 264, device=device), VOCAB, generator=torch.Generator())


def test_hugging_face_generate(device, on_device):
    pytest.importorskip("transformers")
    from hippos.models.hf import H3ForCausalLM

    model = tiny("hybrid-rotary").eval()
    new = 4
    with on_device() as audit:
        hf = H3ForCausalLM.from_hippos(model.to(device))
        calls = [0]
        hf.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        # transformers reads "has every sequence finished?" after each token (on a GPU, a sync per token) and a few
        # yes/no checks before the first; fake tensors hold no answer, so: "no", until `new` tokens are made.
        audit.answer_fake_reads(lambda: calls[0] >= new)
        ids = torch.randint(1, VOCAB, (2, 6), device=device)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=True, top_k=50, pad_token_id=0)
        assert all_on(out, device) and tuple(out.shape) == (2, 6 + new)


def test_generation_state_loads_onto_the_device_and_continues(device, on_device, tmp_path: Path):
    model = tiny("hybrid-rotary").eval()
    _, state = generate(model, torch.randint(0, VOCAB, (2, 5)), 2, temperature=0, return_state=True)  # on the CPU
    save_state(state, tmp_path / "state.safetensors")
    # load_state = state_from_tensors(*read_state(path), device): the file is read on the host (fake tensors have
    # no memory to read into), and the device part runs on the device.
    tensors, kinds = read_state(tmp_path / "state.safetensors")
    with on_device():
        model.to(device)
        loaded = LMState.from_tensors({k: t.to(device) for k, t in tensors.items()}, kinds)
        assert all_on(state_tensors(loaded), device)
        follow = torch.randint(0, VOCAB, (2, 3), device=device)
        out, after = generate(model, follow, 3, temperature=0.7, state=loaded, return_state=True,
                                    generator=device_generator(device))  # fmt: skip
        assert all_on(out, device) and all_on(state_tensors(after), device)
    saved = [t.cpu() for t in state_tensors(after)]  # copies to the host on purpose: outside the audit
    assert all(t.device.type == "cpu" for t in saved)


def test_training_loop_on_a_real_device(device, tmp_path: Path):
    """The whole loop (autocast, logging, checkpoints) for two steps; it reads values every step, so it needs one."""
    if is_simulated(device):
        pytest.skip(f"the training loop reads losses to the host; set {DEVICE_VARIABLE} to a real device")
    from hippos.training.loop import TrainConfig, train

    model = tiny("hybrid-rotary")
    data = torch.randint(0, VOCAB, (4, 17))
    cfg = TrainConfig(steps=2, batch_size=4, micro_batch_size=2, device=str(device), eval_every=0, log_every=1,
                      checkpoint_every=0)  # fmt: skip
    metrics = train(model, lambda step: (data[:, :-1], data[:, 1:]), cfg, tmp_path, progress=False)
    assert metrics["step"] == 2 and all_on(list(model.parameters()), device)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in log if "loss" in record]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
