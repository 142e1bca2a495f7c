import time

import pytest
import torch

from prism_mcore.algorithms.response_format import (CAPTION_THINK_ANSWER, THINK_BOXED, get_format, last_boxed)
from prism_mcore.algorithms.segments import segment_masks, split_batch, split_response, with_terminator

VALID = "<caption>\n- a red triangle\n</caption>\n<think>\nx = 3.\n</think>\n<answer>\n3\n</answer>"


@pytest.mark.parametrize("text,valid,answer", [
    (VALID, True, "3"),
    ("  \n" + VALID + "\n\n", True, "3"),
    ("<caption></caption><think></think><answer></answer>", True, ""),
    ("<caption>a</caption> <think>b</think> <answer> B </answer>", True, "B"),
    ("<caption>a</caption><think>b</think><answer>x</answer> tail", False, None),
    ("head <caption>a</caption><think>b</think><answer>x</answer>", False, None),
    ("<caption>a</caption><answer>x</answer>", False, None),
    ("<think>b</think><answer>x</answer>", False, None),
    ("<caption>a</caption><think>b</think><answer>x", False, None),
    ("<caption>a<think>b</think><answer>x</answer>", False, None),
    ("<caption>a</caption>text<think>b</think><answer>x</answer>", False, None),
    # the lazy regex would pick the second </caption>, the one followed by <think>
    ("<caption>a</caption>b</caption><think>c</think><answer>x</answer>", True, "x"),
    ("<caption>a</caption><think>b</think><answer>x</answer>y</answer>", True, "x</answer>y"),
    ("", False, None),
    ("<caption></answer>", False, None),
])
def test_caption_think_answer(text, valid, answer):
    parsed = CAPTION_THINK_ANSWER.parse(text)
    assert parsed.valid is valid
    assert parsed.answer == answer


def test_matches_reference_regex_on_random_tag_soup():
    import random
    import re
    ref = re.compile(r"^\s*<caption>(.*?)</caption>\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
    pieces = ["<caption>", "</caption>", "<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        m = ref.match(text)
        parsed = CAPTION_THINK_ANSWER.parse(text)
        assert parsed.valid == bool(m), text
        if m:
            assert parsed.perception_end == m.end(1) + len("</caption>"), text


def test_format_check_is_linear_on_degenerate_loops():
    text = "<caption></caption><think></think><answer></answer>" * 3000 + "x"
    start = time.perf_counter()
    assert not CAPTION_THINK_ANSWER.is_valid(text)
    assert CAPTION_THINK_ANSWER.is_valid(text[:-1])
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("text,valid,answer", [
    ("<think>a</think> so \\boxed{\\frac{1}{2}}", True, "\\frac{1}{2}"),
    ("<think>a</think> \\boxed{1} then \\boxed{2}", True, "2"),
    ("<think>a</think> no box", False, None),
    ("<think>a</think> \\boxed{unclosed", False, None),
    ("<think>a</think><think>b</think>\\boxed{1}", False, None),
    ("\\boxed{1}", False, None),
])
def test_think_boxed(text, valid, answer):
    parsed = get_format("think_boxed").parse(text)
    assert (parsed.valid, parsed.answer) == (valid, answer)


def test_last_boxed_nested_and_get_format_errors():
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert last_boxed("\\boxed {x}") == "x"
    assert get_format(None) is CAPTION_THINK_ANSWER and get_format(THINK_BOXED) is THINK_BOXED
    with pytest.raises(ValueError, match="unknown response format"):
        get_format("nope")


@pytest.fixture(scope="module")
def tok():
    from prism_mcore.data.tokenizer import qwen3_tokenizer
    return qwen3_tokenizer()


def _decode(tok, ids, span):
    return tok.decode(ids[span[0]:span[1]], skip_special_tokens=False)


def test_split_valid_response_on_qwen_tokens(tok):
    ids = tok.encode("<caption>\n- 三角形 red\n</caption>\n<think>\nx=3\n</think>\n<answer>3</answer><|im_end|>")
    s = split_response(ids, tok)
    assert s.valid and s.answer == "3"
    assert s.caption[0] == 0 and s.caption[1] == s.reasoning[0] and s.reasoning[1] == len(ids)
    # `>\n` is one Qwen token, so the newline after </caption> stays with the caption
    assert _decode(tok, ids, s.caption) == "<caption>\n- 三角形 red\n</caption>\n"
    assert _decode(tok, ids, s.reasoning).startswith("<think>")
    assert _decode(tok, ids, s.reasoning).endswith("</answer><|im_end|>")
    # the boundary is the smallest prefix containing the closing tag
    assert "</caption>" in tok.decode(ids[:s.caption[1]], skip_special_tokens=True)
    assert "</caption>" not in tok.decode(ids[:s.caption[1] - 1], skip_special_tokens=True)


def test_split_keeps_separating_whitespace_with_reasoning(tok):
    ids = tok.encode("<caption>a</caption>  \n\n  <think>b</think><answer>c</answer>")
    s = split_response(ids, tok)
    assert s.valid
    assert _decode(tok, ids, s.caption).endswith("</caption>")
    assert _decode(tok, ids, s.reasoning).startswith("  \n\n  <think>")


@pytest.mark.parametrize("text", [
    "no tags at all, just rambling<|im_end|>",
    "<caption>a</caption> missing the rest<|im_end|>",
    "<caption>unclosed caption and <think>thinking</think><answer>3</answer>",
    "<think>b</think><answer>3</answer><|im_end|>",
    "<caption>a</caption>",
    "x",
    "",
])
def test_split_malformed_is_a_partition(tok, text):
    ids = tok.encode(text) if text else []
    s = split_response(ids, tok)
    assert not s.valid and s.answer is None
    assert s.caption == (0, s.reasoning[0]) and s.reasoning[1] == len(ids)
    assert s.caption[1] <= len(ids)
    if len(ids) >= 2:
        assert s.reasoning[1] > s.reasoning[0]


def test_split_uses_few_decodes(tok):
    caption = "<caption>" + " word" * 300 + "</caption>"
    ids = tok.encode(caption + "<think>" + " t" * 8000 + "</think><answer>1</answer><|im_end|>")

    class Counting:
        calls = 0
        tokens = 0

        def decode(self, token_ids, skip_special_tokens=False):
            Counting.calls += 1
            Counting.tokens += len(token_ids)
            return tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    s = split_response(ids, Counting())
    assert s.valid and s.caption[1] > 300
    assert Counting.calls <= 2 * 10 + 2
    # O(k log k) for a caption of k tokens: far less than decoding the response twice
    assert Counting.tokens < 1.5 * len(ids)


def test_split_batch_masks_and_think_boxed(tok):
    texts = [VALID + "<|im_end|>", "garbage out<|im_end|>"]
    rows = [tok.encode(t) for t in texts]
    width = max(map(len, rows)) + 3
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    splits = split_batch(ids, mask, tok)
    cap, rea, valid = segment_masks(splits, width)
    assert valid.tolist() == [True, False]
    assert not (cap & rea).any()
    assert torch.equal((cap | rea).long(), mask)
    boxed = split_response(tok.encode("<think>a</think> \\boxed{7}<|im_end|>"), tok, "think_boxed")
    assert boxed.valid and boxed.caption == (0, 0) and boxed.answer == "7"
    bad = split_response(tok.encode("no think block<|im_end|>"), tok, "think_boxed")
    assert not bad.valid and bad.caption == (0, 0) and bad.reasoning[0] == 0


def test_with_terminator():
    assert with_terminator([5, 6, 9, 9], 7, strip_ids=[9]) == [5, 6, 7]
    assert with_terminator([5, 7], 7) == [5, 7]
    assert with_terminator([], 7) == [7]
