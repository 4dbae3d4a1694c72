"""Builds a CLIP BPE tokenizer whose scene words are each a single whole-word token,
with CLIP's byte-level fallback for anything else."""
from __future__ import annotations

from transformers import CLIPTokenizer


def _byte_chars():
    # GPT-2 / CLIP byte -> printable unicode map
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe(word_syms, ranks):
    syms = list(word_syms)
    while len(syms) > 1:
        best = None
        for i in range(len(syms) - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            break
        pair = (syms[best[1]], syms[best[1] + 1])
        out, i = [], 0
        while i < len(syms):
            if i < len(syms) - 1 and (syms[i], syms[i + 1]) == pair:
                out.append(syms[i] + syms[i + 1])
                i += 2
            else:
                out.append(syms[i])
                i += 1
        syms = out
    return syms


def build_tokenizer(words, model_max_length: int = 16) -> CLIPTokenizer:
    chars = _byte_chars()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict = {}
    for w in words:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        while True:
            cur = _bpe(syms, ranks)
            if len(cur) == 1:
                break
            pair = (cur[0], cur[1])  # merge left to right; new merges get the lowest priority
            ranks[pair] = len(merges)
            merges.append(pair)
            tok = pair[0] + pair[1]
            if tok not in vocab_list:
                vocab_list.append(tok)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(vocab_list))}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids, tok.convert_ids_to_tokens(ids))
    return tok
