"""A tiny character-level tokenizer with a ChatML template, for tests that need no model files.

Built with `tokenizers` (WordLevel over single characters + the ChatML special tokens) and wrapped
in a transformers `PreTrainedTokenizerFast`, i.e. the same interface `load_pretrained` returns.
"""
import string

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]


def tiny_chat_tokenizer():
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  from transformers import PreTrainedTokenizerFast

  chars = sorted(set(string.printable))
  vocab = {tok: i for i, tok in enumerate(SPECIALS)}
  for c in chars:
    vocab.setdefault(c, len(vocab))
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(SPECIALS)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                 unk_token="<unk>")
  fast.chat_template = CHATML_TEMPLATE
  return fast
