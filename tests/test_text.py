"""Tests for modules/text.py: tiny offline T5 / decoder-LLM checkpoints built in tmp_path."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, T5Config, T5EncoderModel

from datamodules.formats import load_text, save_text
from modules.text import (
    TextEncoder,
    as_text_condition,
    encode_prompts,
    layer_normalize,
    load_embeddings,
    save_embeddings,
)

WORDS = "a cat sits on the mat while red car drives down road under blue sky and then".split()
PROMPTS = ["a cat sits on the mat", "red car", "a blue sky and then a red car drives down the road"]


def _tokenizer(with_pad: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS; appends </s> like T5's. Without pad, like many LLMs."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    kwargs = {"pad_token": "<pad>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", **kwargs)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=32, d_model=24, d_kv=12, d_ff=48, num_layers=2, num_heads=2, dropout_rate=0.1)
    T5EncoderModel(cfg).save_pretrained(path)
    _tokenizer(with_pad=True).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llm")
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(path / "text_encoder")  # with its LM head, as real ones
    # Own folder (diffusers layout, via tokenizer_path): next to a qwen2 config, AutoTokenizer
    # would rebuild our generic word-level tokenizer as a Qwen2 BPE one.
    _tokenizer(with_pad=False).save_pretrained(path / "tokenizer")
    return path


def test_t5_from_pretrained(t5_dir):
    enc = TextEncoder.from_pretrained(t5_dir, max_length=12)
    assert enc.kind == "t5" and enc.out_dim == 24
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    enc.train()  # a parent's .train() must not enable the checkpoint's dropout
    assert not enc.model.training

    emb, mask = enc.encode(PROMPTS)
    assert emb.shape == (3, 12, 24) and mask.shape == (3, 12) and mask.dtype == torch.bool
    tok = _tokenizer(with_pad=True)
    ids = [tok(p, truncation=True, max_length=12)["input_ids"] for p in PROMPTS]
    counts = [len(i) for i in ids]
    assert mask.sum(1).tolist() == counts
    assert counts[2] == 12 and ids[2][-1] == tok.eos_token_id  # truncated, EOS kept
    assert (~mask).any() and (emb[~mask] == 0).all()

    ref_model = T5EncoderModel.from_pretrained(t5_dir).eval()
    for i in range(len(PROMPTS)):
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor([ids[i]])).last_hidden_state[0]
        torch.testing.assert_close(emb[i, : counts[i]], ref, rtol=1e-5, atol=1e-5)
    # Dropout 0.1 in the config: equal results twice show the encoder runs in eval mode.
    assert torch.equal(enc.encode(PROMPTS)[0], emb)


@pytest.mark.parametrize("normalize", [True, False])
def test_llm_from_pretrained(llm_dir, normalize):
    enc = TextEncoder.from_pretrained(
        llm_dir / "text_encoder", max_length=16, tokenizer_path=llm_dir / "tokenizer", normalize_layers=normalize
    )
    assert enc.kind == "llm" and enc.out_dim == 3 * 16
    assert enc.tokenizer.pad_token == "</s>"  # no pad token in the checkpoint: pad = eos

    emb, mask = enc.encode(PROMPTS[:2])
    assert emb.shape == (2, 16, 48)
    tok = _tokenizer(with_pad=False)
    counts = [len(tok(p)["input_ids"]) for p in PROMPTS[:2]]
    assert mask.sum(1).tolist() == counts
    assert (emb[~mask] == 0).all()

    base = Qwen2ForCausalLM.from_pretrained(llm_dir / "text_encoder").model.eval()
    for i, prompt in enumerate(PROMPTS[:2]):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            hs = base(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(hs) == 4
        layers = [(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) if normalize else h for h in hs[1:]]
        torch.testing.assert_close(emb[i, : counts[i]], torch.cat(layers, -1)[0], rtol=1e-5, atol=1e-5)

    first_layer = emb[0, : counts[0], :16]
    is_unit = torch.allclose(first_layer.std(-1), torch.ones(counts[0]), atol=1e-4)
    assert is_unit == normalize


def test_layer_normalize_zero_mean_unit_std():
    h = torch.randn(2, 5, 64) * 30 + 7
    n = layer_normalize(h)
    torch.testing.assert_close(n.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(n.std(-1), torch.ones(2, 5), atol=1e-5, rtol=0)


def test_tiny_deterministic_and_rng_untouched():
    state = torch.get_rng_state()
    a = TextEncoder.tiny(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    b = TextEncoder.tiny(seed=0)
    assert a.out_dim == 32 and TextEncoder.tiny(d_model=48).out_dim == 48

    ea, ma = a.encode(["a red ball bounces", "a blue square"])
    eb, _ = b.encode(["a red ball bounces", "a blue square"])
    assert ea.shape == (2, 64, 32)
    assert torch.equal(ea, eb)
    assert ma.sum(1).tolist() == [len("a red ball bounces") + 1, len("a blue square") + 1]
    assert not torch.allclose(ea[0], ea[1])
    assert (ea[~ma] == 0).all()
    assert not torch.allclose(TextEncoder.tiny(seed=1).encode(["a blue square"])[0], ea[1:])
    # Pinned values: the embedded default must not drift between machines or releases,
    # or saved embeddings and tiny checkpoints silently stop matching.
    pinned = torch.tensor([0.288298, -2.291957, -0.172840, 0.212809])
    torch.testing.assert_close(ea[0, 0, :4], pinned, atol=1e-4, rtol=0)


def test_tiny_truncation_keeps_eos():
    enc = TextEncoder.tiny(max_length=8)
    ids, mask = enc.tokenize(["a much longer prompt than eight bytes", "ü"])
    assert mask[0].all() and ids[0, -1].item() == 1
    assert ids[1].tolist() == [0xC3 + 2, 0xBC + 2, 1, 0, 0, 0, 0, 0]


def test_encode_prompts_batches_match_single_call():
    enc = TextEncoder.tiny(max_length=16)
    prompts = [f"shape number {i}" for i in range(5)]
    emb, mask = encode_prompts(enc, prompts, batch_size=2, progress=False)
    ref_emb, ref_mask = enc.encode(prompts)
    assert emb.shape == (5, 16, 32)
    torch.testing.assert_close(emb, ref_emb)
    assert torch.equal(mask, ref_mask)


def test_save_load_and_as_text_condition(tmp_path):
    enc = TextEncoder.tiny(max_length=16)
    emb, mask = enc.encode(["a green circle", "hi"])
    path = tmp_path / "sub" / "emb.safetensors"
    save_embeddings(path, emb, mask)
    emb2, mask2 = load_embeddings(path)
    assert mask2.dtype == torch.bool
    assert torch.equal(emb2, emb) and torch.equal(mask2, mask)
    # one format: the file is a shard's text.safetensors member, byte for byte
    assert path.read_bytes() == save_text(emb, mask)
    shard_emb, shard_mask = load_text(path.read_bytes())
    assert torch.equal(shard_emb, emb) and torch.equal(shard_mask, mask)

    for x in (path, str(path), emb, (emb, mask), (emb, mask.to(torch.uint8)), [emb, None]):
        e, m = as_text_condition(x)
        assert torch.equal(e, emb), type(x)
        assert m.dtype == torch.bool and torch.equal(m, mask), type(x)

    # An explicit mask wins over inference from zeros.
    full = torch.ones_like(mask)
    assert as_text_condition((emb, full))[1].all()
    # Embeddings that were not zero-padded: every token counts.
    assert as_text_condition(torch.randn(2, 4, 8))[1].all()
    # Saving without a mask infers it.
    save_embeddings(tmp_path / "nomask.safetensors", emb)
    assert torch.equal(load_embeddings(tmp_path / "nomask.safetensors")[1], mask)
    # stored dtype: cast on request, the mask always uint8 on disk
    half = load_text(save_text(emb, mask, torch.bfloat16))[0]
    assert half.dtype == torch.bfloat16 and torch.equal(half, emb.to(torch.bfloat16))
    assert st_load(save_text(emb, mask))["mask"].dtype == torch.uint8
    with pytest.raises(ValueError, match="does not match"):
        save_text(emb, mask[:, :3])
    with pytest.raises(KeyError, match="mask"):
        load_text(st_save({"emb": emb}))

    with pytest.raises(ValueError):
        as_text_condition((emb, mask[:, :3]))
    with pytest.raises(TypeError):
        as_text_condition(3)


def test_an_over_long_prompt_is_said_once_with_its_length_and_the_limit(caplog):
    encoder = TextEncoder.tiny(max_length=16)
    with caplog.at_level("WARNING", logger="modules.text"):
        encoder.encode(["x" * 15])  # 15 bytes + EOS: exactly the limit, nothing cut
        assert not caplog.records
        encoder.encode(["short", "y" * 100_000])
        encoder.encode(["z" * 50_000])
    assert [r.getMessage() for r in caplog.records] == [
        "a prompt of 100001 tokens (100000 characters) is longer than the text encoder's max_length (16): "
        "only its first 16 tokens are used (said once)"
    ]
