"""The image-factored ITM engine against the stock transformers forward, and its input checks."""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BlipForImageTextRetrieval, BlipProcessor

from teacher_server.engine import (
    EngineSettings,
    ImageSentences,
    ItmEngine,
    VisionCache,
    decode_image,
)
from teacher_server.errors import ImageRequiredError, InvalidInputError, ModelLoadError
from teacher_server.hoi.digest import image_digest

SENTENCES = [
    "a person ride a horse",
    "a person hold a cup",
    "a person",
    "a person hop on an airplane while a dog watch the person from far away",
    "a person kick a sports ball",
]


def png_bytes(seed: int, height: int = 40, width: int = 50) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int, height: int = 64, width: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stock(tiny_blip_dir: Path) -> tuple[BlipForImageTextRetrieval, BlipProcessor]:
    return BlipForImageTextRetrieval.from_pretrained(tiny_blip_dir).eval(), BlipProcessor.from_pretrained(tiny_blip_dir)


def stock_scores(stock, data: bytes, sentence: str, *, enc_token: bool) -> tuple[float, float]:
    model, processor = stock
    inputs = processor(images=Image.open(io.BytesIO(data)).convert("RGB"), text=sentence, return_tensors="pt")
    if enc_token:
        inputs["input_ids"][:, 0] = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    with torch.no_grad():
        logits = model(
            input_ids=inputs["input_ids"],
            pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"],
            use_itm_head=True,
        ).itm_score[0]
    return (logits[1] - logits[0]).item(), logits.softmax(-1)[1].item()


@pytest.mark.parametrize("policy", ["cls", "enc"])
def test_engine_equals_stock_forward_on_mixed_batches(tiny_blip_dir: Path, stock, policy: str) -> None:
    # Small micro-batches force several length buckets and image chunks within one call.
    engine = ItmEngine.from_pretrained(
        tiny_blip_dir, EngineSettings(itm_start_token=policy, text_batch_size=3, kv_chunk_images=2)
    )
    images = [png_bytes(1), jpeg_bytes(2, 80, 30), png_bytes(3, 33, 33)]
    requests = [
        ImageSentences(image_digest(data), engine.prepare_image(data), SENTENCES[: 2 + index])
        for index, data in enumerate(images)
    ]
    results = engine.score(requests)
    compared = 0
    for data, request, scores in zip(images, requests, results, strict=True):
        assert len(scores) == len(request.sentences)
        for sentence, score in zip(request.sentences, scores, strict=True):
            logit, prob = stock_scores(stock, data, sentence, enc_token=policy == "enc")
            assert score.match_prob == pytest.approx(prob, abs=1e-4)
            assert score.match_logit == pytest.approx(logit, abs=1e-4)
            compared += 1
    assert compared == 2 + 3 + 4
    # Scores are not all alike: the comparison above is not trivially satisfied.
    all_probs = [s.match_prob for scores in results for s in scores]
    assert max(all_probs) - min(all_probs) > 1e-3


def test_token_policies_change_scores_and_fingerprint(tiny_blip_dir: Path) -> None:
    cls_engine = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(itm_start_token="cls"))
    enc_engine = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(itm_start_token="enc"))
    data = png_bytes(4)
    request = [ImageSentences(image_digest(data), cls_engine.prepare_image(data), SENTENCES[:1])]
    assert cls_engine.score(request)[0][0].match_logit != pytest.approx(enc_engine.score(request)[0][0].match_logit)
    assert cls_engine.fingerprint != enc_engine.fingerprint


def test_vision_encoded_once_per_image_and_digest_only_requests(engine: ItmEngine) -> None:
    data = png_bytes(5)
    digest = image_digest(data)
    prepared = engine.prepare_image(data)
    assert prepared.digest == digest
    before = engine.stats.images_encoded
    first = engine.score([ImageSentences(digest, prepared, SENTENCES[:2]), ImageSentences(digest, prepared, SENTENCES)])
    assert engine.stats.images_encoded == before + 1
    assert engine.has_image(digest)
    # The digest alone now suffices, with identical results and no new encoding.
    again = engine.score([ImageSentences(digest, None, SENTENCES)])
    assert engine.stats.images_encoded == before + 1
    assert again[0] == first[1]
    assert first[0] == first[1][:2]  # duplicates inside one call are consistent


def test_digest_only_request_for_an_unknown_image_needs_the_image(engine: ItmEngine) -> None:
    with pytest.raises(ImageRequiredError) as caught:
        engine.score([ImageSentences("0" * 64, None, SENTENCES[:1])])
    assert caught.value.digest == "0" * 64
    assert "resend" in str(caught.value)


def test_vision_cache_is_bounded_in_megabytes() -> None:
    cache = VisionCache(capacity_mb=1.0)
    quarter = torch.zeros(256 * 256, dtype=torch.float32)  # 0.25 MB
    for index in range(6):
        cache.put(str(index), quarter)
    assert len(cache) == 4 and cache.nbytes == 1024 * 1024
    assert "0" not in cache and "1" not in cache and "5" in cache
    cache.get("2")  # recently used survives the next eviction
    cache.put("6", quarter)
    assert "2" in cache and "3" not in cache
    cache.put("huge", torch.zeros(1024 * 1024))  # larger than the whole cache: not kept
    assert "huge" not in cache


def test_round_trip_through_save_pretrained(tmp_path: Path, tiny_blip_dir: Path, engine: ItmEngine) -> None:
    copy = tmp_path / "copy"
    model = BlipForImageTextRetrieval.from_pretrained(tiny_blip_dir)
    model.save_pretrained(copy)
    BlipProcessor.from_pretrained(tiny_blip_dir).save_pretrained(copy)
    reloaded = ItmEngine.from_pretrained(copy)
    data = png_bytes(6)
    request = [ImageSentences(image_digest(data), engine.prepare_image(data), SENTENCES)]
    assert reloaded.score(request) == engine.score(request)
    assert reloaded.fingerprint == engine.fingerprint  # same weights, same settings
    # Files beside the weights (a training checkpoint, notes) are not part of the model's identity.
    (copy / "finetune_checkpoint.pt").write_bytes(b"optimizer state")
    (copy / "notes.bin").write_bytes(b"x")
    assert ItmEngine.from_pretrained(copy).fingerprint == engine.fingerprint
    described = reloaded.describe()
    assert described["fingerprint"] == reloaded.fingerprint
    assert described["limits"]["max_sentence_tokens"] == 64


def test_different_weights_give_a_different_fingerprint(tmp_path: Path, tiny_blip_dir: Path, engine: ItmEngine) -> None:
    from teacher_server.tiny_model import make_tiny_model

    other = ItmEngine.from_pretrained(make_tiny_model(tmp_path / "other", seed=1))
    assert other.fingerprint != engine.fingerprint


def test_missing_model_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ItmEngine.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config\\.json"):
        ItmEngine.from_pretrained(tmp_path / "empty")


def test_corrupt_model_directory_is_a_clear_error(tmp_path: Path, tiny_blip_dir: Path) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_blip_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(ModelLoadError, match="corrupt or incomplete"):
        ItmEngine.from_pretrained(corrupt)


def test_non_blip_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    with pytest.raises(ModelLoadError, match="not a BLIP ITM model"):
        ItmEngine.from_pretrained(tmp_path)


def test_unreachable_hub_id_explains_itself() -> None:
    with pytest.raises(ModelLoadError, match="hub is unreachable; pass a local directory"):
        ItmEngine.from_pretrained("hoi-distill-tests/no-such-model")


def test_unknown_dtype_and_device_are_refused(tiny_blip_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="dtype 'fp64'"):
        ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(dtype="fp64"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cuda:0"))


# bf16 keeps 8 significant bits: each rounding is off by at most u = 2**-8 relative. The tiny
# model's logit comes out of 2 vision + 2 text layers of bf16 matmuls over activations of order 1;
# allow 8 such roundings relative to (1 + |logit|) (the 1: activations stay of order 1 when the
# logit is near 0). Measured on this model: at most 2u (0.012 on a logit of 1.5). Compared on
# logits, not probabilities: the sigmoid's slope (<= 1/4) would hide 4x the error.
BF16_UNIT_ROUNDOFF = 2.0**-8


def bf16_logit_bound(logit: float) -> float:
    return 8 * BF16_UNIT_ROUNDOFF * (1.0 + abs(logit))


def test_bf16_runs_and_stays_close_to_fp32(tiny_blip_dir: Path, engine: ItmEngine) -> None:
    half = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(dtype="bf16"))
    data = png_bytes(7)
    request = [ImageSentences(image_digest(data), engine.prepare_image(data), SENTENCES)]
    expected = engine.score(request)[0]
    for sentence, low, full in zip(SENTENCES, half.score(request)[0], expected, strict=True):
        assert abs(low.match_logit - full.match_logit) <= bf16_logit_bound(full.match_logit), sentence
    assert half.fingerprint != engine.fingerprint

    # The bound separates a wrong path: the same bf16 model starting its ITM text with [ENC]
    # instead of [CLS] moves some logit by ~0.3, 4x the bound (its probabilities stay within 0.05).
    wrong = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(dtype="bf16", itm_start_token="enc"))
    misses = [
        abs(low.match_logit - full.match_logit) - bf16_logit_bound(full.match_logit)
        for low, full in zip(wrong.score(request)[0], expected, strict=True)
    ]
    assert max(misses) > 0


def test_a_bf16_engine_computes_its_itm_head_in_fp32(tiny_blip_dir: Path) -> None:
    # The two ITM logits are close; their difference (the margin the student learns from) would
    # lose most of its digits if each logit were rounded to bf16 (8 significant bits) first.
    half = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(device="cpu", dtype="bf16"))
    first_tokens: list[torch.Tensor] = []
    last_layer = half.model.text_encoder.encoder.layer[-1]
    handle = last_layer.output.register_forward_hook(lambda module, args, output: first_tokens.append(output))
    data = png_bytes(8)
    try:
        (scores,) = half.score([ImageSentences(image_digest(data), half.prepare_image(data), SENTENCES[:1])])
    finally:
        handle.remove()
    head = half.model.itm_head
    assert head.weight.dtype == torch.bfloat16
    logits = torch.nn.functional.linear(first_tokens[0][:, 0].float(), head.weight.float(), head.bias.float())
    assert scores[0].match_logit == pytest.approx(float(logits[0, 1] - logits[0, 0]), abs=1e-6)


def test_attention_is_scaled_dot_product_attention_and_equals_the_eager_formula(engine: ItmEngine) -> None:
    generator = torch.Generator().manual_seed(0)
    heads, dim = engine._num_heads, engine._head_dim
    queries = torch.randn(3, heads, 5, dim, generator=generator)
    keys = torch.randn(3, heads, 7, dim, generator=generator)
    values = torch.randn(3, heads, 7, dim, generator=generator)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 4:] = True
    mask = torch.zeros(3, 7).masked_fill(padding, torch.finfo(torch.float32).min)[:, None, None, :]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        fused = engine._attend(queries, keys, values, mask)
    assert "aten::scaled_dot_product_attention" in {event.name for event in profile.events()}
    # The stock layer's eager attention, written out.
    scores = queries @ keys.transpose(-1, -2) / dim**0.5 + mask
    eager = (scores.softmax(-1) @ values).transpose(-3, -2).flatten(-2)
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    # Cross-attention folds a whole image's sentences into one query sequence, without a mask.
    folded = torch.randn(heads, 11, dim, generator=generator)
    eager = ((folded @ keys[0].transpose(-1, -2) / dim**0.5).softmax(-1) @ values[0]).transpose(-3, -2).flatten(-2)
    torch.testing.assert_close(engine._attend(folded, keys[0], values[0], None), eager, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- bad images
def test_empty_image_bytes(engine: ItmEngine) -> None:
    with pytest.raises(InvalidInputError, match=r"image: image is empty \(0 bytes\)") as caught:
        engine.prepare_image(b"")
    assert caught.value.field == "image"


def test_text_file_is_not_an_image(engine: ItmEngine) -> None:
    with pytest.raises(InvalidInputError, match=r"items\[2\]\.image: not a decodable image file"):
        engine.prepare_image(b"hello, I am a text file\n", field="items[2].image")


def test_truncated_jpeg(engine: ItmEngine) -> None:
    data = jpeg_bytes(8, 128, 128)
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        engine.prepare_image(data[: len(data) // 2])


def test_image_over_byte_limit(tiny_blip_dir: Path) -> None:
    small = ItmEngine.from_pretrained(tiny_blip_dir, EngineSettings(max_image_bytes=1000))
    with pytest.raises(InvalidInputError, match="over the limit of 1,000 bytes") as caught:
        small.prepare_image(png_bytes(9, 100, 100))
    assert caught.value.too_large


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size, with a tiny compressed body: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    bomb = png_header_only(30_000, 30_000)  # 900 Mpx claimed in a few hundred bytes
    assert len(bomb) < 10_000
    with pytest.raises(InvalidInputError, match=r"900,000,000 pixels, over the limit of 40,000,000 pixels"):
        decode_image(bomb, max_bytes=1 << 20, max_pixels=40_000_000)
    # Under PIL's own threshold, our (lower) limit is what refuses it.
    moderate = png_header_only(8_000, 6_000)
    with pytest.raises(InvalidInputError, match=r"8000x6000 = 48,000,000 pixels, over the limit of 40,000,000"):
        decode_image(moderate, max_bytes=1 << 20, max_pixels=40_000_000)


def test_pillows_own_bomb_limit_is_named_when_the_setting_is_above_it() -> None:
    """Pillow refuses more than 2 x Image.MAX_IMAGE_PIXELS (178,956,970 by default) in Image.open,
    whatever our settings say: the error names that ceiling, not the higher setting."""
    ceiling = 2 * Image.MAX_IMAGE_PIXELS
    bomb = png_header_only(20_000, 10_000)  # 200 Mpx: over Pillow's ceiling
    with pytest.raises(InvalidInputError, match=rf"200,000,000 pixels, over the limit of {ceiling:,} pixels"):
        decode_image(bomb, max_bytes=1 << 20, max_pixels=500_000_000, max_side=50_000)


def test_decoded_image_is_rgb_whatever_the_mode() -> None:
    buffer = io.BytesIO()
    Image.new("LA", (10, 12), (100, 50)).save(buffer, "PNG")
    image = decode_image(buffer.getvalue(), max_bytes=1 << 20, max_pixels=1000)
    assert image.mode == "RGB" and image.size == (10, 12)


# ---------------------------------------------------------------------------- bad sentences
def test_empty_sentence(engine: ItmEngine) -> None:
    with pytest.raises(InvalidInputError, match=r"sentences\[1\]: sentence is empty"):
        engine.check_sentences(["a person ride a horse", "   "])


def test_sentence_over_token_limit(engine: ItmEngine) -> None:
    long_sentence = " ".join(["horse"] * 70)
    with pytest.raises(InvalidInputError, match=r"TEXT\[0\]: sentence is 72 tokens .* over the limit of 64 tokens"):
        engine.check_sentences([long_sentence], field="TEXT")
    engine.check_sentences([" ".join(["horse"] * 62)])  # 62 + [CLS] + [SEP] = 64: allowed


def test_huge_sentence_is_refused_without_tokenizing(engine: ItmEngine) -> None:
    with pytest.raises(InvalidInputError, match="characters, over the limit of 64 tokens"):
        engine.check_sentences(["x" * 1_000_000])


def test_non_string_sentence(engine: ItmEngine) -> None:
    with pytest.raises(InvalidInputError, match=r"sentences\[0\]: expected a string, got bytes"):
        engine.check_sentences([b"a person"])  # type: ignore[list-item]
