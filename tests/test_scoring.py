"""Batched candidate scoring == MeZO's one-candidate-at-a-time computation, on tiny offline OPT/Llama models."""

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
)

from cola_theory.lm.data import load_split  # noqa: E402
from cola_theory.lm.scoring import (  # noqa: E402
    candidate_logprobs,
    classification_loss,
    collate,
    encode_example,
    evaluate_accuracy,
    predict,
    score_examples,
)
from cola_theory.lm.tasks import Example, make_example  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "superglue"


@pytest.fixture(scope="module")
def tokenizer():
    """Byte-level BPE built offline: every byte is a token, plus a few merges ("Yes", "No", " great", ...)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = [("Y", "e"), ("Ye", "s"), ("N", "o"), ("Ġ", "g"), ("Ġg", "r"), ("e", "a"), ("Ġgr", "ea"), ("Ġgrea", "t")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _llama(vocab: int):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _opt(vocab: int):
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=512, word_embed_proj_dim=32, pad_token_id=0, dropout=0.0)
    return OPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "opt"])
def model(request, tokenizer):
    return (_llama if request.param == "llama" else _opt)(len(tokenizer))


@pytest.fixture(scope="module")
def examples():
    """Mixed tasks: 2 or 3 candidates, candidates of 1 to ~25 tokens, prompts of different lengths."""
    picks = [("sst2", "val", 0), ("cb", "val", 1), ("rte", "val", 0), ("copa", "val", 0), ("wic", "val", 3),
             ("boolq", "val", 4), ("cb", "train", 3), ("sst2", "val", 1)]
    return [make_example(t, load_split(t, s, FIXTURES)[i]) for t, s, i in picks]


_HAND: dict = {}


def hand_scores(model, tokenizer, example, max_length=2048):
    """MeZO's Framework.forward, one candidate per forward pass: log_softmax, gather, mean of the option."""
    key = (id(model), example, max_length)
    if key not in _HAND:
        _HAND[key] = _hand_scores(model, tokenizer, example, max_length)
    return _HAND[key]


def _hand_scores(model, tokenizer, example, max_length):
    prompt_len = len(tokenizer.encode(example.prompt))
    out = []
    for text in example.texts:
        ids = tokenizer.encode(text)
        n = len(ids) - prompt_len
        if len(ids) > max_length:
            ids = ids[:1] + ids[1:][-(max_length - 1):]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1]
        logp = torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(ids) - 1), x[0, 1:]]
        out.append(logp[-n:].mean().item())
    return out


def test_encode_example_matches_mezo(tokenizer, examples):
    for ex in examples:
        enc = encode_example(tokenizer, ex, max_length=2048)
        prompt = tokenizer.encode(ex.prompt)
        assert enc.label == ex.label and len(enc.input_ids) == len(ex.candidates)
        for ids, n, text in zip(enc.input_ids, enc.option_lens, ex.texts):
            assert list(ids) == tokenizer.encode(text)
            assert n == len(tokenizer.encode(text)) - len(prompt) >= 1
    great = encode_example(tokenizer, examples[0], 2048)
    assert great.option_lens == (9, 1)  # " terrible" = 9 bytes, " great" = one merged token
    assert encode_example(tokenizer, examples[1], 2048).option_lens == (1, 1, 5)  # Yes, No, Maybe


def test_truncation_keeps_bos_and_candidate(tokenizer, examples):
    ex = examples[2]
    full = tokenizer.encode(ex.texts[1])
    enc = encode_example(tokenizer, ex, max_length=20)
    ids = enc.input_ids[1]
    assert len(ids) == 20 and ids[0] == tokenizer.bos_token_id and list(ids[1:]) == full[-19:]
    assert enc.option_lens == encode_example(tokenizer, ex, 2048).option_lens
    with pytest.raises(ValueError, match="candidate ' terrible' has 9 tokens, more than max_length=6"):
        encode_example(tokenizer, examples[0], max_length=6)
    with pytest.raises(ValueError, match="max_length=1 is too small"):
        encode_example(tokenizer, ex, max_length=1)


def test_collate_layout(tokenizer, examples):
    encs = [encode_example(tokenizer, ex, 2048) for ex in examples[:2]]
    b = collate(encs, pad_id=0, pad_to_multiple_of=8)
    S = 2 + 3
    L = max(e.max_len for e in encs)
    assert b["input_ids"].shape == (S, -(-L // 8) * 8) and b["target_ids"].shape == (S, 9)
    assert -(-L // 8) * 8 > L  # the limit below is binding
    assert collate(encs, pad_id=0, pad_to_multiple_of=8, pad_limit=L)["input_ids"].shape == (S, L)  # never past it
    assert collate(encs, pad_id=0, pad_to_multiple_of=8, pad_limit=1)["input_ids"].shape == (S, L)  # nor below L
    assert b["example_index"].tolist() == [0, 0, 1, 1, 1] and b["candidate_index"].tolist() == [0, 1, 0, 1, 2]
    assert b["labels"].tolist() == [ex.label for ex in examples[:2]] and b["num_candidates"].tolist() == [2, 3]
    for s, (e, c) in enumerate(zip(b["example_index"].tolist(), b["candidate_index"].tolist())):
        ids, n = encs[e].input_ids[c], encs[e].option_lens[c]
        assert b["input_ids"][s, :len(ids)].tolist() == list(ids) and b["attention_mask"][s].sum() == len(ids)
        assert (b["input_ids"][s, len(ids):] == 0).all()  # right padding
        assert b["target_mask"][s].sum() == n and b["target_ids"][s, :n].tolist() == list(ids[-n:])
        assert b["target_positions"][s, :n].tolist() == list(range(len(ids) - n - 1, len(ids) - 1))
    with pytest.raises(ValueError, match="at least one"):
        collate([])


@pytest.mark.parametrize("use_logits_to_keep", [True, False])
def test_batched_scores_equal_hand_computation(model, tokenizer, examples, use_logits_to_keep):
    b = collate([encode_example(tokenizer, ex, 2048) for ex in examples])
    with torch.no_grad():
        scores = candidate_logprobs(model, b, use_logits_to_keep=use_logits_to_keep)
    assert scores.shape == (len(examples), 3) and scores.dtype == torch.float32
    for i, ex in enumerate(examples):
        expected = torch.tensor(hand_scores(model, tokenizer, ex))
        torch.testing.assert_close(scores[i, :len(ex.candidates)], expected, atol=1e-5, rtol=1e-5)
        assert torch.isneginf(scores[i, len(ex.candidates):]).all()


def test_batching_and_truncation_do_not_change_scores(model, tokenizer, examples):
    one = torch.cat([score_examples(model, tokenizer, [ex], batch_size=1)[:, :2] for ex in examples])
    many = score_examples(model, tokenizer, examples, batch_size=3)
    torch.testing.assert_close(many[:, :2], one, atol=1e-5, rtol=1e-5)
    short = score_examples(model, tokenizer, examples[2:4], max_length=24)
    for row, ex in zip(short, examples[2:4]):
        torch.testing.assert_close(row[:2], torch.tensor(hand_scores(model, tokenizer, ex, 24)), atol=1e-5, rtol=1e-5)


def test_loss_predict_and_gradients(model, tokenizer, examples):
    b = collate([encode_example(tokenizer, ex, 2048) for ex in examples])
    scores = candidate_logprobs(model, b)
    loss = classification_loss(scores, b["labels"])
    manual = -torch.stack([torch.log_softmax(scores[i, :len(ex.candidates)], 0)[ex.label]
                           for i, ex in enumerate(examples)]).mean()
    torch.testing.assert_close(loss, manual)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)
    assert predict(torch.tensor([[0.1, -1.0, float("-inf")], [-3.0, -2.0, -2.5]])).tolist() == [0, 1]


def test_evaluate_accuracy(model, tokenizer, examples):
    model.train()
    acc = evaluate_accuracy(model, tokenizer, examples, batch_size=3)
    assert model.training  # mode restored
    hand = [max(range(len(ex.candidates)), key=hand_scores(model.eval(), tokenizer, ex).__getitem__) == ex.label
            for ex in examples]
    assert acc == pytest.approx(sum(hand) / len(hand))
    with pytest.raises(ValueError, match="at least one example"):
        evaluate_accuracy(model, tokenizer, [])


def test_model_without_logits_to_keep(tokenizer, examples):
    class Plain(torch.nn.Module):  # a forward that has no logits_to_keep argument
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    base = _llama(len(tokenizer))
    b = collate([encode_example(tokenizer, ex, 2048) for ex in examples[:3]])
    with torch.no_grad():
        torch.testing.assert_close(candidate_logprobs(Plain(base), b), candidate_logprobs(base, b))


def test_candidate_merged_into_prompt_raises(tokenizer):
    assert encode_example(tokenizer, Example("rte", 0, "Y", ("ab",), 0), 16).option_lens == (2,)
    with pytest.raises(ValueError, match="rte idx=0: candidate 'es' adds 0 tokens to the prompt"):
        encode_example(tokenizer, Example("rte", 0, "Y", ("es",), 0), 16)  # "Y" + "es" -> one token "Yes"


@pytest.mark.parametrize("kind", ["tiny-opt", "tiny-llama"])
def test_shared_prefix_scores_equal_one_sequence_per_candidate(kind):
    """Single-token candidates after one prefix: one sequence per example gives the same scores (and loss grads)."""
    from cola_theory.lm.models import load_model
    from cola_theory.lm.scoring import EncodedExample, classification_loss, shares_prefix

    model = load_model(kind, device="cpu", seed=0)[0].eval()  # OPT has dropout 0.1
    g = torch.Generator().manual_seed(0)
    encs = []
    for n, cands in ((7, (5, 6)), (11, (9, 4, 8)), (4, (5, 6))):
        prefix = tuple(torch.randint(3, 200, (n,), generator=g).tolist())
        encs.append(EncodedExample(tuple(prefix + (c,) for c in cands), (1,) * len(cands), 1))
    multi = EncodedExample(((3, 4, 5, 6), (3, 4, 7, 8)), (2, 2), 0)  # two-token options: not shareable
    assert all(shares_prefix(e) for e in encs) and not shares_prefix(multi)
    shared, split = collate(encs + [multi]), collate(encs + [multi], share_prefix=False)
    assert shared["input_ids"].shape[0] == 3 + 2 and split["input_ids"].shape[0] == 2 + 3 + 2 + 2
    s1, s2 = candidate_logprobs(model, shared), candidate_logprobs(model, split)
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    labels = shared["labels"]
    g1 = torch.autograd.grad(classification_loss(s1, labels), model.lm_head.weight)[0]
    g2 = torch.autograd.grad(classification_loss(s2, labels), model.lm_head.weight)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
