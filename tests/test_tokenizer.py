"""The offline Qwen3 tokenizer reproduces the real Qwen token ids."""
from prism_mcore.data.tokenizer import ENDOFTEXT_ID, IM_END_ID, qwen3_tokenizer


def test_known_ids():
    tok = qwen3_tokenizer()
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok("你好")["input_ids"] == [108386]
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<think>", "</think>"]}
    assert ids == {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                   "<|vision_start|>": 151652, "<|image_pad|>": 151655, "<think>": 151667, "</think>": 151668}
    assert len(tok) == 151669
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 151643
    assert (IM_END_ID, ENDOFTEXT_ID) == (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)


def test_round_trip_and_chat_template():
    tok = qwen3_tokenizer()
    text = "<caption>2 apples</caption><think>1+1=2</think><answer>2</answer> ünïcödé 12345"
    assert tok.decode(tok(text)["input_ids"]) == text
    msgs = [{"role": "system", "content": "Answer in XML."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nAnswer in XML.<|im_end|>\n<|im_start|>user\n"
                        "<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n")
