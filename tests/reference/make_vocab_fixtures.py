#!/usr/bin/env python3
"""mergekit 0.1.5's merges of tiny Llama checkpoints whose vocabularies differ, for
tests/mergekit_parity.rs (`tokenizer_source` with embedding permutation).

Writes under tests/fixtures/mergekit_vocab/:
  base/      a seeded tiny Llama (hidden 16, 2 layers, vocab 32: tokens t0..t31 of a WordLevel
             tokenizer), float32
  expert-1/  the base fine-tuned, plus two added tokens <|im_start|> <|im_end|> (ids 32, 33) and
             their embedding and head rows (34 rows)
  expert-2/  the base fine-tuned, plus <|im_end|> alone (id 32; 33 rows)
  expert-3/  the base fine-tuned under a tokenizer that numbers t5 and t7 the other way round,
             its embedding and head rows swapped to match (32 rows)
  cases.json       per case: the merge config as YAML with {base} and {expert-N} placeholders
  out/<case>.safetensors, .config.json, .tokenizer.json   mergekit's output tensors, config and
             tokenizer

    python3 -m venv --system-site-packages target/venv-mergekit
    target/venv-mergekit/bin/pip install mergekit==0.1.5
    target/venv-mergekit/bin/python tests/reference/make_vocab_fixtures.py
"""

import json
import pathlib
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_mergekit_fixtures import fill, models as models_, src, write_fixtures  # noqa: E402

H, I, KV, V = 16, 32, 8, 32


def config(vocab):
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 8, "vocab_size": vocab, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "float32",
    }


def shapes():
    out = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H], "lm_head.weight": [V, H]}
    for layer in range(2):
        p = f"model.layers.{layer}."
        out.update({
            p + "input_layernorm.weight": [H], p + "post_attention_layernorm.weight": [H],
            p + "self_attn.q_proj.weight": [H, H], p + "self_attn.k_proj.weight": [KV, H],
            p + "self_attn.v_proj.weight": [KV, H], p + "self_attn.o_proj.weight": [H, H],
            p + "mlp.gate_proj.weight": [I, H], p + "mlp.up_proj.weight": [I, H],
            p + "mlp.down_proj.weight": [H, I],
        })
    return out


def tokenizer(vocab, added):
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if added:
        tok.add_special_tokens(added)
    return tok


def write_model(path, tensors, tok):
    path.mkdir(parents=True, exist_ok=True)
    rows = tensors["model.embed_tokens.weight"].shape[0]
    (path / "config.json").write_text(json.dumps(config(rows), indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path / "model.safetensors"))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")


VOCAB_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def make_inputs(out):
    g = torch.Generator().manual_seed(4321)
    base = {}
    for name, shape in shapes().items():
        base[name] = (1.0 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name else 0.5 * torch.randn(shape, generator=g)
    words = {f"t{i}": i for i in range(V)}
    write_model(out / "base", base, tokenizer(words, []))

    def expert(scale):
        return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}

    def grow(t, n):
        return {k: torch.cat([v, 0.5 * torch.randn(n, H, generator=g)]) if k in VOCAB_ROWS else v for k, v in t.items()}

    write_model(out / "expert-1", grow(expert(0.02), 2), tokenizer(words, ["<|im_start|>", "<|im_end|>"]))
    write_model(out / "expert-2", grow(expert(0.04), 1), tokenizer(words, ["<|im_end|>"]))
    e3 = expert(0.06)
    order = list(range(V))
    order[5], order[7] = 7, 5
    e3 = {k: v[order] if k in VOCAB_ROWS else v for k, v in e3.items()}
    swapped = dict(words, t5=7, t7=5)
    write_model(out / "expert-3", e3, tokenizer(swapped, []))


B, E1, E2, E3 = "{base}", "{expert-1}", "{expert-2}", "{expert-3}"

CASES = {
    # Output vocabulary of expert-1: <|im_start|> from expert-1 alone (its row for the others),
    # <|im_end|> from expert-1 and expert-2 (their mean for expert-3), t5/t7 permuted for expert-3.
    "vocab_linear_expert1": {"merge_method": "linear", "tokenizer_source": E1,
                             "models": models_((E1, {"weight": 0.2}), (E2, {"weight": 0.3}), (E3, {"weight": 0.5}))},
    # The base's vocabulary: the added rows dropped, expert-3's rows put back in the base's order.
    "vocab_ties_base": {"merge_method": "ties", "base_model": B, "tokenizer_source": "base",
                        "models": models_((E1, {"weight": 1.0, "density": 0.5}), (E2, {"weight": 0.6, "density": 0.7}),
                                          (E3, {"weight": 0.4, "density": 0.3}))},
    # With a base that lacks both added tokens: <|im_end|> is the mean of expert-1's and
    # expert-2's rows for the base and expert-3.
    "vocab_task_arithmetic_expert1": {"merge_method": "task_arithmetic", "base_model": B, "tokenizer_source": E1,
                                      "models": models_((E1, {"weight": 0.5}), (E2, {"weight": 0.3}),
                                                        (E3, {"weight": 0.2})),
                                      "parameters": {"lambda": 0.9}},
    # A model that is not merged supplies the vocabulary (expert-2's order, 33 tokens).
    "vocab_slerp_expert2": {"merge_method": "slerp", "base_model": B, "tokenizer_source": E2,
                            "models": models_((B, None), (E3, None)), "parameters": {"t": 0.4}},
    # The union: the base's 32 tokens, then <|im_start|> and <|im_end|>, expert-1's added tokens.
    # Only one model may bring new tokens here: mergekit visits the others in a Python set's
    # order, which varies between runs (with expert-2 too, <|im_end|> came first in one run and
    # second in the next). Without a base it also starts from an arbitrary model: no fixture.
    "vocab_ties_union": {"merge_method": "ties", "base_model": B, "tokenizer_source": "union",
                         "models": models_((E3, {"weight": 0.6, "density": 0.5}), (E1, {"weight": 1.0, "density": 0.4}))},
    # `slices`: the embeddings are permuted over the first slice's sources, the head over the
    # last slice's. A frankenmerge: the head is expert-2's alone, which lacks <|im_start|> (a
    # zero row) and has <|im_end|> at 32 (moved to 33).
    "vocab_slices_passthrough_expert1": {"merge_method": "passthrough", "tokenizer_source": E1,
                                         "slices": [{"sources": [src(E1, 0, 2)]}, {"sources": [src(E2, 1, 2)]}]},
    # Each slice with the base: <|im_end|> from expert-1 alone in the embeddings and from
    # expert-2 alone in the head; <|im_start|> is in no model of the head's slice (zeros).
    "vocab_slices_ties_expert1": {"merge_method": "ties", "base_model": B, "tokenizer_source": E1,
                                  "slices": [{"sources": [src(B, 0, 1), src(E1, 0, 1, {"weight": 1.0, "density": 0.5}),
                                                          src(E3, 0, 1, {"weight": 0.4, "density": 0.3})]},
                                             {"sources": [src(B, 1, 2), src(E2, 1, 2, {"weight": 0.6, "density": 0.7}),
                                                          src(E3, 1, 2, {"weight": 0.4, "density": 0.3})]}]},
    # The union (the base's tokens plus expert-1's two) with a base outside the slices: expert-1's
    # rows for expert-3, t5 and t7 put back in order for it.
    "vocab_slices_linear_union": {"merge_method": "linear", "base_model": B, "tokenizer_source": "union",
                                  "slices": [{"sources": [src(E3, 0, 1, {"weight": 0.5}), src(E1, 0, 1, {"weight": 0.5})]},
                                             {"sources": [src(E1, 1, 2, {"weight": 0.3}), src(E3, 1, 2, {"weight": 0.7})]}]},
    # The union is expert-1's vocabulary, so nothing is permuted, but the output still takes the
    # union tokenizer and its vocab_size (34), not the base's (32).
    "vocab_slices_passthrough_union": {"merge_method": "passthrough", "base_model": B, "tokenizer_source": "union",
                                       "slices": [{"sources": [src(E1, 0, 1)]}, {"sources": [src(E1, 1, 2)]}]},
    # A slice's own base_model decides a shared token's row even for a method that does not
    # subtract it: <|im_end|> (expert-1 and expert-2 have it) is expert-2's row for expert-3,
    # not their mean.
    "vocab_slices_linear_slice_base": {"merge_method": "linear", "tokenizer_source": E1,
                                       "slices": [{"base_model": E2, "sources": [
                                           src(E1, 0, 2, {"weight": 0.3}), src(E2, 0, 2, {"weight": 0.3}),
                                           src(E3, 0, 2, {"weight": 0.4})]}]},
    # The `tokenizer:` block. Padding: the union's 34 rows rounded up to 40, the padding rows each
    # model's mean row (so the merged padding is the merge of the means).
    "vocab_tokenizer_pad": {"merge_method": "ties", "base_model": B,
                            "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
                            "models": models_((E3, {"weight": 0.6, "density": 0.5}), (E1, {"weight": 1.0, "density": 0.4}))},
    # Configured tokens: <|im_start|> zero where a model lacks it; <|im_end|> forced to expert-2's
    # row for every model; t5 forced to expert-3's own row of t7 (its row 5); t9 configured but
    # held by every model, so left alone.
    "vocab_tokenizer_tokens": {"merge_method": "linear",
                               "tokenizer": {"source": E1, "tokens": {
                                   "<|im_start|>": {"source": {"kind": "zero"}},
                                   "<|im_end|>": {"source": E2, "force": True},
                                   "t5": {"source": {"kind": "model_token", "model": E3, "token": "t7"}, "force": True},
                                   "t9": {"source": {"kind": "model_token", "model": E1, "token_id": 3}}}},
                               "models": models_((E1, {"weight": 0.2}), (E2, {"weight": 0.3}), (E3, {"weight": 0.5}))},
    # Configured tokens no input has are added to the output vocabulary in the order written
    # (after the union's 34: <|new_b|> 34, <|new_a|> 35), their rows zeros and expert-1's own
    # <|im_start|> row. (With `source: base` or a model, mergekit 0.1.5 adds them to that
    # model's own tokenizer object too, then fails with a KeyError building its permutation.)
    "vocab_tokenizer_new_tokens": {"merge_method": "task_arithmetic", "base_model": B,
                                   "tokenizer": {"source": "union", "tokens": {
                                       "<|new_b|>": {"source": {"kind": "zero"}},
                                       "<|new_a|>": {"source": {"kind": "model_token", "model": E1, "token": "<|im_start|>"}}}},
                                   "models": models_((E1, {"weight": 0.7}), (E3, {"weight": 0.4}))},
}


def run_case(name, case, out):
    paths = {n: str(out / n) for n in ("base", "expert-1", "expert-2", "expert-3")}
    cfg = dict({"dtype": "float32"}, **fill(case, paths))
    with tempfile.TemporaryDirectory() as tmp:
        run_merge(MergeConfiguration.model_validate(cfg), tmp,
                  MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, random_seed=0))
        tensors = {}
        for f in sorted(pathlib.Path(tmp).glob("*.safetensors")):
            tensors.update(load_file(str(f)))
        (out / "out").mkdir(exist_ok=True)
        shutil.copy(pathlib.Path(tmp) / "config.json", out / "out" / f"{name}.config.json")
        shutil.copy(pathlib.Path(tmp) / "tokenizer.json", out / "out" / f"{name}.tokenizer.json")
    save_file({k: v.float().contiguous() for k, v in sorted(tensors.items())}, str(out / "out" / f"{name}.safetensors"))


if __name__ == "__main__":
    write_fixtures("tests/fixtures/mergekit_vocab", make_inputs, CASES, run_case)
