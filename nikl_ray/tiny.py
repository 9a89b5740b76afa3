"""Tiny local backbones: real HF architectures, random weights, a tokenizer trained on the task.

No model hub is needed: tests, the demo and CPU benchmarks use these; real users point their
experiment at real checkpoints (KoELECTRA, KLUE-RoBERTa, polyglot-ko, …) instead. Each
checkpoint is saved the way such models are published (encoders with a pre-training head,
decoders as causal LMs), so `AutoModelForSequenceClassification.from_pretrained(dir,
num_labels=…)` takes the body and starts a fresh classification head, as it does for the real
ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

TINY_KINDS = ("electra", "roberta", "bert", "gpt_neox", "llama")
FAMILY = {"electra": "encoder", "roberta": "encoder", "bert": "encoder", "gpt_neox": "decoder", "llama": "decoder"}

# One block of defaults for every tiny model: small enough that a CPU trains one in seconds.
TINY_SIZE = dict(hidden=64, layers=2, heads=2, intermediate=128, max_positions=512)


def _wordpiece(texts: Iterable[str], vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()  # not BERT's NFD: that would split Hangul into jamo
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


def _byte_bpe(texts: Iterable[str], vocab_size: int, *, encoder: bool):
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if encoder else ["<|endoftext|>", "<pad>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if encoder:
        tok.post_processor = processors.RobertaProcessing(("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")))
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                       pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")
    # Decoders: a pad token of its own (not eos), so last-real-token pooling is unambiguous.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="<pad>")


def _config(kind: str, tokenizer):
    from transformers import ElectraConfig, BertConfig, GPTNeoXConfig, LlamaConfig, RobertaConfig

    s = TINY_SIZE
    common = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                  num_attention_heads=s["heads"], intermediate_size=s["intermediate"], pad_token_id=tokenizer.pad_token_id)
    if kind == "electra":
        return ElectraConfig(embedding_size=s["hidden"], max_position_embeddings=s["max_positions"], **common)
    if kind == "bert":
        return BertConfig(max_position_embeddings=s["max_positions"], **common)
    if kind == "roberta":
        return RobertaConfig(max_position_embeddings=s["max_positions"] + 2, type_vocab_size=1,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **common)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   max_position_embeddings=s["max_positions"], tie_word_embeddings=False)
    if kind == "gpt_neox":  # polyglot-ko's shape: partial rotary, parallel residual
        return GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **special, **common)
    if kind == "llama":
        return LlamaConfig(num_key_value_heads=1, **special, **common)
    raise ValueError(f"unknown tiny backbone kind {kind!r}; choose from {TINY_KINDS}")


def make_tokenizer(kind: str, texts: Iterable[str], vocab_size: int):
    """A tokenizer of `kind`'s family (WordPiece for ELECTRA/BERT, byte-level BPE otherwise) trained on `texts`."""
    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny backbone kind {kind!r}; choose from {TINY_KINDS}")
    if kind in ("electra", "bert"):
        return _wordpiece(texts, vocab_size)
    return _byte_bpe(texts, vocab_size, encoder=FAMILY[kind] == "encoder")


def _save_random_init(kind: str, config, tokenizer, out_dir: str | Path, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForPreTraining

    from nikl_ray.backbones import quiet_transformers

    quiet_transformers()
    torch.manual_seed(seed)
    model = (AutoModelForPreTraining if FAMILY[kind] == "encoder" else AutoModelForCausalLM).from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)  # safetensors
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_backbone(kind: str, texts: list[str], out_dir: str | Path, *, vocab_size: int = 4000, seed: int = 0) -> Path:
    """Train a tokenizer on `texts` and save a random-init `kind` checkpoint with it in `out_dir`."""
    tokenizer = make_tokenizer(kind, texts, vocab_size)
    return _save_random_init(kind, _config(kind, tokenizer), tokenizer, out_dir, seed)


def make_random_init(config_dir: str | Path, texts: list[str], out_dir: str | Path, *, seed: int = 0) -> Path:
    """A random-init checkpoint of a real model's shape (its config.json: KLUE-RoBERTa-base,
    polyglot-ko-1.3b, …) with a tokenizer trained on `texts` up to its vocabulary size."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    tokenizer = make_tokenizer(config.model_type, texts, config.vocab_size)
    config.pad_token_id = tokenizer.pad_token_id
    return _save_random_init(config.model_type, config, tokenizer, out_dir, seed)


def make_tiny_backbones(texts: list[str], out_dir: str | Path, kinds: Iterable[str] = ("electra", "roberta", "gpt_neox", "llama"),
                        **kwargs) -> dict[str, Path]:
    """One tiny checkpoint per kind under `out_dir/<kind>`; returns kind → directory."""
    out_dir = Path(out_dir)
    return {kind: make_tiny_backbone(kind, texts, out_dir / kind, **kwargs) for kind in kinds}
