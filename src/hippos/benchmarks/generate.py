"""`hippos bench generate`: prefill and decode speed of H3, hybrid and Transformer LMs against HF GPT-2.

Every (model, batch, prompt) runs in a fresh process: build the model (random weights, eval mode), one
untimed warm-up, then the timed prefill of the whole prompt (state kept) and `new_tokens` greedy decode
steps. Peak memory is the rise of resident memory during the prefill, and separately during decoding (what
decoding adds to the prompt's state: KV caches grow, a recurrent state does not).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..models import H3LM, H3Config
from .measure import PeakMemory, format_cells, machine_info, memory_bandwidth, run_jobs

MODELS = ("h3", "hybrid", "transformer", "gpt2")
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
    return build_model(kind, cfg.preset, max(cfg.prompts) + cfg.new_tokens, cfg.device, cfg.seed)


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


def measure_generate(kind: str, batch: int, prompt: int, cfg: GenerateBenchConfig) -> dict:
    """Prefill and decode tokens/s and peak memory of one model at one (batch, prompt length)."""
    model = _build(kind, cfg)
    vocab = H3Config.preset(cfg.preset).vocab_size
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(cfg.device)
    prefill, step = _runner(kind, model)

    def decode(logits, cache, n):
        for _ in range(n):
            logits, cache = step(logits[:, :vocab].argmax(-1), cache)
        return logits

    with torch.inference_mode():
        decode(*prefill(ids[:, :16]), 4)  # warm-up: first-call costs stay out of the figures
        with PeakMemory(cfg.device) as prefill_mem:
            start = time.perf_counter()
            logits, cache = prefill(ids)
            mid = time.perf_counter()
        with PeakMemory(cfg.device) as decode_mem:  # what decoding adds on top of the prompt's state
            decode(logits, cache, cfg.new_tokens)
            end = time.perf_counter()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Right after decoding, in the same process: this VM's bandwidth drifts over minutes (32-66 GB/s measured).
    bandwidth = memory_bandwidth(cfg.device) if batch == 1 else None
    return {
        "model": kind, "batch": batch, "prompt": prompt, "new_tokens": cfg.new_tokens,
        "prefill_tokens_per_s": batch * prompt / (mid - start),
        "decode_tokens_per_s": batch * cfg.new_tokens / (end - mid),
        "decode_ms_per_step": (end - mid) / cfg.new_tokens * 1e3,
        "prefill_peak_mib": prefill_mem.mib, "decode_peak_mib": decode_mem.mib, "weight_bytes": weight_bytes,
        "bandwidth_gbs": bandwidth,
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
    bw = result.get("bandwidth_gbs")  # one figure for the whole run: records written before rows had their own
    ok = [r for r in result["rows"] if "error" not in r]
    gpt = {(r["batch"], r["prompt"]): r for r in ok if r["model"] == "gpt2"}
    head = ["model", "batch", "prompt", "prefill tok/s", "decode tok/s", "ms/step", "prefill MiB", "decode MiB",
            "x GPT-2 decode", "x floor"]  # fmt: skip
    cells = [head]
    for r in ok:
        base = gpt.get((r["batch"], r["prompt"]))
        row_bw = r.get("bandwidth_gbs") or bw  # the row's own, when measured (batch 1)
        cells.append([
            LABELS[r["model"]], str(r["batch"]), str(r["prompt"]), f"{r['prefill_tokens_per_s']:,.0f}",
            f"{r['decode_tokens_per_s']:,.1f}", f"{r['decode_ms_per_step']:.1f}",
            *(f"{r[k]:.0f}" if r[k] is not None else "-" for k in ("prefill_peak_mib", "decode_peak_mib")),
            f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}" if base else "-",
            f"{r['decode_ms_per_step'] * row_bw * 1e6 / r['weight_bytes']:.2f}" if r["batch"] == 1 and row_bw else "-",
        ])  # fmt: skip
    out = format_cells(cells, markdown)
    out += [f"failed: {r['model']} batch {r['batch']} prompt {r['prompt']}: {r['error']}"
            for r in result["rows"] if "error" in r]  # fmt: skip
    own = [r["bandwidth_gbs"] for r in ok if r.get("bandwidth_gbs")]
    where = f"{min(own):.1f}-{max(own):.1f} GB/s, measured in each row's process" if own else f"{bw or 0:.1f} GB/s"
    out.append(f"x floor: decode ms/step over (weight bytes / read bandwidth: {where}), batch 1")
    return "\n".join(out)
