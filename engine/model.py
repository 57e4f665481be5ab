"""Llama-family and Qwen3-family decoders over a flattened token batch, in plain torch.

One forward takes T tokens of many requests (no padding, no batch dimension) with their
absolute positions; attention finds each token's own request through the markers in
`AttentionBatch` and reads/writes the paged KV pool. Weights use Hugging Face's names so a
checkpoint's state dict loads directly; q/k/v and gate/up are fused into one matmul each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from kernels import paged_attention, store_kv  # Triton on CUDA, the torch reference elsewhere
from kernels.attention import AttentionBatch
from kernels.cpu_gemm import Linear


class Embedding(nn.Module):
    """Token embedding without random initialisation (weights always come from a checkpoint;
    nn.Embedding's normal_ init alone took 2.5 s of start-up on the meta device)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 as Hugging Face does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.weight32: torch.Tensor | None = None  # float32 image of a bf16 weight, set at load

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one call; the same math in float32
            w = self.weight if self.weight.dtype == torch.float32 else self.weight32
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # float32
        return self.weight * normed.to(x.dtype)  # rounded before the weight, as HF does


class Rotary(nn.Module):
    """RoPE, rotate-half convention: x*cos + rotate_half(x)*sin, angles pos / theta^(2i/D)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.reset_tables()

    def reset_tables(self) -> None:
        """(Re)compute the float32 tables on the module's device (skipped on the meta device)."""
        device = self.cos.device
        if device.type == "meta":
            return
        d = self.cfg.head_dim
        exponents = torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d
        inv_freq = 1.0 / self.cfg.rope_theta ** exponents  # [D/2]
        if self.cfg.rope_type == "llama3":
            inv_freq = llama3_scaled(inv_freq, self.cfg)
        angles = torch.outer(torch.arange(self.cfg.max_position, device=device).float(), inv_freq)
        # rotate_half(x) = [-x2, x1] = roll(x, D/2) * [-1, +1]: the sign is folded into sin
        self.cos = torch.cat([angles, angles], dim=-1).cos()  # [P, D]
        self.sin = torch.cat([-angles.sin(), angles.sin()], dim=-1)  # [P, D], signed

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for the batch's positions [T] -> each [T, 1, D] (once per forward)."""
        return self.cos[positions].to(dtype)[:, None], self.sin[positions].to(dtype)[:, None]

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, heads, D] -> x * cos + rotate_half(x) * sin."""
        cos, signed_sin = cos_sin
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def llama3_scaled(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1 RoPE scaling. With wavelength w = 2*pi / f and original context L:
    w < L / high_freq_factor: f kept; w > L / low_freq_factor: f / factor; in between, a linear
    blend s * f + (1 - s) * f / factor with s = (L / w - low) / (high - low)."""
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    length = cfg.rope_original_max_position
    wavelen = 2 * math.pi / inv_freq
    smooth = ((length / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    blended = smooth * inv_freq + (1 - smooth) * inv_freq / cfg.rope_factor
    out = torch.where(wavelen > length / low, inv_freq / cfg.rope_factor, blended)
    return torch.where(wavelen < length / high, inv_freq, out)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], batch: AttentionBatch) -> torch.Tensor:
        """x: [T, d] -> [T, d]; rope: (cos, sin) of the batch's positions;
        kv: this layer's (k_cache, v_cache), each [num_slots, Hkv, D]."""
        cfg, heads = self.cfg, self.cfg.num_heads
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(-1, heads + cfg.num_kv_heads, cfg.head_dim)  # [T, H + Hkv, D]
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)  # [T, Hkv, D]
        if cfg.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])], dim=1)
        qk = Rotary.apply(qk, rope)  # q and k heads rotated together
        q, k = qk[:, :heads], qk[:, heads:]  # [T, H, D], [T, Hkv, D]
        store_kv(kv[0], kv[1], k, v, batch.slot_mapping)
        out = paged_attention(q, kv[0], kv[1], batch, self.scale)  # [T, H, D]
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, rope, kv, batch):
        h = h + self.self_attn(self.input_layernorm(h), rope, kv, batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = Rotary(cfg)
        # bf16 weights on a CPU that emulates bf16: steps of at least this many tokens keep
        # activations in float32 end to end, as their GEMMs compute in float32 (see Linear);
        # 0 = never (the model's own dtype throughout)
        self.float32_min_rows = 0

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer, [num_slots, Hkv, D] x2
        batch: AttentionBatch,
        logits_indices: torch.Tensor,  # [S] rows of the batch whose next token is wanted
        capture_layers: tuple[int, ...] = (),  # 0 = embeddings, i = output of layer i, in this order
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits [S, V] float32, hidden [T, len(capture_layers), d] or None)."""
        h = self.embed_tokens(input_ids)  # [T, d]
        if 0 < self.float32_min_rows <= h.shape[0]:
            h = h.float()  # emulated bf16: the GEMMs compute in float32 (see Linear)
        rope = self.rope.tables(positions, h.dtype)
        saved = {0: h} if 0 in capture_layers else {}
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, kv_caches[i], batch)
            if i + 1 in capture_layers:
                saved[i + 1] = h
        logits = self.lm_head(self.norm(h[logits_indices])).float()  # [S, V]
        hidden = torch.stack([saved[i] for i in capture_layers], dim=1) if saved else None
        return logits, hidden

    @classmethod
    def from_hf_state_dict(cls, cfg: ModelConfig, state: dict[str, torch.Tensor],
                           device: torch.device, dtype: torch.dtype) -> CausalLM:
        """Build without random initialisation (meta device), then copy the checkpoint in."""
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model = model.to_empty(device=device)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.load_hf_state_dict(state)
        model.rope.reset_tables()  # float32, cast per use as Hugging Face does
        return model.eval()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face names (model.layers.i.self_attn.q_proj.weight, ...), fusing q/k/v
        and gate/up. Raises on any missing or unexpected tensor."""
        own = self.state_dict()
        loaded: set[str] = set()
        for name, tensor in _fuse_hf(state, self.cfg).items():
            if name not in own:
                raise ValueError(f"unexpected tensor in checkpoint: {name}")
            if own[name].shape != tensor.shape:
                raise ValueError(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(own[name].shape)}")
            own[name].copy_(tensor)
            loaded.add(name)
        for norm in self.modules():
            if isinstance(norm, RMSNorm):
                norm.weight32 = norm.weight.detach().float()
        missing = set(own) - loaded - ({"lm_head.weight"} if self.cfg.tie_word_embeddings else set())
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:5]}")


def _fuse_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {k.removeprefix("model."): v for k, v in state.items()
           if "rotary_emb" not in k}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            parts = [out.pop(f"{p}self_attn.{n}_proj.{kind}", None) for n in "qkv"]
            if all(t is not None for t in parts):
                out[f"{p}self_attn.qkv_proj.{kind}"] = torch.cat(parts, dim=0)
        gate, up = out.pop(f"{p}mlp.gate_proj.weight"), out.pop(f"{p}mlp.up_proj.weight")
        out[f"{p}mlp.gate_up_proj.weight"] = torch.cat([gate, up], dim=0)
    return out
