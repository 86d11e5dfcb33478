"""Tiny Transformers models and tokenizers built offline, saved as `save_pretrained` directories, and small
text data sets: what the Transformers tests share."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "fine", "excellent", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "dull", "boring"]
FILLER = ["the", "movie", "film", "plot", "was", "is", "a", "very", "really", "acting", "story", "and"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = SPECIALS + POSITIVE + NEGATIVE + FILLER


def bert_tokenizer():
    """A BERT-like WordPiece tokenizer over WORDS: lower-cased, [CLS] text [SEP], [PAD] id 0."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])  # fmt: skip


def gpt2_tokenizer():
    """A byte-level BPE trained here on the words of the data sets (no pad token, as GPT-2's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    corpus = [" ".join(POSITIVE + FILLER), " ".join(NEGATIVE + FILLER)] * 20
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")  # fmt: skip


def save_bert(directory: Path, *, seed: int = 0, pooler: bool = True) -> Path:
    """A 2-layer BERT (width 32, no dropout) and its tokenizer, saved with save_pretrained."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(seed)
    BertModel(config, add_pooling_layer=pooler).save_pretrained(directory)
    bert_tokenizer().save_pretrained(directory)
    return directory


def save_gpt2(directory: Path, *, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (width 32, no dropout) and its byte-level BPE tokenizer."""
    from transformers import GPT2Config, GPT2Model

    tokenizer = gpt2_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    torch.manual_seed(seed)
    GPT2Model(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sentences(n: int, *, seed: int = 0, names: tuple[str, str] = ("neg", "pos")) -> list[tuple[str, str]]:
    """n short reviews, half positive, half negative: (text, class name). Separable by their sentiment word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, rng.randint(1, 4)) + [rng.choice(POSITIVE if label else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), names[label]))
    return rows


def write_csv(path: Path, rows: list[tuple[str, object]], columns: tuple[str, ...] = ("text", "label")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
