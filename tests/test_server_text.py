"""TextProcessor: encode, chat templates as HF renders them, incremental detokenizing, stop strings."""
from __future__ import annotations

import pytest

from server.text import ChatTemplateError, IncrementalDetokenizer, TextProcessor

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def text(tokenizer_dir) -> TextProcessor:
    return TextProcessor.from_dir(tokenizer_dir)


def feed_one_by_one(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.feed([i]) for i in ids]


def test_encode_adds_no_special_tokens_by_default(text):
    ids = text.encode("Hello world")
    assert text.decode(ids) == "Hello world"
    assert text.bos_token_id not in ids


def test_encode_adds_bos_when_config_says_so(tmp_path, make_tokenizer_dir):
    text = TextProcessor.from_dir(make_tokenizer_dir(tmp_path, add_bos_token=True))
    ids = text.encode("Hello")
    assert ids[0] == text.tokenizer.token_to_id("<|endoftext|>")
    assert text.decode(ids) == "Hello"


def test_chat_template_from_config_renders_chatml(text):
    rendered = text.render_chat(MESSAGES)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                        "<|im_start|>assistant\n")
    ids = text.apply_chat_template(MESSAGES)
    assert ids[0] == text.tokenizer.token_to_id("<|im_start|>")  # special tokens parsed, not spelled
    assert text.tokenizer.decode(ids, skip_special_tokens=False) == rendered
    assert not text.render_chat(MESSAGES, add_generation_prompt=False).endswith("assistant\n")


def test_chat_template_jinja_file_wins_and_has_hf_helpers(tmp_path, make_tokenizer_dir):
    directory = make_tokenizer_dir(tmp_path)
    (directory / "chat_template.jinja").write_text(
        "{{ bos_token }}\n{% for m in messages %}\n    {% set x = 1 %}\n{{ m | tojson }}\n{% endfor %}")
    text = TextProcessor.from_dir(directory)
    # trim_blocks/lstrip_blocks as HF: block lines leave no newline or indentation behind
    assert text.render_chat([{"role": "user", "content": "é"}]) == '<|endoftext|>\n{"role": "user", "content": "é"}\n'


def test_raise_exception_in_template_is_a_chat_template_error(tmp_path, make_tokenizer_dir):
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    text = TextProcessor.from_dir(make_tokenizer_dir(tmp_path, chat_template=template))
    assert text.render_chat([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first must be user"):
        text.apply_chat_template(MESSAGES)


def test_missing_or_broken_template_is_a_chat_template_error(tmp_path, make_tokenizer_dir):
    none = TextProcessor.from_dir(make_tokenizer_dir(tmp_path / "a", chat_template=None))
    broken = TextProcessor.from_dir(make_tokenizer_dir(tmp_path / "b", chat_template="{% for %}"))
    for text in (none, broken):
        with pytest.raises(ChatTemplateError):
            text.apply_chat_template(MESSAGES)
        assert text.encode("Hello")  # plain completions still work


def test_utf8_split_across_tokens_never_emits_replacement_char(text):
    target = "Hello 😀 日本 café"
    ids = text.encode(target)
    assert len(ids) > len(target.split()) + 6  # the emoji and CJK really are split into bytes
    deltas = feed_one_by_one(text.detokenizer(text.encode("Say:")), ids)
    assert "".join(deltas) == target
    assert not any("\ufffd" in d for d in deltas)
    assert "😀" in deltas  # emitted whole, once its last byte arrived


def test_several_tokens_per_feed_and_skip_special(text):
    ids = text.encode("Hello world") + [text.tokenizer.token_to_id("<|im_end|>")]
    detok = text.detokenizer()
    assert detok.feed(ids[:2]) + detok.feed(ids[2:]) + detok.finish() == "Hello world"
    assert detok.num_tokens == len(ids)


def test_finish_drops_an_incomplete_character(text):
    ids = text.encode("ok 😀")[:-1]  # cut inside the emoji's bytes (max_tokens reached)
    detok = text.detokenizer()
    out = "".join(feed_one_by_one(detok, ids)) + detok.finish()
    assert out == "ok "


def test_stop_string_truncates_and_counts_tokens_up_to_it(text):
    ids = text.encode("Hello world, stop here please.")
    detok = text.detokenizer(stop=["stop", "please"])
    deltas = feed_one_by_one(detok, ids)
    assert detok.stopped and "".join(deltas) == "Hello world, " == detok.text
    # counted: every token up to and including the one that completed "stop"
    completing = next(n for n in range(1, len(ids) + 1) if "stop" in text.decode(ids[:n]))
    assert detok.num_tokens == completing
    assert detok.feed(ids) == "" and detok.finish() == ""


def test_stop_prefix_is_held_back_then_released(text):
    detok = text.detokenizer(stop=["world peace"])
    ids = text.encode("Hello world, stop")
    deltas = feed_one_by_one(detok, ids)
    sent = "".join(deltas)
    for i in range(1, len(deltas) + 1):  # at no point did the sent text end in "w", "wo", ...
        partial = "".join(deltas[:i])
        assert not any(partial.endswith("world peace"[:k]) for k in range(1, 11))
    assert sent + detok.finish() == "Hello world, stop"
    assert not detok.stopped


def test_earliest_stop_wins_across_token_boundaries(text):
    detok = text.detokenizer(stop=["sat on", "lo wor", "zzz"])
    out = "".join(feed_one_by_one(detok, text.encode("Hello world. The cat sat on")))
    assert out == "Hel" and detok.stopped


def test_stop_inside_text_released_at_finish(text):
    """A stop string completed only when finish() releases a held tail still stops."""
    detok = text.detokenizer(stop=["ok 😀"])
    ids = text.encode("ok 😀")
    assert "".join(feed_one_by_one(detok, ids)) == ""
    assert detok.stopped and detok.finish() == ""
