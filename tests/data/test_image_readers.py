"""Readers with images: bad images skip their rows, counted by reason; a missing images column is a one-line
exit-2 error; without a processor (a text model) every reader behaves as before."""
import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from prism_mcore.data.errors import DataError
from prism_mcore.data.images import ImageProcessor, ImageSource
from prism_mcore.data.multimodal import VisionTokens, encode_prompt
from prism_mcore.data.rl_dataset import RLDataset
from prism_mcore.data.sft_dataset import load_chat_jsonl, tokenize_chats
from prism_mcore.data.tokenizer import qwen3_tokenizer
from prism_mcore.data.warmup_pairs import load_warmup_pairs


@pytest.fixture(scope="module")
def tok():
    return qwen3_tokenizer()


def png(width=64, height=64, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def images(tmp_path):
    """Image files of every kind next to the data file; the names say what each is."""
    d = tmp_path / "img"
    d.mkdir()
    (d / "a.png").write_bytes(png(64, 64, 1))
    (d / "b.png").write_bytes(png(100, 70, 2))
    (d / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))  # a PNG header, then garbage
    (d / "truncated.png").write_bytes(png(96, 96, 3)[:300])
    (d / "big.png").write_bytes(png(200, 200, 4))  # over the test's max_input_pixels
    (d / "thin.png").write_bytes(png(2, 500, 5))  # 250:1
    return d


SMALL = dict(max_input_pixels=150 * 150)  # so that a small file can stand for an oversized one


def sft_row(user, images, answer="ok"):
    row = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    if images is not None:
        row["images"] = images
    return row


def test_sft_rows_with_bad_images_are_skipped_and_counted(tmp_path, images, tok):
    rows = [
        sft_row("<image>one", ["img/a.png"]),                                    # good
        sft_row("<image> and <image>", ["img/a.png", "img/b.png"]),              # good, two images
        {"conversations": [{"from": "human", "value": "<image>sharegpt"}, {"from": "gpt", "value": "yes"}],
         "system": "S", "images": ["img/b.png"]},                                # good, sharegpt
        sft_row("text only", None),                                              # good, no images
        sft_row("no placeholder", ["img/a.png"]),                                # image_count_mismatch
        sft_row("<image><image>", ["img/a.png"]),                                # image_count_mismatch
        sft_row("<image>gone", ["img/missing.png"]),                             # image_missing
        sft_row("<image>noise", ["img/noise.png"]),                              # image_undecodable
        sft_row("<image>cut", ["img/truncated.png"]),                            # image_undecodable
        sft_row("<image>big", ["img/big.png"]),                                  # image_too_large
        sft_row("<image>thin", ["img/thin.png"]),                                # image_bad_aspect
        sft_row("<image>web", ["https://example.com/a.png"]),                    # image_url_unsupported
        sft_row("<image>odd", 7),                                                # bad_images
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    convs, skipped = load_chat_jsonl(path, images=ImageProcessor(**SMALL))
    assert len(convs) == 4
    assert skipped == Counter(image_count_mismatch=2, image_missing=1, image_undecodable=2, image_too_large=1,
                              image_bad_aspect=1, image_url_unsupported=1, bad_images=1)
    assert convs[3] == rows[3]["messages"]  # a text row is untouched
    part = convs[2][1]["content"][0]
    assert part["type"] == "image" and isinstance(part["image"], ImageSource) and part["image"].path.endswith("b.png")
    samples, dropped = tokenize_chats(convs, tok, 256, images=ImageProcessor(**SMALL))
    assert not dropped and [len(s.images) for s in samples] == [1, 2, 1, 0]
    assert [s.image_grid_thw for s in samples[:3]] == [[(1, 4, 4)], [(1, 4, 4), (1, 4, 6)], [(1, 4, 6)]]

    # A text model reads the same file as before: images ignored, placeholders left in the text.
    convs, skipped = load_chat_jsonl(path)
    assert len(convs) == len(rows) and not skipped and convs[0][0]["content"] == "<image>one"


def test_sft_stray_pad_and_missing_images_field(tmp_path, images, tok):
    ip = ImageProcessor()
    convs = [[{"role": "user", "content": "a literal <|image_pad|>"}, {"role": "assistant", "content": "x"}]]
    with pytest.raises(DataError, match=r"SFT data: no usable conversation \(dropped: \{'image_count_mismatch': 2\}"):
        tokenize_chats(convs * 2, tok, 64, images=ip)
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps(sft_row("hi", None)) + "\n")
    with pytest.raises(DataError, match=r"text\.jsonl: no row has an 'images' field") as e:
        load_chat_jsonl(text, images=ip)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    mixed = convs + [[{"role": "user", "content": "fine"}, {"role": "assistant", "content": "y"}]]
    samples, dropped = tokenize_chats(mixed, tok, 64, images=ip)
    assert len(samples) == 1 and dropped == Counter(image_count_mismatch=1)


def hf_parquet(path, rows):
    """An RL parquet written by Hugging Face `datasets` itself, `images` as a list of Image features."""
    import datasets

    string = datasets.Value("string")
    features = datasets.Features({
        "prompt": datasets.List({"role": string, "content": string}),
        "reward_model": {"ground_truth": string},
        "images": datasets.List(datasets.Image()),
    })
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def rl_row(user, images, truth="3"):
    return {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": user}],
            "reward_model": {"ground_truth": truth}, "images": images}


def test_rl_images_column_as_datasets_writes_it(tmp_path, images, tok, monkeypatch):
    good = Image.open(io.BytesIO(png(64, 64, 7)))
    rows = [
        rl_row("<image>How many?", [good]),                                                     # good (PIL -> bytes)
        rl_row("<image>and<image>", [{"bytes": png(100, 70, 8), "path": None}, good]),          # good, two
        rl_row("<image>by path", [{"bytes": None, "path": str(images / "a.png")}]),             # good, path only
        rl_row("<image>relative", [{"bytes": None, "path": "img/b.png"}]),                      # good, beside the file
        rl_row("<image>junk", [{"bytes": b"not an image", "path": None}]),                      # image_undecodable
        rl_row("<image>gone", [{"bytes": None, "path": str(images / "gone.png")}]),             # image_missing
        rl_row("<image>big", [{"bytes": png(200, 200), "path": None}]),                         # image_too_large
        rl_row("no placeholder", [good]),                                                       # image_count_mismatch
        rl_row("<image>none", []),                                                              # image_count_mismatch
        rl_row("text only", []),                                                                # good, no image
    ]
    monkeypatch.chdir(tmp_path)  # `datasets` checks path-only images exist when it writes them
    (images / "gone.png").write_bytes(png())
    path = hf_parquet(tmp_path / "rl.parquet", rows)
    (images / "gone.png").unlink()  # moved away after the parquet was written
    monkeypatch.chdir("/")  # the reader resolves relative paths against the parquet's directory, not the cwd
    ip = ImageProcessor(**SMALL)
    ds = RLDataset(path, tok, 512, images=ip)
    assert len(ds) == 5
    assert ds.skipped == Counter(image_undecodable=1, image_missing=1, image_too_large=1, image_count_mismatch=2)
    vt = VisionTokens.from_tokenizer(tok)
    for ex in ds:
        ids, imgs, grids = encode_prompt(ex.messages, tok, ip, vt)
        assert ex.prompt_ids == ids and ex.images == imgs and ex.image_grid_thw == grids
    assert [len(ex.images) for ex in ds] == [1, 2, 1, 1, 0]
    assert ds[1].image_grid_thw == [(1, 4, 6), (1, 4, 4)]
    assert sum(t == vt.image_pad for t in ds[1].prompt_ids) == 6 + 4

    # Prompt length counts the expanded pads: the two-image prompt is 21 tokens before expansion, 29 after.
    assert [len(ex.prompt_ids) for ex in ds] == [23, 29, 22, 23, 16]
    short = RLDataset(path, tok, 25, images=ip)
    assert short.skipped["prompt_too_long"] == 1 and len(short) == 4

    # A text model keeps the column as read and the text as it is.
    plain = RLDataset(path, tok, 512)
    assert len(plain) == len(rows) and plain[4].images == [{"bytes": b"not an image", "path": None}]


def test_missing_images_column_is_an_exit_2_error(tmp_path, tok):
    from prism_mcore.data import synthetic as syn

    path = syn.write_rl_parquet(syn.make_problems(3, seed=0), tmp_path / "text.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["images"]), path)
    with pytest.raises(DataError, match=r"text\.parquet: missing required column 'images' \(the model takes "
                                        r"images: model\.vision\)") as e:
        RLDataset(path, tok, 512, images=ImageProcessor())
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert len(RLDataset(path, tok, 512)) == 3  # fine for a text model


def test_warmup_pairs_with_images(tmp_path, images, tok):
    base = {"prompt": "How many?", "teacher_caption": "tc", "teacher_cot": "tr", "student_caption": "sc",
            "student_cot": "sr"}
    lines = [
        {**base, "image": "img/a.png"},                               # good, relative to the file
        {**base, "image": str(images / "b.png")},                     # good, absolute
        {**base, "prompt": "<image>placed", "image": "img/a.png"},    # good, placeholder kept where it is
        {**base, "image": "img/missing.png"},                         # image_missing
        {**base, "image": "img/noise.png"},                           # image_undecodable
        {**base, "image": "img/big.png"},                             # image_too_large
        {**base, "image": "http://x/y.png"},                          # image_url_unsupported
        {**base, "image": 3},                                         # image_missing (not a reference)
        {**base, "prompt": "<image>no image"},                        # image_count_mismatch
        base,                                                         # good, text only
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    pairs, skipped = load_warmup_pairs(path, system_prompt="SYS", images=ImageProcessor(**SMALL))
    assert len(pairs) == 8 and [p.line for p in pairs[::2]] == [1, 2, 3, 10]
    assert skipped == Counter(image_missing=2, image_undecodable=1, image_too_large=1, image_url_unsupported=1,
                              image_count_mismatch=1)
    user = pairs[0].prompt_messages[1]["content"]
    assert [p["type"] for p in user] == ["image", "text"] and user[1]["text"] == "How many?"
    assert pairs[0].images == [user[0]["image"]] and pairs[0].images[0].width == 64
    assert [p["type"] for p in pairs[4].prompt_messages[1]["content"]] == ["image", "text"]
    assert pairs[6].images == [] and pairs[6].prompt_messages[1] == {"role": "user", "content": "How many?"}

    # A text discriminator reads the lines as before (paths as written, nothing opened).
    pairs, skipped = load_warmup_pairs(path)
    assert len(pairs) == 20 and not skipped and pairs[0].image == "img/a.png"
    only_text = tmp_path / "text_pairs.jsonl"
    only_text.write_text(json.dumps(base) + "\n")
    with pytest.raises(DataError, match=r"text_pairs\.jsonl: no line has an 'image' field"):
        load_warmup_pairs(only_text, images=ImageProcessor())
