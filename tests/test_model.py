"""Our CausalLM against transformers' Llama / Qwen3 / Qwen2 on tiny random configs, in fp32:
full prompts, chunked prefill then decode through a shuffled paged KV pool, several requests in
one flattened batch, and captured hidden states."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from engine.config import ModelConfig
from engine.model import CausalLM
from kernels.cpu_gemm import Linear, cpu_has_native_bf16, fp16_exact_shift
from kernels.attention import build_attention_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, BLOCK, NUM_BLOCKS = 128, 4, 32
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
HF_MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_theta=500.0)),
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, tie_word_embeddings=True)),
    # Llama 3.1 RoPE scaling; with D=16, theta 500, L=32 the frequencies fall in all three bands
    "llama3_rope": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32)),  # head_dim != 64 / 4
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**COMMON)),  # q/k/v biases
    "llama_bias": lambda: _with_random_biases(LlamaForCausalLM(LlamaConfig(**COMMON, attention_bias=True))),
}


def _with_random_biases(model):
    """Llama with attention_bias has q/k/v/o biases; HF inits them to zero, which would hide a
    bias we failed to apply."""
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(param, std=0.5)
    return model


@pytest.fixture(scope="module", params=list(HF_MODELS))
def pair(request):
    """(transformers model, our CausalLM with its weights), fp32, eval."""
    torch.manual_seed(0)
    hf = HF_MODELS[request.param]().eval()
    cfg = ModelConfig.from_hf(json.loads(hf.config.to_json_string()))
    ours = CausalLM(cfg)
    ours.load_hf_state_dict(hf.state_dict())
    ours.eval()
    assert cfg.qk_norm == (request.param == "qwen3")
    return hf, ours


class PagedRun:
    """Drives CausalLM forwards over a KV pool whose blocks are handed out in shuffled order."""

    def __init__(self, model: CausalLM, seed: int = 0) -> None:
        cfg = model.cfg
        self.model = model
        shape = (NUM_BLOCKS * BLOCK, cfg.num_kv_heads, cfg.head_dim)
        self.kv = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_layers)]
        self.free = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}

    @torch.inference_mode()
    def forward(self, chunks: dict[str, list[int]], capture=()):
        """One flattened forward of each request's next tokens; logits of every token."""
        for name, ids in chunks.items():
            total = self.cached.get(name, 0) + len(ids)
            table = self.tables.setdefault(name, [])
            while len(table) * BLOCK < total:
                table.append(self.free.pop())
        seq_lens = [self.cached.get(n, 0) + len(ids) for n, ids in chunks.items()]
        batch = build_attention_batch([len(ids) for ids in chunks.values()], seq_lens,
                                      [self.tables[n] for n in chunks], BLOCK, torch.device("cpu"))
        flat = torch.tensor([t for ids in chunks.values() for t in ids])
        logits, hidden = self.model(flat, batch.token_pos, self.kv, batch,
                                    torch.arange(len(flat)), capture)
        for name, s in zip(chunks, seq_lens):
            self.cached[name] = s
        return logits, hidden


@torch.inference_mode()
def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0]


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_full_prompt_logits_match(pair):
    hf, ours = pair
    ids = random_ids(37, seed=1)
    logits, hidden = PagedRun(ours).forward({"a": ids})
    assert hidden is None
    close(logits, hf_logits(hf, ids))


def test_chunked_prefill_then_decode_matches(pair):
    """A 30-token sequence fed as prefill chunks of 7, 9, 11 and then 3 single-token decodes."""
    hf, ours = pair
    ids = random_ids(30, seed=2)
    ref = hf_logits(hf, ids)
    run, start = PagedRun(ours, seed=5), 0
    for n in (7, 9, 11, 1, 1, 1):
        logits, _ = run.forward({"a": ids[start:start + n]})
        close(logits, ref[start:start + n])
        start += n


def test_requests_of_different_lengths_in_one_batch(pair):
    """a's first 10 tokens run alone; then a's last 3, b's 5-token prompt and c's 19 go together."""
    hf, ours = pair
    a, b, c = random_ids(13, seed=3), random_ids(5, seed=4), random_ids(19, seed=6)
    run = PagedRun(ours, seed=7)
    run.forward({"a": a[:10]})
    logits, _ = run.forward({"a": a[10:], "b": b, "c": c})
    close(logits[:3], hf_logits(hf, a)[10:])
    close(logits[3:8], hf_logits(hf, b))
    close(logits[8:], hf_logits(hf, c))


def test_captured_hidden_states_match_hf(pair):
    hf, ours = pair
    ids = random_ids(21, seed=8)
    with torch.inference_mode():
        ref = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states
    capture = (0, 2, 1)  # 0 = embeddings, i = output of layer i (i < num_layers)
    run = PagedRun(ours)
    _, first = run.forward({"a": ids[:12]}, capture)
    _, rest = run.forward({"a": ids[12:]}, capture)
    hidden = torch.cat([first, rest])  # [T, 3, d]
    assert hidden.shape == (21, 3, ours.cfg.hidden_size)
    for j, layer in enumerate(capture):  # captured in the order asked for
        close(hidden[:, j], ref[layer][0])


@pytest.mark.parametrize("model_type", ["gpt2", "mixtral", "gemma"])
def test_from_hf_rejects_unsupported_model_type(model_type):
    hf = {"model_type": model_type, **COMMON, "num_hidden_layers": 2}
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
                                  {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}])
def test_from_hf_rejects_unsupported_rope_scaling(rope):
    with pytest.raises(ValueError, match="rope"):
        ModelConfig.from_hf({"model_type": "llama", **COMMON, "rope_parameters": rope})
    with pytest.raises(ValueError, match="rope"):  # the older transformers 4 key
        ModelConfig.from_hf({"model_type": "llama", **COMMON, "rope_scaling": rope})


def test_sliding_window_is_not_silently_ignored():
    """Mistral's sliding window (4096 by default, 8 here): past it, transformers attends to the
    last 8 keys only and our full attention differs. from_hf must refuse such a model or cap
    the context at the window, inside which the two agree."""
    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8)).eval()
    try:
        cfg = ModelConfig.from_hf(json.loads(hf.config.to_json_string()))
    except ValueError:
        return
    assert cfg.max_position <= 8, "positions past the sliding window would be computed wrongly"
    ours = CausalLM(cfg)
    ours.load_hf_state_dict(hf.state_dict())
    ids = random_ids(cfg.max_position, seed=9)
    close(PagedRun(ours.eval()).forward({"a": ids})[0], hf_logits(hf, ids))


def test_inactive_qwen_sliding_window_keeps_the_full_context():
    """Qwen2/Qwen3 configs carry a sliding_window that applies only with use_sliding_window."""
    hf = {"model_type": "qwen2", **COMMON, "sliding_window": 4, "use_sliding_window": False}
    assert ModelConfig.from_hf(hf).max_position == 128


def test_load_rejects_a_missing_tensor(pair):
    hf, ours = pair
    state = dict(hf.state_dict())
    del state["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ValueError, match="lacks"):
        CausalLM(ours.cfg).load_hf_state_dict(state)


def _packed_linear(weight: torch.Tensor, bias: bool, half_rows: int) -> Linear:
    lin = Linear(weight.shape[1], weight.shape[0], bias=bias).to(weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias:
            lin.bias.copy_(torch.randn(weight.shape[0]).to(weight.dtype))
    lin.pack_for_cpu(native_rows=0, rows_hint=64, half_rows=half_rows)
    return lin


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_fp16_image_of_bf16_weights_computes_the_float32_product(scale):
    """bf16 weights of any magnitude have an exact fp16 image of w·2^k; through it, and through
    the packed float32 image beyond half_rows, y equals x @ w.float()ᵀ + b (summation order
    aside) at every row count."""
    torch.manual_seed(0)
    w = (torch.randn(96, 64) * scale).bfloat16()
    lin = _packed_linear(w, bias=True, half_rows=8)
    assert lin.cpu.half is not None and lin.cpu.half_rows == 8
    assert (w.float().abs().max() * 2.0 ** lin.cpu.half_shift) <= torch.finfo(torch.float16).max
    for rows in (1, 2, 8, 9, 40):  # fp16 image up to 8 rows, packed float32 beyond
        x = torch.randn(rows, 64)
        want = x @ w.float().t() + lin.bias.float()
        with torch.inference_mode():
            got = lin(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="needs a CPU with native bf16")
def test_bf16_image_computes_what_f_linear_does_in_bf16():
    """On a CPU with native bf16 the image keeps the weight in bf16: y = x @ wᵀ (+ b) in bf16
    out, as F.linear gives it (float32 accumulation both; summation order aside), at every row
    count, and no fp16 image is made."""
    torch.manual_seed(0)
    w = torch.randn(96, 64).bfloat16()
    lin = Linear(64, 96, bias=True).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(w)
    lin.pack_for_cpu(native_rows=0, rows_hint=64, half_rows=8, dtype=torch.bfloat16)
    assert lin.cpu.half is None and lin.cpu.dtype == torch.bfloat16
    for rows in (1, 2, 8, 9, 40):
        x = torch.randn(rows, 64).bfloat16()
        want = torch.nn.functional.linear(x, w, lin.bias)
        with torch.inference_mode():
            got = lin(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_no_fp16_image_where_it_would_round():
    """float32 weights (23 mantissa bits) have no exact fp16 image: the layer keeps the packed
    float32 GEMM, exact to float32 math, at every row count; non-finite weights neither."""
    torch.manual_seed(0)
    w = torch.randn(32, 16)
    assert fp16_exact_shift(w) is None
    assert fp16_exact_shift(torch.zeros(4, 4)) == 0
    assert fp16_exact_shift(torch.tensor([[1.0, float("inf")]])) is None
    spread = torch.tensor([[2.0 ** 40, 2.0 ** -40]])  # wider than fp16's exponent range
    assert fp16_exact_shift(spread) is None
    lin = _packed_linear(w, bias=False, half_rows=64)
    assert lin.cpu.half is None
    x = torch.randn(3, 16)
    with torch.inference_mode():
        torch.testing.assert_close(lin(x), x @ w.t(), rtol=1e-6, atol=1e-6)


def test_packed_linear_trains_through_its_own_weight():
    """With gradients on (drafter training), a packed Linear is a plain nn.Linear: the images
    are for inference only, and the weight's gradient is x's contribution, as F.linear gives."""
    torch.manual_seed(0)
    lin = _packed_linear(torch.randn(8, 4).bfloat16().float(), bias=False, half_rows=64)
    assert lin.cpu.half is not None
    x = torch.randn(3, 4)
    lin(x).sum().backward()
    torch.testing.assert_close(lin.weight.grad, torch.ones(8, 3) @ x)
