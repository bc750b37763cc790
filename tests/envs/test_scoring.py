import pytest
import torch
from transformers import DynamicCache

from envs.scoring import choose, continuation_logprobs, encode_pair, score_requests

ENDINGS = [" is ripping level tiles off.", " starts pulling up roofing.", " the end", " x"]


def test_encode_pair_splits_joint_encoding(tiny_model):
    _, tok = tiny_model
    ctx, cont = encode_pair(tok, "A man sat on the", " thing")
    assert ctx + cont == tok.encode("A man sat on the thing")
    assert ctx == tok.encode("A man sat on the")
    # trailing context whitespace moves into the continuation (" the" stays one merged token)
    ctx2, cont2 = encode_pair(tok, "A man sat on ", "the thing")
    assert ctx2 == tok.encode("A man sat on") and tok.decode(cont2) == " the thing"
    assert tok.convert_ids_to_tokens(cont2)[0] == "Ġthe"
    with pytest.raises(ValueError, match="context"):
        encode_pair(tok, "", "x")


def _one_at_a_time(model, prefix, cont):
    ids = torch.tensor([prefix + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(cont))


def test_batched_equals_unbatched(tiny_model):
    model, tok = tiny_model
    prefix = tok.encode("Roof shingle removal: A man is sitting on a roof. he")
    conts = [tok.encode(e) for e in ENDINGS]
    batched = continuation_logprobs(model, prefix, conts)
    expected = [_one_at_a_time(model, prefix, c) for c in conts]
    assert batched == pytest.approx(expected, abs=1e-4)
    # mixed prefixes in one forward (several items per batch) agree too
    other = tok.encode("Another prompt")
    mixed = score_requests(model, [(prefix, conts[0]), (other, conts[1])])
    assert mixed == pytest.approx([expected[0], _one_at_a_time(model, other, conts[1])], abs=1e-4)


def test_cache_path_matches_full_forward(tiny_model):
    model, tok = tiny_model
    prefix = tok.encode("Some boys are in a room joking and playing around. when they")
    conts = [tok.encode(e) for e in ENDINGS]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.tensor([prefix]), past_key_values=cache, use_cache=True)
    cache.batch_repeat_interleave(len(conts))
    cached = continuation_logprobs(model, prefix, conts, past_key_values=cache, prefix_last_logits=out.logits[0, -1])
    assert cached == pytest.approx(continuation_logprobs(model, prefix, conts), abs=1e-4)
    with pytest.raises(ValueError, match="prefix_last_logits"):
        continuation_logprobs(model, prefix, conts, past_key_values=cache)


def test_cache_batch_mismatch_is_reported(tiny_model):
    model, tok = tiny_model
    prefix = tok.encode("short prompt")
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(torch.tensor([prefix]), past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="expand"):
        continuation_logprobs(model, prefix, [[5, 6], [7, 8]], past_key_values=cache, prefix_last_logits=out.logits[0, -1])


def test_empty_continuation_rejected(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ValueError):
        continuation_logprobs(model, [1, 2], [[3], []])


def test_choose_normalises_by_ending_characters():
    # raw argmax picks the short ending; per character the long one wins
    assert choose([-4.0, -6.0], ["ab", "abcdefgh"]) == (0, 1)
    assert choose([-1.0, -1.0], ["x", "y"]) == (0, 0)  # ties go to the first, like np.argmax
    with pytest.raises(ValueError):
        choose([-1.0], ["a", "b"])
