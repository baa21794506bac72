"""`hippos bench generate`: prefill and decode speed of H3, hybrid and Transformer LMs against HF GPT-2.

Every (model, batch, prompt) runs in a fresh process: build the model (random weights, eval mode), one
untimed warm-up, then the timed prefill of the whole prompt (state kept) and `new_tokens` greedy decode
steps. Peak memory is the rise of resident memory during the prefill, and separately during decoding (what
decoding adds to the prompt's state: KV caches grow, a recurrent state does not).

`quantize = "int8"` runs our models as `hippos.quantize` makes them (int8 linear layers and LM head,
docs/quantization.md); GPT-2 stays fp32, the baseline as before. The "x floor" ratio keeps the fp32 weight
bytes as its floor, so int8 rows show how far below the fp32 floor they get.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..config import check_choices, check_device_name, check_numbers
from ..layers.decode_linear import decode_linear
from ..layers.int8_linear import Int8Linear
from ..models import H3LM, H3Config
from ..models.config import PRESETS
from ..models.quantize import quantize
from .measure import PeakMemory, ReadBandwidth, format_cells, machine_info, median_time, run_jobs, timed

MODELS = ("h3", "hybrid", "transformer", "gpt2")
QUANTIZE = ("none", "int8")
FLOOR_ROUNDS, FLOOR_STEPS = 7, 8  # batch 1: rounds of (bandwidth sample, decode steps) for the floor ratio
LABELS = {
    "h3": "hippos pure H3",
    "hybrid": "hippos hybrid (published attention layers)",
    "transformer": "hippos Transformer",
    "gpt2": "Hugging Face GPT-2 (KV cache)",
}


@dataclass
class GenerateBenchConfig:
    """What `hippos bench generate` measures."""

    preset: str = "H3-125M"  # model shape (every model gets this width and depth)
    models: tuple[str, ...] = MODELS  # which models: h3, hybrid, transformer, gpt2
    batches: tuple[int, ...] = (1, 16)  # batch sizes
    prompts: tuple[int, ...] = (512, 1024, 2048)  # prompt lengths
    new_tokens: int = 128  # tokens generated after each prompt
    device: str = "cpu"  # torch device to run on
    seed: int = 0  # seed of the random weights and prompts
    quantize: str = "none"  # "none" or "int8": our models' weights in int8 (hippos.quantize); GPT-2 stays fp32

    POSITIVE: ClassVar[tuple[str, ...]] = ("batches", "prompts", "new_tokens")

    def __post_init__(self) -> None:
        check_numbers(self)
        check_choices("preset", (self.preset,), PRESETS)
        check_choices("models", self.models, MODELS)
        check_choices("quantize", (self.quantize,), QUANTIZE)
        if not self.batches or not self.prompts:
            raise ValueError("batches and prompts must each name at least one size")
        check_device_name(self.device)


def quick_config() -> GenerateBenchConfig:
    """A short form: batch 1 and 16, one prompt length, 32 new tokens."""
    return GenerateBenchConfig(prompts=(512,), new_tokens=32)


def hippos_config(kind: str, preset: str) -> H3Config:
    """The config of one of our models at a preset's shape."""
    base = H3Config.preset(preset)
    attn = {"h3": (), "hybrid": base.attn_layer_idx, "transformer": tuple(range(base.n_layer))}[kind]
    return H3Config.preset(preset, attn_layer_idx=attn)


def build_model(kind: str, preset: str, n_positions: int, device="cpu", seed: int = 0):
    """One of MODELS at a preset's width and depth, random weights, eval mode (GPT-2 with n_positions)."""
    torch.manual_seed(seed)
    if kind != "gpt2":
        return H3LM(hippos_config(kind, preset)).to(device).eval()
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise ImportError("the GPT-2 baseline needs transformers: pip install 'hungry-hippos[hf]'") from None
    c = H3Config.preset(preset)
    # No dropout, like our presets: GPT-2's default 0.1 would also push its training attention off PyTorch's
    # memory-efficient kernel (measured: 6.5x the memory and 4.7x the time of one layer at L 4096).
    gpt = GPT2Config(
        vocab_size=c.vocab_size, n_positions=n_positions, n_embd=c.d_model, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=c.mlp_width, bos_token_id=c.vocab_size - 1, eos_token_id=c.vocab_size - 1,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(gpt).to(device).eval()


def _build(kind: str, cfg: GenerateBenchConfig):
    """(model to run, bytes of its fp32 weights): quantized as cfg says when it is one of ours."""
    positions = max(cfg.prompts) + cfg.new_tokens + FLOOR_ROUNDS * FLOOR_STEPS  # the floor's steps go on
    model = build_model(kind, cfg.preset, positions, cfg.device, cfg.seed)
    fp32_bytes = weight_bytes(model)
    if cfg.quantize != "none" and kind != "gpt2":
        model = quantize(model, cfg.quantize)
    return model, fp32_bytes


def _runner(kind: str, model):
    """(prefill(ids) -> (last logits, cache), step(token, cache) -> (logits, cache)) for either kind."""
    if kind == "gpt2":

        def prefill(ids):
            out = model(input_ids=ids, use_cache=True)
            return out.logits[:, -1], out.past_key_values

        def step(token, cache):
            out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            return out.logits[:, -1], out.past_key_values

        return prefill, step

    def prefill(ids):
        out = model(ids, return_state=True)
        return out.logits[:, -1], out.state

    return prefill, model.step


def weight_bytes(model) -> int:
    """Bytes of the model's parameters, a tied head counted once: what a decode step reads at least."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (int8 weights and their scales are buffers), each once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def matvec_ms(model: H3LM, device="cpu", repeats: int = 9) -> float:
    """Median ms of the matrix-vector products alone that one batch-1 decode step does, nothing else.

    Every linear layer of the model (the LM head included) once on a random (1, in) row, by `decode_linear`
    as the step runs it: the fastest a step could be with every other operation free. Against the floor it
    says how much of a step's gap is the BLAS kernel's rather than the model's.
    """
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
    rows = [torch.randn(1, m.in_features, device=device) for m in linears]

    def sweep():
        for linear, x in zip(linears, rows):
            decode_linear(linear, x)

    return median_time(sweep, repeats, device) * 1e3


def floor_ratios(
    model, step, device, rounds: int = FLOOR_ROUNDS, steps: int = FLOOR_STEPS, weights: int | None = None
) -> dict:
    """Batch-1 decode step (and its matrix-vector products alone) over the weight-reading floor.

    step() runs one decode step. The floor is weight bytes (`weights`, else the model's) / read bandwidth. This
    VM's bandwidth drifts by 2x within minutes, so every round samples it right before timing `steps` decode
    steps and one matvec sweep: each ratio compares figures taken moments apart, and the medians over the rounds
    are reported.
    """
    weights = weights or weight_bytes(model)
    probe = ReadBandwidth(device)
    bandwidths, ratios, matvec_ratios = [], [], []
    for _ in range(rounds):
        bandwidth = probe.sample(3)
        floor_ms = weights / (bandwidth * 1e6)
        bandwidths.append(bandwidth)
        ratios.append(median_time(step, steps, device, warmup=0) * 1e3 / floor_ms)
        if isinstance(model, H3LM):  # GPT-2's Conv1D layers are not what its decode step runs as linears
            matvec_ratios.append(matvec_ms(model, device, repeats=1) / floor_ms)
    return {
        "bandwidth_gbs": statistics.median(bandwidths),
        "x_floor": statistics.median(ratios),
        "matvec_x_floor": statistics.median(matvec_ratios) if matvec_ratios else None,
    }


def measure_generate(kind: str, batch: int, prompt: int, cfg: GenerateBenchConfig) -> dict:
    """Prefill and decode tokens/s and peak memory of one model at one (batch, prompt length)."""
    model, fp32_bytes = _build(kind, cfg)
    vocab = H3Config.preset(cfg.preset).vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(cfg.device)
    prefill, step = _runner(kind, model)

    def decode(logits, cache, n):
        for _ in range(n):
            logits, cache = step(logits[:, :vocab].argmax(-1), cache)
        return logits, cache

    with torch.inference_mode():
        decode(*prefill(ids[:, :16]), 4)  # warm-up: first-call costs stay out of the figures
        with PeakMemory(cfg.device) as prefill_mem:
            (logits, cache), prefill_s = timed(lambda: prefill(ids), cfg.device)
        with PeakMemory(cfg.device) as decode_mem:  # what decoding adds on top of the prompt's state
            carry, decode_s = timed(lambda: decode(logits, cache, cfg.new_tokens), cfg.device)
        floor = {}
        if batch == 1:  # decoding goes on from where it stopped, one step at a time

            def one_step():
                nonlocal carry
                carry = decode(*carry, 1)

            floor = floor_ratios(model, one_step, cfg.device, weights=fp32_bytes)
    return {
        "model": kind, "batch": batch, "prompt": prompt, "new_tokens": cfg.new_tokens,
        "prefill_tokens_per_s": batch * prompt / prefill_s,
        "decode_tokens_per_s": batch * cfg.new_tokens / decode_s,
        "decode_ms_per_step": decode_s / cfg.new_tokens * 1e3,
        "prefill_peak_mib": prefill_mem.mib, "decode_peak_mib": decode_mem.mib, "weight_bytes": fp32_bytes,
        "model_bytes": model_bytes(model), "quantize": cfg.quantize if kind != "gpt2" else "none", **floor,
    }  # fmt: skip


def run_generate_bench(cfg: GenerateBenchConfig, progress=None) -> dict:
    """Every measurement of cfg, each in a fresh process."""
    unknown = set(cfg.models) - set(MODELS)
    if unknown:
        raise ValueError(f"unknown model(s) {sorted(unknown)}; choose from {', '.join(MODELS)}")
    jobs = [
        ({"model": m, "batch": b, "prompt": p}, (m, b, p, cfg))
        for b in cfg.batches
        for p in cfg.prompts
        for m in cfg.models
    ]
    rows = run_jobs(measure_generate, jobs, progress)
    return {"config": asdict(cfg), "machine": machine_info(cfg.device), "rows": rows}


def format_table(result: dict, markdown: bool = False) -> str:
    """Rows of tokens/s and memory, decode speed-ups against GPT-2, and the pure-H3 floor ratio."""
    ok = [r for r in result["rows"] if "error" not in r]
    gpt = {(r["batch"], r["prompt"]): r for r in ok if r["model"] == "gpt2"}
    head = ["model", "batch", "prompt", "prefill tok/s", "decode tok/s", "ms/step", "model MiB", "prefill MiB",
            "decode MiB", "x GPT-2 decode", "x floor", "matvec x floor"]  # fmt: skip
    cells = [head]
    for r in ok:
        base = gpt.get((r["batch"], r["prompt"]))
        cells.append([
            _label(r), str(r["batch"]), str(r["prompt"]), f"{r['prefill_tokens_per_s']:,.0f}",
            f"{r['decode_tokens_per_s']:,.1f}", f"{r['decode_ms_per_step']:.1f}",
            f"{r['model_bytes'] / 2**20:.0f}" if r.get("model_bytes") else "-",
            *(f"{r[k]:.0f}" if r[k] is not None else "-" for k in ("prefill_peak_mib", "decode_peak_mib")),
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}" if base else "-",
            *(f"{r[k]:.2f}" if r.get(k) else "-" for k in ("x_floor", "matvec_x_floor")),
        ])  # fmt: skip
    out = format_cells(cells, markdown)
    out += [f"failed: {r['model']} batch {r['batch']} prompt {r['prompt']}: {r['error']}"
            for r in result["rows"] if "error" in r]  # fmt: skip
    return "\n".join(out + _notes(ok))


def _label(row: dict) -> str:
    """A row's model name, with its quantization when it has one."""
    quantized = row.get("quantize", "none") != "none"
    return f"{LABELS[row['model']]}, {row['quantize']}" if quantized else LABELS[row["model"]]


def _notes(rows: list[dict]) -> list[str]:
    """The lines under the table that say what the floor columns and the quantized rows mean."""
    notes = []
    own = [r["bandwidth_gbs"] for r in rows if r.get("bandwidth_gbs")]
    if own:
        notes.append(
            f"x floor (batch 1): decode ms/step over (weight bytes / read bandwidth), the bandwidth sampled right "
            f"before each of {FLOOR_ROUNDS} rounds of {FLOOR_STEPS} steps, median of the rounds (bandwidth "
            f"{min(own):.1f}-{max(own):.1f} GB/s, measured in each row's process)"
        )
        notes.append("matvec x floor: the step's matrix-vector products alone (every linear layer once), same rounds")
    if any(r.get("quantize", "none") != "none" for r in rows):
        notes.append(
            "int8 rows: hippos.quantize (int8 linear layers and LM head); their floor is still the fp32 weight "
            "bytes, model MiB what they hold (parameters and buffers); GPT-2 runs in fp32"
        )
    return notes
