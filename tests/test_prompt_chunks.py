"""Long captions in the WebUI's 75-token chunks, and the WebUI's prompt syntax in captions.

Oracles are written out by hand from the WebUI's rules (start + 75 tokens + end per chunk, end-token padding,
the tail after a comma within 20 tokens moves to the next chunk) and encoded with the bare text encoder, never
through the code under test. The real WebUI comparison is tests/webui/test_conditioning.py.
"""

from __future__ import annotations

import pytest
import torch

from lora_train.engine.config.checks import ConfigError
from lora_train.engine.data.caches import TextCache
from lora_train.engine.data.prompt_syntax import parse_attention, plain_text
from tests.conftest import make_config

BOS, EOS = 49406, 49407


def _id(tokenizer, word: str) -> int:
    return tokenizer.get_vocab()[word + "</w>"]


def _chunk(ids: list[int], pad: int = EOS) -> list[int]:
    return [BOS, *ids, EOS, *[pad] * (76 - len(ids) - 1)]


def test_a_150_token_caption_is_two_chunks_each_encoded_alone(tiny):
    tok, encoder = tiny.tokenizers[0], tiny.text_encoders[0]
    cat, dog = _id(tok, "cat"), _id(tok, "dog")
    caption = " ".join(["cat"] * 100 + ["dog"] * 50)
    tokens = tiny.tokenize([caption], max_chunks=2)
    first, second = _chunk([cat] * 75), _chunk([cat] * 25 + [dog] * 50)
    assert tokens.ids[0].tolist() == [first + second]
    with torch.no_grad():
        expected = torch.cat([encoder(torch.tensor([first])).last_hidden_state,
                              encoder(torch.tensor([second])).last_hidden_state], dim=1)
        torch.testing.assert_close(tiny.encode_text(tokens).context, expected)
    # max_token_length 75 keeps the first chunk only: what kohya's default trains on
    assert tiny.tokenize([caption], max_chunks=1).ids[0].tolist() == [first]
    # 225 does not add an empty third chunk to a caption that needs two
    assert tiny.tokenize([caption], max_chunks=3).ids[0].shape == (1, 154)


def test_the_tail_after_a_near_comma_moves_to_the_next_chunk(tiny):
    tok = tiny.tokenizers[0]
    cat, dog, comma = _id(tok, "cat"), _id(tok, "dog"), _id(tok, ",")
    # 70 cats, a comma at token 70, then 10 dogs: the chunk is full after 4 dogs; the comma is 5 tokens back
    caption = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    ids = tiny.tokenize([caption], max_chunks=2).ids[0][0].tolist()
    assert ids[:77] == _chunk([cat] * 70 + [comma]) and ids[77:] == _chunk([dog] * 10)


def test_a_batch_pads_shorter_captions_with_the_empty_chunk(tiny):
    long = " ".join(["cat"] * 80)
    tokens = tiny.tokenize(["a dog", long], max_chunks=3)
    assert tokens.ids[0].shape == (2, 154)
    assert tokens.ids[0][0, 77:].tolist() == [BOS] + [EOS] * 76  # the WebUI's empty_chunk
    # the text cache pads a cached caption the same way
    cache = TextCache(make_config(".", ".", max_token_length=225), tiny)
    with torch.no_grad():
        torch.testing.assert_close(cache.encode(["a dog", long]).context, tiny.encode_text(tokens).context)


def test_sdxl_pads_the_second_encoder_with_zeros_and_pools_the_first_chunk(tiny_sdxl):
    caption = " ".join(["cat"] * 80)
    tokens = tiny_sdxl.tokenize([caption], max_chunks=2)
    second = tokens.ids[1][0].tolist()
    assert second[77 + 7:] == [0] * 70 and second[77 + 6] == EOS  # "!" (id 0) after the end token, as OpenCLIP
    with torch.no_grad():
        cond = tiny_sdxl.encode_text(tokens)
        first_chunk = tiny_sdxl.text_encoders[1](tokens.ids[1][:, :77]).text_embeds
    assert cond.context.shape[1] == 154
    torch.testing.assert_close(cond.pooled, first_chunk)


def test_max_token_length_takes_kohyas_values_only():
    with pytest.raises(ConfigError, match="max_token_length"):
        make_config(".", ".", max_token_length=100)
    assert make_config(".", ".", max_token_length=150).max_token_length == 150


def test_the_webuis_attention_syntax():
    # the examples in the docstring of A1111's prompt_parser.parse_prompt_attention
    assert parse_attention("normal text") == [("normal text", 1.0)]
    assert parse_attention("an (important) word") == [("an ", 1.0), ("important", 1.1), (" word", 1.0)]
    assert parse_attention("(unbalanced") == [("unbalanced", 1.1)]
    assert parse_attention("\\(literal\\]") == [("(literal]", 1.0)]
    assert parse_attention("(unnecessary)(parens)") == [("unnecessaryparens", 1.1)]
    pieces = parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    expected = [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.1 / 1.1), (" a ", 1.1),
                ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]
    assert [t for t, _ in pieces] == [t for t, _ in expected]
    assert [w for _, w in pieces] == pytest.approx([w for _, w in expected])
    assert parse_attention("a BREAK b") == [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]
    assert plain_text("1girl, \\(cosplay\\), (smile:1.2), [hat]") == "1girl, (cosplay), smile, hat"


def test_escaped_brackets_train_as_the_literal_brackets(tiny):
    tok = tiny.tokenizers[0]
    ids = tiny.tokenize(["1girl, \\(cosplay\\), smile"]).ids[0][0].tolist()
    literal = tok("1girl, (cosplay), smile", add_special_tokens=False).input_ids
    assert ids[: len(literal) + 2] == [BOS, *literal, EOS]
    assert tok.get_vocab().get("\\</w>", -1) not in ids and tok.get_vocab()["\\"] not in ids


def test_emphasis_is_stripped_or_weighted_like_the_webuis_original_emphasis(tiny):
    encoder = tiny.text_encoders[0]
    plain = tiny.tokenize(["a red cat"])
    stripped = tiny.tokenize(["a (red:1.5) cat"])
    assert torch.equal(plain.ids[0], stripped.ids[0]) and bool((stripped.multipliers[0] == 1).all())
    weighted = tiny.tokenize(["a (red:1.5) cat"], weighted=True)
    assert torch.equal(weighted.ids[0], plain.ids[0])
    with torch.no_grad():
        z = encoder(plain.ids[0]).last_hidden_state
        multipliers = torch.ones(77)
        multipliers[2] = 1.5  # start, "a", "red"
        scaled = z * multipliers[None, :, None]
        expected = scaled * (z.mean() / scaled.mean())
        torch.testing.assert_close(tiny.encode_text(weighted).context, expected)
        torch.testing.assert_close(tiny.encode_text(stripped).context, z)
