"""`hippos bench train`: forward + backward tokens/s and peak memory of H3 and hybrid LMs against HF GPT-2.

Every (model, length) runs in a fresh process: build the model at the preset's shape (random weights, train
mode, no dropout), one untimed warm-up step, then the median of `repeats` timed steps of loss + backward on a
batch of random tokens. Peak memory is the rise of resident memory during one step. On the CPU the timed
steps run after `keep_freed_memory` (as `hippos train` does; TrainBenchConfig.keep_freed_memory), for every
model alike. GPT-2 uses its default attention implementation (PyTorch's scaled_dot_product_attention), the
strong baseline. "ceiling" is pure H3 with its SSMs taken out (`FreeSSMs`): the speed no H3 implementation can
pass at that shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..config import check_choices, check_device_name, check_numbers
from ..models import H3Config
from ..models.config import PRESETS
from ..training.allocator import keep_freed_memory
from ..training.flops import flops_per_token
from .generate import build_model, hippos_config
from .measure import PeakMemory, format_cells, machine_info, matmul_gflops, median_time, run_jobs

MODELS = ("h3", "hybrid", "gpt2", "ceiling")
LABELS = {
    "h3": "hippos pure H3",
    "hybrid": "hippos hybrid (published attention layers)",
    "transformer": "hippos Transformer",
    "gpt2": "Hugging Face GPT-2 (SDPA attention)",
    "ceiling": "ceiling: pure H3 with free SSMs",
}


class FreeSSMs(nn.Module):
    """An H3 mixer's projections with its two SSMs taken out: out = (q * k * v) W_o.

    A model of these keeps every matmul of pure H3 (and the elementwise products) but spends nothing on the
    state space models, so its tokens/s bounds what any H3 implementation can reach at the same shape.
    """

    def __init__(self, h3: nn.Module):
        super().__init__()
        self.q, self.k, self.v, self.out = h3.q_proj, h3.k_proj, h3.v_proj, h3.output_linear

    def forward(self, x, state=None, return_state=False, mask=None):
        """x (B, L, D) -> ((B, L, D), no state)."""
        return self.out(self.q(x) * self.k(x) * self.v(x)), None


@dataclass
class TrainBenchConfig:
    """What `hippos bench train` measures."""

    preset: str = "H3-125M"  # model shape (every model gets this width and depth)
    models: tuple[str, ...] = MODELS  # which models: h3, hybrid, transformer, gpt2
    lengths: tuple[int, ...] = (1024, 2048, 8192)  # sequence lengths
    batch: int = 1  # sequences per step
    repeats: int = 2  # timed steps per measurement (median)
    device: str = "cpu"  # torch device to run on
    seed: int = 0  # seed of the random weights and tokens
    keep_freed_memory: bool = True  # CPU: time steps with freed memory kept for reuse, as `hippos train` does

    POSITIVE: ClassVar[tuple[str, ...]] = ("lengths", "batch", "repeats")
    MINIMUM: ClassVar[dict[str, int]] = {"lengths": 2}  # a step predicts L - 1 tokens: at least one

    def __post_init__(self) -> None:
        """Refuse unknown presets and models, and bad numbers, before any process starts."""
        check_numbers(self)
        check_choices("preset", (self.preset,), PRESETS)
        check_choices("models", self.models, MODELS)
        if not self.lengths:
            raise ValueError("lengths must name at least one sequence length")
        check_device_name(self.device)


def train_loss(kind: str, model, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the L - 1 predictions of (B, L) ids, for either kind of model.

    Both make the same L - 1 predictions: GPT-2 shifts its labels inside, ours takes shifted inputs and targets.
    """
    if kind == "gpt2":
        return model(input_ids=ids, labels=ids).loss
    return model.loss(ids[:, :-1], ids[:, 1:])


def measure_train(kind: str, length: int, cfg: TrainBenchConfig) -> dict:
    """Forward + backward tokens/s and peak memory of one model at one sequence length."""
    model = build_model("h3" if kind == "ceiling" else kind, cfg.preset, length, cfg.device, cfg.seed).train()
    if kind == "ceiling":
        for block in model.backbone.layers:
            block.mixer = FreeSSMs(block.mixer)
    vocab = H3Config.preset(cfg.preset).vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab, (cfg.batch, length), generator=gen).to(cfg.device)

    def step() -> None:
        train_loss(kind, model, ids).backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: first-call costs stay out of the figures
    with PeakMemory(cfg.device) as mem:  # before keep_freed_memory, which keeps the resident set at its peak
        step()
    if cfg.keep_freed_memory and torch.device(cfg.device).type == "cpu":
        keep_freed_memory()  # every model alike, as `hippos train` runs: no page faults for reused memory
        step()  # fills the heap that later steps reuse
    seconds = median_time(step, cfg.repeats, cfg.device, warmup=0)
    params = sum(p.numel() for p in model.parameters())
    return {"model": kind, "length": length, "batch": cfg.batch, "seconds_per_step": seconds,
            "tokens_per_s": cfg.batch * length / seconds, "peak_mib": mem.mib, "parameters": params}  # fmt: skip


def run_train_bench(cfg: TrainBenchConfig, progress=None) -> dict:
    """Every measurement of cfg, each in a fresh process."""
    jobs = [({"model": m, "length": n}, (m, n, cfg)) for n in cfg.lengths for m in cfg.models]
    rows = run_jobs(measure_train, jobs, progress)
    return {"config": asdict(cfg), "machine": machine_info(cfg.device), "matmul_gflops": matmul_gflops(cfg.device),
            "rows": rows}  # fmt: skip


def format_table(result: dict, markdown: bool = False) -> str:
    """Rows of tokens/s and memory, speed-ups against GPT-2 at the same length, and achieved GFLOP/s."""
    cfg = result["config"]
    ok = [r for r in result["rows"] if "error" not in r]
    gpt = {r["length"]: r for r in ok if r["model"] == "gpt2"}
    cells = [["model", "length", "tokens/s", "s/step", "peak MiB", "x GPT-2", "model GFLOP/s"]]
    for r in ok:
        base = gpt.get(r["length"])
        # GPT-2's FLOPs are those of our Transformer at the same shape: every layer attention.
        config = hippos_config({"gpt2": "transformer", "ceiling": "h3"}.get(r["model"], r["model"]), cfg["preset"])
        rate = r["tokens_per_s"] * flops_per_token(config, r["parameters"], r["length"]) / 1e9
        cells.append([
            LABELS[r["model"]], str(r["length"]), f"{r['tokens_per_s']:,.0f}", f"{r['seconds_per_step']:.2f}",
            f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-",
            f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-", f"{rate:.0f}",
        ])  # fmt: skip
    out = format_cells(cells, markdown)
    out += [f"failed: {r['model']} length {r['length']}: {r['error']}" for r in result["rows"] if "error" in r]
    out.append(f"batch {cfg['batch']}, median of {cfg['repeats']} steps; measured fp32 matmul rate "
               f"{result['matmul_gflops']:.0f} GFLOP/s")  # fmt: skip
    return "\n".join(out)
