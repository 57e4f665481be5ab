"""Shared fixtures: a tiny byte-level BPE tokenizer directory, as HF's save_pretrained writes one."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

if "triton" not in sys.modules and not torch.cuda.is_available():
    # Triton kernels run under Triton's interpreter on a CPU. It is chosen when a function is
    # decorated, triton's own helpers included, so before anything imports triton (transformers
    # does): test modules are all imported before any test runs.
    os.environ.setdefault("TRITON_INTERPRET", "1")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CORPUS = ["Hello world, stop here please. The cat sat on the mat."] * 50 + ["héllo café naïve"] * 20


def build_tokenizer_dir(directory: Path, chat_template: str | None = CHATML, **config) -> Path:
    """Train a ~300-token byte-level BPE (emoji and CJK stay split into byte tokens) and write
    tokenizer.json + tokenizer_config.json into `directory`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    cfg = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", **config}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def make_tokenizer_dir():
    """The builder itself, for tests that need a variant (another template, add_bos_token)."""
    return build_tokenizer_dir


# ---- a tiny random Llama checkpoint with the tokenizer above, for engine tests -----------------
TINY_VOCAB = 320  # >= the tokenizer's ~306 tokens; ids past it are never produced by text


def build_tiny_llama_dir(directory: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama (GQA 4/2 heads) saved with save_pretrained next to the tokenizer.
    initializer_range 0.2 spreads the logits so greedy picks have clear margins (no near-ties
    between our engine and transformers)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    build_tokenizer_dir(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run torch single-threaded: the tiny models' matmuls are microseconds, and on a shared
    2-core machine OpenMP's thread barriers make them 1000x slower. Only speed changes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
