"""Official H3 checkpoints -> H3LM, for every layout of docs/checkpoints.md, against an independent forward pass.

The checkpoints are tiny random ones with exactly the official names and shapes. The reference forward pass
below is written straight from docs/math.md, docs/models.md and docs/checkpoints.md on the official tensors,
with plain torch only (naive
causal convolution loops, explicit Vandermonde powers, explicit softmax): nothing from hippos.layers or
hippos.models takes part in it. Values are drawn in float32 and stored as float64, so loading them into the
float32 model is exact and the float64 comparison can be tight.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import Tensor

from hippos import H3LM
from hippos.layers import H3
from hippos.models.checkpoint import check_keys, load_pretrained
from hippos.models.official import OFFICIAL_H3_NAMES, convert_h3_mixer, convert_official_state_dict, official_name
from tolerances import assert_close

F64 = torch.float64
EMB = "backbone.embeddings.word_embeddings.weight"


def load_official(path, n_head: int | None = None, **options) -> H3LM:
    """An official file loaded the way H3LM.from_pretrained loads it (checkpoint.load_pretrained)."""
    return load_pretrained(H3LM, path, n_head=n_head, **options)


# ---- tiny official checkpoints ---------------------------------------------------------------------------
def make_official(
    d_model: int = 16,
    n_layer: int = 3,
    attn: tuple[int, ...] = (1,),
    rows: int = 56,
    d_state: int = 8,
    head_dim: int = 1,
    d_inner: int | None = None,
    rotary_dim: int = 0,
    extra_norm: bool = False,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Random tensors named and shaped as in an official model.pt (docs/checkpoints.md), current key names."""
    g = torch.Generator().manual_seed(seed)
    D, N, M, H = d_model, d_state, d_state // 2, d_model // head_dim
    d_inner = d_inner or 4 * D

    def randn(*shape, scale=1.0, shift=0.0):  # drawn in float32, so exactly representable there
        return (torch.randn(*shape, generator=g) * scale + shift).to(F64)

    def linear(name, n_out, n_in):
        return {f"{name}.weight": randn(n_out, n_in, scale=n_in**-0.5), f"{name}.bias": randn(n_out, scale=0.1)}

    def norm(name):
        return {f"{name}.weight": randn(D, scale=0.2, shift=1.0), f"{name}.bias": randn(D, scale=0.2)}

    t = {EMB: randn(rows, D)}
    for l in range(n_layer):
        p = f"backbone.layers.{l}."
        if l in attn:
            t.update(linear(p + "mixer.Wqkv", 3 * D, D))
            t.update(linear(p + "mixer.out_proj", D, D))
            if rotary_dim:
                inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
                t[p + "mixer.rotary_emb.inv_freq"] = inv_freq.to(F64)
        else:
            for proj in ("q_proj", "k_proj", "v_proj", "output_linear"):
                t.update(linear(p + "mixer." + proj, D, D))
            lo, hi = math.log(1e-2), math.log(0.5)
            t[p + "mixer.ssm_k_D"] = randn(D)
            t[p + "mixer.ssm_k_kernel.kernel.B"] = randn(D, N)  # trained: not e_1
            t[p + "mixer.ssm_k_kernel.kernel.C"] = randn(1, D, N, scale=N**-0.5)
            t[p + "mixer.kernel.kernel.log_dt"] = (torch.rand(H, generator=g) * (hi - lo) + lo).to(F64)
            t[p + "mixer.kernel.kernel.inv_A_real"] = randn(H, M, scale=0.3, shift=math.log(0.5))
            imag = math.pi * torch.arange(M, dtype=torch.float32) + 0.3 * torch.randn(H, M, generator=g)
            t[p + "mixer.kernel.kernel.A_imag"] = imag.to(F64)
            t[p + "mixer.kernel.kernel.B"] = randn(H, M, 2)
            t[p + "mixer.kernel.kernel.C"] = randn(1, H, M, 2, scale=0.5)
            t[p + "mixer.D"] = randn(H)
        t.update(norm(p + "norm1"))
        t.update(norm(p + "norm2"))
        t.update(linear(p + "mlp.fc1", d_inner, D))
        t.update(linear(p + "mlp.fc2", D, d_inner))
    if extra_norm:
        t.update(norm("backbone.norm"))
    else:
        t.update(norm("backbone.ln_f"))
        t["lm_head.weight"] = t[EMB].clone()
    return t


def lightning(t: dict[str, Tensor]) -> dict:
    """The PyTorch Lightning wrapping of a state dict."""
    return {
        "pytorch-lightning_version": "1.6.5",
        "epoch": 3,
        "global_step": 1200,
        "state_dict": {"model." + k: v for k, v in t.items()},
    }


def old_names(t: dict[str, Tensor]) -> dict[str, Tensor]:
    """The older key names: s4seq.encoder. for backbone., embedding. for the word embedding."""
    renamed = {}
    for k, v in t.items():
        if k == EMB:
            k = "embedding.weight"
        elif k.startswith("backbone."):
            k = "s4seq.encoder." + k[len("backbone.") :]
        renamed[k] = v
    return renamed


def save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


def ids_for(vocab: int, batch: int = 2, length: int = 9, seed: int = 1) -> Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hippos_logits(model: H3LM, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.double()(ids).logits


# ---- independent reference forward pass (docs/math.md, docs/models.md) ---------------------------------
def layer_norm(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def affine(p: dict, name: str, x: Tensor) -> Tensor:
    return x @ p[name + ".weight"].T + p[name + ".bias"]


def causal_conv(u: Tensor, K: Tensor) -> Tensor:
    """y[..., t] = sum over i <= t of K[..., i] u[..., t - i]; time is the last axis, K broadcasts against u."""
    L, T = u.shape[-1], K.shape[-1]
    y = torch.zeros(*torch.broadcast_shapes(u.shape[:-1], K.shape[:-1]), L, dtype=u.dtype)
    for t in range(L):
        for i in range(min(t + 1, T)):
            y[..., t] += K[..., i] * u[..., t - i]
    return y


def shift_kernel(B: Tensor, C: Tensor) -> Tensor:
    """k[h, i] = sum_n B[h, n] C[h, n + i] (zero beyond the state): (H, N)."""
    N = B.shape[1]
    return torch.stack([(B[:, : N - i] * C[:, i:]).sum(1) for i in range(N)], dim=1)


def diag_kernel(p: dict, L: int) -> Tensor:
    """Bilinear S4D kernel K[h, l] = 2 Re(sum_n C_n dB_n dA_n^l): (H, L)."""
    A = torch.complex(-torch.exp(p["kernel.kernel.inv_A_real"]), p["kernel.kernel.A_imag"])
    dt = torch.exp(p["kernel.kernel.log_dt"])[:, None]
    dA = (1 + dt * A / 2) / (1 - dt * A / 2)
    B = torch.complex(p["kernel.kernel.B"][..., 0], p["kernel.kernel.B"][..., 1])
    C = torch.complex(p["kernel.kernel.C"][0, ..., 0], p["kernel.kernel.C"][0, ..., 1])
    dB = dt * B / (1 - dt * A / 2)
    powers = [torch.ones_like(dA)]
    for _ in range(L - 1):
        powers.append(powers[-1] * dA)
    vandermonde = torch.stack(powers, dim=-1)  # (H, M, L)
    return 2 * (C[..., None] * dB[..., None] * vandermonde).sum(1).real


def h3_mixer(p: dict, x: Tensor) -> Tensor:
    """The H3 layer of docs/math.md (multi-head form; head_dim 1 is a special case) on one mixer's official tensors."""
    Bt, L, D = x.shape
    H = p["D"].shape[0]
    hd = D // H
    q, k, v = (affine(p, name, x).transpose(1, 2) for name in ("q_proj", "k_proj", "v_proj"))  # (Bt, D, L)
    k = (
        causal_conv(k, shift_kernel(p["ssm_k_kernel.kernel.B"], p["ssm_k_kernel.kernel.C"][0]))
        + p["ssm_k_D"][:, None] * k
    )
    q, k, v = (t.reshape(Bt, H, hd, L) for t in (q, k, v))
    kv = k[:, :, :, None, :] * v[:, :, None, :, :]  # (Bt, H, d1, d2, L)
    y = causal_conv(kv, diag_kernel(p, L)[:, None, None, :]) + p["D"][:, None, None, None] * kv
    out = (q[:, :, :, None, :] * y).sum(2)  # (Bt, H, d2, L): output channel order (h, d2)
    return affine(p, "output_linear", out.reshape(Bt, D, L).transpose(1, 2))


def rotate(x: Tensor, inv_freq: Tensor) -> Tensor:
    """GPT-NeoX rotary on the first 2 * len(inv_freq) features of each head (first half with second half)."""
    half = inv_freq.shape[0]
    angles = torch.arange(x.shape[-2], dtype=F64)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half :]], dim=-1)


def attention(p: dict, x: Tensor, n_head: int) -> Tensor:
    """Causal MHA; Wqkv rows: all query heads, then all key heads, then all value heads."""
    Bt, L, D = x.shape
    hd = D // n_head
    qkv = affine(p, "Wqkv", x)
    q, k, v = (qkv[..., j * D : (j + 1) * D].reshape(Bt, L, n_head, hd).transpose(1, 2) for j in range(3))
    if "rotary_emb.inv_freq" in p:
        # The stored buffer is float32 (as in the official files); the model uses the exact formula, which
        # the converter checks the buffer against, so the float64 reference does too.
        dim = 2 * p["rotary_emb.inv_freq"].shape[0]
        inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=F64) / dim)
        q, k = rotate(q, inv_freq), rotate(k, inv_freq)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return affine(p, "out_proj", (weights @ v).transpose(1, 2).reshape(Bt, L, D))


def mlp(p: dict, x: Tensor) -> Tensor:
    h = affine(p, "fc1", x)
    h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return affine(p, "fc2", h)


def under(t: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}


def reference_logits(t: dict, ids: Tensor, n_head: int = 2, old_order: bool = False) -> Tensor:
    """Logits of the official model described by t (current key names).

    old_order=False: pre-norm blocks, x = x + mixer(norm1(x)); x = x + MLP(norm2(x)); ln_f; head.
    old_order=True: the old layout with the extra backbone.norm, blocks "mixer -> add -> LN": the residual stream
    starts at the raw embedding and is never normalised itself; backbone.norm feeds the first mixer, each block's
    norm1 output feeds its MLP and its norm2 output the next block; the last norm2 is the final norm (no ln_f).
    """
    n_layer = 1 + max(int(k.split(".")[2]) for k in t if k.startswith("backbone.layers."))
    residual = t[EMB][ids]
    hidden = layer_norm(residual, *norm_params(t, "backbone.norm")) if old_order else None
    for l in range(n_layer):
        p = under(t, f"backbone.layers.{l}.")
        m = under(p, "mixer.")
        mixer = (lambda h, m=m: attention(m, h, n_head)) if "Wqkv.weight" in m else (lambda h, m=m: h3_mixer(m, h))
        if old_order:
            residual = residual + mixer(hidden)
            hidden = layer_norm(residual, *norm_params(p, "norm1"))
            residual = residual + mlp(under(p, "mlp."), hidden)
            hidden = layer_norm(residual, *norm_params(p, "norm2"))
        else:
            residual = residual + mixer(layer_norm(residual, *norm_params(p, "norm1")))
            residual = residual + mlp(under(p, "mlp."), layer_norm(residual, *norm_params(p, "norm2")))
    if not old_order:
        hidden = layer_norm(residual, *norm_params(t, "backbone.ln_f"))
    return hidden @ t.get("lm_head.weight", t[EMB]).T


def norm_params(t: dict, name: str) -> tuple[Tensor, Tensor]:
    return t[name + ".weight"], t[name + ".bias"]


# ---- layouts: logits against the reference ----------------------------------------------------------------
@pytest.mark.parametrize("layout", ["plain", "lightning"])
def test_hybrid_checkpoint_matches_reference(tmp_path, layout):
    t = make_official()
    path = save(t if layout == "plain" else lightning(t), tmp_path / "model.pt")
    model = load_official(path, n_head=2)
    c = model.config
    assert (c.d_model, c.n_layer, c.attn_layer_idx, c.d_state, c.head_dim, c.rotary_dim) == (16, 3, (1,), 8, 1, 0)
    assert (c.vocab_size, c.padded_vocab_size, c.n_head, c.d_inner) == (56, 56, 2, 0)
    ids = ids_for(56)
    assert_close(hippos_logits(model, ids), reference_logits(t, ids))


def test_old_names_with_extra_norm_shift_layer_norms(tmp_path):
    t = make_official(extra_norm=True)  # no ln_f, no lm_head: as the old files
    path = save(old_names(t), tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about here
        model = load_official(path, n_head=2)
    ids = ids_for(56)
    expected = reference_logits(t, ids, old_order=True)
    assert_close(hippos_logits(model, ids), expected)
    # The check has teeth: read as current-order blocks without the shift, the same norms give other logits.
    unshifted = {k: v for k, v in t.items() if not k.startswith("backbone.norm.")}
    unshifted["backbone.ln_f.weight"], unshifted["backbone.ln_f.bias"] = norm_params(t, "backbone.norm")
    assert (reference_logits(unshifted, ids) - expected).abs().max() > 1e-2


def test_old_layout_with_stale_ln_f_warns_and_ignores_it(tmp_path):
    t = make_official(extra_norm=True)
    stale = dict(t, **{"backbone.ln_f.weight": torch.ones(16, dtype=F64), "backbone.ln_f.bias": torch.ones(16)})
    path = save(lightning(old_names(stale)), tmp_path / "model.pt")
    with pytest.warns(UserWarning, match="ln_f"):
        model = load_official(path, n_head=2)
    ids = ids_for(56)
    assert_close(hippos_logits(model, ids), reference_logits(t, ids, old_order=True))


def test_old_names_without_extra_norm_are_only_renamed(tmp_path):
    t = make_official(seed=3)
    path = save(old_names(t), tmp_path / "model.pt")
    ids = ids_for(56)
    assert_close(hippos_logits(load_official(path, n_head=2), ids), reference_logits(t, ids))


def test_rotary_variant(tmp_path):
    t = make_official(n_layer=3, attn=(0, 2), rotary_dim=4, seed=4)
    path = save(t, tmp_path / "model-2attn-rotary.pt")
    model = load_official(path, n_head=2)
    assert model.config.rotary_dim == 4 and model.config.attn_layer_idx == (0, 2)
    ids = ids_for(56, length=11)
    assert_close(hippos_logits(model, ids), reference_logits(t, ids))


def test_rotary_inv_freq_must_match_the_formula():
    t = make_official(attn=(1,), rotary_dim=4)
    t["backbone.layers.1.mixer.rotary_emb.inv_freq"] = t["backbone.layers.1.mixer.rotary_emb.inv_freq"] * 1.01
    with pytest.raises(ValueError, match=r"rotary_emb\.inv_freq differs"):
        convert_official_state_dict(t, n_head=2)


def test_multi_head_h3_and_mlp_width_are_inferred(tmp_path):
    t = make_official(head_dim=2, d_inner=24, attn=(), seed=5)
    model = load_official(save(t, tmp_path / "model.pt"))  # no attention: n_head is not needed
    assert (model.config.head_dim, model.config.d_inner, model.config.attn_layer_idx) == (2, 24, ())
    assert 16 % model.config.n_head == 0
    ids = ids_for(56)
    assert_close(hippos_logits(model, ids), reference_logits(t, ids))


def test_converted_state_dict_loads_strictly():
    t = make_official()
    before = set(t)
    config, sd = convert_official_state_dict(t, n_head=2)
    assert set(t) == before  # the input is not modified
    model = H3LM(config)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.lm_head.weight, t[EMB].float())


# ---- what cannot be read from the shapes ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "given", "vocab", "multiple"),
    [(50264, None, 50257, 8), (56, None, 56, 8), (50, None, 50, 1), (56, 50, 50, 8), (50, 45, 45, 50)],
)
def test_vocabulary_rule(rows, given, vocab, multiple):
    t = {k: v.float() for k, v in make_official(n_layer=1, attn=(), rows=rows).items()}
    config, _ = convert_official_state_dict(t, vocab_size=given)
    assert (config.vocab_size, config.pad_vocab_size_multiple, config.padded_vocab_size) == (vocab, multiple, rows)


def test_vocab_size_larger_than_the_embedding_is_refused():
    with pytest.raises(ValueError, match="vocab_size 57"):
        convert_official_state_dict(make_official(attn=()), vocab_size=57)


def test_published_d_model_gives_n_head():
    t = {k: v.float() for k, v in make_official(d_model=768, n_layer=1, attn=(0,), rows=8, d_inner=8).items()}
    config, _ = convert_official_state_dict(t)
    assert config.n_head == 12
    config, _ = convert_official_state_dict(t, n_head=8)
    assert config.n_head == 8


def test_unknown_d_model_with_attention_needs_n_head():
    with pytest.raises(ValueError, match="pass n_head="):
        convert_official_state_dict(make_official())


# ---- bad checkpoints ----------------------------------------------------------------------------------------
def test_missing_keys_are_all_listed(tmp_path):
    t = make_official()
    del t["backbone.layers.2.mixer.kernel.kernel.A_imag"], t["backbone.ln_f.bias"]
    path = save(t, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"missing keys \(2\)") as err:
        load_official(path, n_head=2)
    message = str(err.value)
    assert str(path) in message
    assert "backbone.layers.2.mixer.kernel.kernel.A_imag" in message and "backbone.ln_f.bias" in message


def test_unexpected_and_misshaped_keys_are_all_listed(tmp_path):
    t = make_official()
    t["backbone.layers.0.mixer.extra_scale"] = torch.ones(3)
    t["decoder.weight"] = torch.ones(2)
    t["backbone.layers.2.mixer.kernel.kernel.A_imag"] = torch.zeros(16, 5)
    path = save(t, tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"unexpected keys \(2\)") as err:
        load_official(path, n_head=2)
    message = str(err.value)
    assert message.startswith(f"{path}: the checkpoint does not fit the H3 model its shapes describe (d_model 16")
    assert "backbone.layers.0.mixer.extra_scale" in message and "decoder.weight" in message
    assert "wrong shapes (1): backbone.layers.2.mixer.kernel.kernel.A_imag: file (16, 5) vs model (16, 4)" in message


def test_lightning_keys_without_the_model_prefix_are_listed():
    wrapped = lightning(make_official())
    wrapped["state_dict"]["loss_fn.weight"] = torch.ones(2)
    with pytest.raises(ValueError, match="loss_fn.weight"):
        convert_official_state_dict(wrapped, n_head=2)


def test_untied_head_is_refused():
    t = make_official()
    t["lm_head.weight"] = t[EMB] + 1e-3
    with pytest.raises(ValueError, match="not tied"):
        convert_official_state_dict(t, n_head=2)


def test_c_without_the_leading_channel_axis_is_refused():
    t = make_official()
    t["backbone.layers.0.mixer.ssm_k_kernel.kernel.C"] = t["backbone.layers.0.mixer.ssm_k_kernel.kernel.C"][0]
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.ssm_k_kernel\.kernel\.C"):
        convert_official_state_dict(t, n_head=2)


def test_diagonal_modes_must_be_half_the_state():
    t = make_official(attn=())
    for l in range(3):
        t[f"backbone.layers.{l}.mixer.kernel.kernel.inv_A_real"] = torch.zeros(16, 3)
    with pytest.raises(ValueError, match="modes = d_state / 2"):
        convert_official_state_dict(t)


def test_truncated_file_is_reported(tmp_path):
    data = Path(save(make_official(), tmp_path / "full.pt")).read_bytes()
    path = tmp_path / "model.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged or truncated") as err:
        load_official(path, n_head=2)
    assert str(path) in str(err.value)


UNPICKLED = []


class Payload:
    """Stands for arbitrary code in a pickle: unpickling it would record itself."""

    def __setstate__(self, state):
        UNPICKLED.append(state)


def test_arbitrary_objects_are_refused(tmp_path):
    payload = Payload()
    payload.note = "should never be rebuilt"
    path = save({**make_official(), "trap": payload}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="weights_only=True") as err:
        load_official(path, n_head=2)
    assert str(path) in str(err.value) and "Payload" in str(err.value)
    assert UNPICKLED == []


def test_a_file_without_a_state_dict_is_refused(tmp_path):
    path = save(torch.zeros(3), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_official(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_official(tmp_path / "nope.pt")


# ---- from_pretrained ------------------------------------------------------------------------------------------
def test_from_pretrained_reads_an_official_file(tmp_path):
    t = make_official()
    path = save(lightning(t), tmp_path / "model.pt")
    model = H3LM.from_pretrained(path, n_head=2)
    assert isinstance(model, H3LM) and not model.training
    ids = ids_for(56)
    assert_close(hippos_logits(model, ids), reference_logits(t, ids))


def test_a_misfit_file_is_reported_before_any_weight_is_initialised(tmp_path):
    """The key check runs on a meta-device model: a bad file costs no initialisation of real weights."""
    built = []

    class Recording(H3LM):
        def __init__(self, config):
            super().__init__(config)
            built.append(next(self.parameters()).device.type)

    t = make_official()
    del t["backbone.ln_f.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): backbone\.ln_f\.bias"):
        load_pretrained(Recording, save(t, tmp_path / "model.pt"), n_head=2)
    assert built == ["meta"]
    model = load_pretrained(Recording, save(make_official(), tmp_path / "good.pt"), n_head=2)
    assert isinstance(model, Recording) and built == ["meta", "meta", "cpu"]


# ---- one H3 mixer's names ----------------------------------------------------------------------------------
def official_h3_mixer(D: int = 16, N: int = 8) -> dict[str, Tensor]:
    """One H3 mixer's tensors with the official names and shapes (docs/checkpoints.md), relative to the mixer."""
    t = {}
    for proj in ("q_proj", "k_proj", "v_proj", "output_linear"):
        t[f"{proj}.weight"], t[f"{proj}.bias"] = torch.randn(D, D), torch.randn(D)
    t["ssm_k_D"] = torch.randn(D)
    t["ssm_k_kernel.kernel.B"] = torch.randn(D, N)
    t["ssm_k_kernel.kernel.C"] = torch.randn(1, D, N)
    t["kernel.kernel.log_dt"] = torch.randn(D)
    t["kernel.kernel.inv_A_real"] = torch.randn(D, N // 2)
    t["kernel.kernel.A_imag"] = torch.randn(D, N // 2)
    t["kernel.kernel.B"] = torch.randn(D, N // 2, 2)
    t["kernel.kernel.C"] = torch.randn(1, D, N // 2, 2)
    t["D"] = torch.randn(D)
    return t


def test_convert_h3_mixer_loads_into_the_layer_strictly():
    official = official_h3_mixer()
    layer = H3(16, 8)
    result = layer.load_state_dict(convert_h3_mixer(official), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    params = dict(layer.state_dict())
    mapping = {  # written out here, not read from OFFICIAL_H3_NAMES, so that the table itself is checked
        "ssm_k_kernel.kernel.B": "shift.B",
        "ssm_k_kernel.kernel.C": "shift.C",
        "kernel.kernel.log_dt": "diag.log_dt",
        "kernel.kernel.inv_A_real": "diag.inv_A_real",
        "kernel.kernel.A_imag": "diag.A_imag",
        "kernel.kernel.B": "diag.B",
        "kernel.kernel.C": "diag.C",
    }
    assert mapping == OFFICIAL_H3_NAMES
    for name, value in official.items():
        ours = mapping.get(name, name)
        assert torch.equal(params[ours], value[0] if name.endswith("kernel.C") else value), name
    assert set(params) == {mapping.get(n, n) for n in official}


@pytest.mark.parametrize("key", ["ssm_k_kernel.kernel.C", "kernel.kernel.C"])
def test_convert_h3_mixer_refuses_multi_output_C(key):
    official = official_h3_mixer()
    official[key] = torch.cat([official[key], official[key]])
    with pytest.raises(ValueError, match=f"{key}: expected one output channel \\(leading axis 1\\)"):
        convert_h3_mixer(official)


def test_official_name_inverts_the_renaming():
    _, ours = convert_official_state_dict(make_official(), n_head=2)
    file_keys = set(make_official())
    assert {official_name(k) for k in ours} == file_keys
    assert official_name("backbone.layers.0.mixer.diag.A_imag") == "backbone.layers.0.mixer.kernel.kernel.A_imag"
    assert official_name("backbone.ln_f.weight") == "backbone.ln_f.weight"


def test_check_keys_names_every_problem_in_the_files_names():
    expected = {"a.shift.B": torch.Size([4, 2]), "b": torch.Size([3]), "c": torch.Size([1])}
    found = {"a.shift.B": torch.zeros(4, 3), "c": torch.zeros(1), "d": torch.zeros(2), "e": torch.zeros(1)}
    with pytest.raises(ValueError) as err:
        check_keys(expected, found, "f.pt does not fit:", lambda k: k.replace("shift.B", "ssm_k_kernel.kernel.B"))
    assert str(err.value).splitlines() == [
        "f.pt does not fit:",
        "  missing keys (1): b",
        "  unexpected keys (2): d, e",
        "  wrong shapes (1): a.ssm_k_kernel.kernel.B: file (4, 3) vs model (4, 2)",
    ]
    check_keys(expected, {k: torch.zeros(v) for k, v in expected.items()}, "unused")  # all fit: no error
