"""Trained conditioning equals the WebUI's generation conditioning, read through the WebUI's own code.

The test-only probe extension (tests/webui/conditioning_probe, installed by run.sh) calls the WebUI's
``get_learned_conditioning`` and ``tokenize_line`` and the trainer's own path (``WebUIHost`` bundle + text
cache) on the loaded checkpoint, with the WebUI's settings as given here.
"""

from __future__ import annotations

import pytest
from webui_client import WebUI

ROUTE = "/lora-train-probe/v1/conditioning"
SHORT = "acceptok, a photo of a cat sitting on a red chair"
# 150 tokens: two chunks, split where the WebUI's comma wrap splits them
LONG = ", ".join(f"tag{i} word" for i in range(30)) + ", " + " ".join(["blue"] * 10)
ESCAPED = "1girl, \\(cosplay\\), holding \\[sword\\], smile"
LITERAL = "1girl, (cosplay), holding [sword], smile"


def _probe(webui: WebUI, prompts: list[str], **settings) -> dict:
    reply = webui.post(ROUTE, {"prompts": prompts, **settings})
    if reply.status == 404:
        pytest.fail("the conditioning probe extension is not installed (tests/webui/run.sh installs it)")
    assert reply.status == 200, reply.body
    return reply.body


def _assert_same(entry: dict, what: str = "context") -> None:
    part = entry[what]
    assert part["webui_shape"] == part["ours_shape"], (entry["prompt"], part)
    assert part["nonfinite_match"], (entry["prompt"], part)  # the random checkpoint's CLIP may overflow: alike
    assert part["max_abs_diff"] <= 1e-5 * max(1.0, part["max_abs"]), (entry["prompt"], part)


# Prompts without emphasis: the WebUI's "Ignore" emphasis gives what "Original" gives (every multiplier is 1, the
# mean ratio exactly 1) except where the random checkpoint's CLIP overflows: "Original" then spreads the NaN of
# its mean over the whole chunk. "Ignore" keeps the overflow where it is, so the two can be compared entry by entry.
PLAIN = "Ignore"


@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_trained_conditioning_is_the_webuis_at_its_clip_skip(webui: WebUI, clip_skip: int) -> None:
    body = _probe(webui, [SHORT, LONG], clip_skip=clip_skip, sdxl_clip_l_skip=clip_skip == 3, emphasis=PLAIN)
    for entry in body["results"]:
        assert entry["clip_skip_used"] == clip_skip
        assert entry["our_tokens"] == entry["webui_tokens"]
        _assert_same(entry)
        if "vector" in entry:
            _assert_same(entry, "vector")


def test_a_150_token_caption_trains_in_the_webuis_two_chunks(webui: WebUI) -> None:
    entry = _probe(webui, [LONG], clip_skip=1, emphasis=PLAIN)["results"][0]
    assert len(entry["webui_tokens"][0]) == 154, "the prompt is meant to need two chunks"
    assert entry["our_tokens"] == entry["webui_tokens"]
    _assert_same(entry)
    # at max_token_length 75 the first chunk alone is trained (kohya's default)
    short = _probe(webui, [LONG], clip_skip=1, max_token_length=75, emphasis=PLAIN)["results"][0]
    assert short["our_tokens"][0] == entry["webui_tokens"][0][:77]


def test_escaped_brackets_train_as_the_webuis_parser_reads_them(webui: WebUI) -> None:
    parsed = _probe(webui, [ESCAPED], clip_skip=1)["results"][0]
    assert parsed["our_tokens"] == parsed["webui_tokens"]
    _assert_same(parsed)
    # ... which are the ids of the literal brackets (the WebUI with emphasis "None" reads text as it is)
    literal = _probe(webui, [LITERAL], clip_skip=1, emphasis="None")["results"][0]
    assert parsed["our_tokens"] == literal["webui_tokens"]


def test_weighted_captions_are_the_webuis_original_emphasis(webui: WebUI) -> None:
    entry = _probe(webui, ["a (red:1.4) cat on a [blue] chair"], clip_skip=1, weighted_captions=True)["results"][0]
    _assert_same(entry)
