"""Frozen configuration of the model and the engine. Pure Python (the server imports it)."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family or Qwen3-family decoder (Qwen3 adds per-head q/k RMSNorm)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # or "llama3" (Llama 3.1+ frequency scaling)
    rope_factor: float = 1.0  # llama3: long wavelengths are divided by this
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position: int = 8192
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    attention_bias: bool = False  # bias on q/k/v (Qwen2; Llama with attention_bias)
    o_proj_bias: bool = False  # bias on the output projection too (Llama with attention_bias)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    name: str = "model"

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "GQA needs num_heads % num_kv_heads == 0"
        assert self.hidden_size > 0 and self.head_dim > 0 and self.num_layers > 0

    @classmethod
    def from_hf(cls, hf: dict, name: str = "model") -> ModelConfig:
        """Build from a Hugging Face config.json dict (llama, qwen2, qwen3, mistral)."""
        model_type = hf.get("model_type", "llama")
        if model_type not in ("llama", "qwen2", "qwen3", "mistral"):
            raise ValueError(f"unsupported model_type {model_type!r}: Llama or Qwen3 families only")
        heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope scaling {rope_type!r} is not supported (default and llama3 are)")
        max_position = hf.get("max_position_embeddings", 8192)
        window = hf.get("sliding_window")
        if window and hf.get("use_sliding_window", model_type == "mistral"):
            max_position = min(max_position, window)  # inside the window, full attention agrees
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=rope.get("factor", 1.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_position=rope.get("original_max_position_embeddings", 8192),
            max_position=max_position,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qk_norm=model_type == "qwen3",
            attention_bias=model_type == "qwen2" or hf.get("attention_bias", False),
            o_proj_bias=model_type in ("llama", "mistral") and hf.get("attention_bias", False),
            eos_token_ids=eos_ids,
            bos_token_id=hf.get("bos_token_id"),
            name=name,
        )


SPEC_METHODS = ("none", "dspark", "dflash", "eagle3", "mtp1")
SCHEDULER_CAPACITIES = ("auto", "lagged", "current")  # auto: current eager, lagged under graphs


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs. `model` is an HF checkpoint dir, a .gguf file, or "" for the default."""

    model: str = ""
    served_model_name: str = ""  # name clients use; defaults to the model's name
    dtype: str = "auto"  # auto: bf16 where the device runs it fast, else float32
    device: str = "auto"  # auto: cuda if present, else cpu
    kv_block_size: int = 16  # tokens per KV page
    num_kv_blocks: int = 0  # 0: size the pool from kv_cache_tokens
    kv_cache_tokens: int = 32768  # KV capacity in tokens when num_kv_blocks == 0
    max_model_len: int = 0  # 0: the model's max_position
    max_num_seqs: int = 64  # running requests per step
    max_num_batched_tokens: int = 512  # per-step token budget (decode tokens + prefill chunks)
    max_waiting: int = 256  # bound of the waiting queue; beyond it requests are rejected (429)
    num_threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    # speculative decoding (engine/speculator.py): none, or a drafter name/path and the method
    spec_method: str = "none"  # none | dspark | dflash | eagle3 | mtp1
    drafter: str = ""  # shipped drafter name or directory; "" = the shipped one of spec_method
    block_size: int = 0  # most drafted tokens verified per request and round; 0 = drafter's gamma
    # how many drafts each request verifies: the prefix scheduler (drafters with confidences;
    # scheduler/), or a fixed length (block_size); auto = the scheduler where it can run
    allocation: str = "auto"  # auto | scheduler | fixed
    # beyond the paper (scheduler/ and engine/speculator.py):
    sla_tps: float = 0.0  # per-user decode tokens/s floor of requests that set none (0: none);
    #                       requests below their floor are admitted to verification first
    draft_skip_after: int = 2  # skip drafting for a request after this many rounds in a row
    #                            in which none of its block was verified (0: never skip)
    recalibrate: bool = True  # refit the temperatures online when acceptance drifts
    draft_cost: bool = True  # the scheduler weighs drafting time and stops drafting when it
    #                          does not pay (False: the paper's objective)
    # where the scheduler's K comes from (scheduler/policy.py PolicyConfig.capacity): "lagged",
    # the process's global search two rounds old (the paper's production variant: a step size
    # fixed before the round, a staircase's cliffs jumped); "current", Algorithm 1's early stop
    # on the round's own survival (a smooth eager curve); "auto": lagged where steps replay CUDA
    # graphs, current where they run eagerly
    scheduler_capacity: str = "auto"
    draft_guard: bool = False  # with the scheduler: no drafting at a batch size where drafted
    #                            rounds realize fewer tokens/s than plain ones (engine/draft_guard.py;
    #                            opt-in: on the AVX2 CPU it cost c1 3-6% in two of three A/B runs)
    # CUDA devices: each step's forward is a CUDA graph replayed at its token count rounded up
    # to a bucket (engine/cuda_graphs.py); False runs it eagerly. CPUs always run eagerly,
    # unpadded (padding would only add work there).
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.spec_method not in SPEC_METHODS:
            raise ValueError(f"method must be one of {SPEC_METHODS}, got {self.spec_method!r}")
        if self.scheduler_capacity not in SCHEDULER_CAPACITIES:
            raise ValueError(f"scheduler capacity must be one of {SCHEDULER_CAPACITIES}, got "
                             f"{self.scheduler_capacity!r}")
        if self.allocation not in ("auto", "scheduler", "fixed"):
            raise ValueError(f"allocation must be auto, scheduler or fixed, got {self.allocation!r}")
        if self.sla_tps < 0 or self.draft_skip_after < 0:
            raise ValueError("sla_tps and draft_skip_after must be >= 0 (0: off)")
        if self.block_size < 0:
            raise ValueError(f"block size must be >= 0 (0: the drafter's own), got {self.block_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kv_block_size < 1 or self.max_num_seqs < 1 or self.max_waiting < 0:
            raise ValueError("kv_block_size and max_num_seqs must be >= 1, max_waiting >= 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be >= max_num_seqs (one decode token each)")
