#!/usr/bin/env python3
"""Tiny seeded GPT-2 models and Hugging Face transformers' outputs on them.

Writes, for tests/gpt2_reference.rs, one directory per model under tests/fixtures/:
  <name>/config.json         as transformers writes it
  <name>/model.safetensors   weights in bfloat16 (the reference uses exactly these values), under
                             GPT2LMHeadModel's names (`transformer.h.1.attn.c_attn.weight`)
  <name>/tokenizer.json      a byte-level tokenizer that prepends <s> (gpt2 only)
  <name>/reference.safetensors
      input_ids, attention_mask   [3, S] int64, three sequences of different lengths, right padded
      logits                      [R, vocab] logits of the R real positions, row-major by sequence
      loss                        [1] mean next-token cross-entropy over real tokens
      grad.<name>                 dloss/dtensor for every tensor of block 1, the final LayerNorm,
                                  the position table and the token table (tied: the sum of its
                                  two uses) or lm_head (untied)
      eval_loss                   [1] (gpt2 only) mean next-token loss over the texts in the
                                  metadata, tokenized with tokenizer.json, every token weighted
                                  equally (what `symerge eval` reports)

The models are:
  gpt2          GPT-2 as released: gelu_new, tied embeddings, n_inner 4 * n_embd
  gpt2_untied   untied lm_head, exact (erf) GELU, n_inner 96, epsilon 1e-6

Weights are seeded random with O(1) activations (transformers' 0.02 init makes every logit ~0,
which would test little). The reference runs in float64 with sdpa attention. Values are stored as
float32.

    target/venv-mergekit/bin/python tests/reference/make_gpt2_fixtures.py [--out tests/fixtures]
"""

import argparse
import json
import math
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYER = 1
LENGTHS = [12, 7, 3]
VOCAB = 512
COMMON = dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
EVAL_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging models is cheap.",
    "Hi",
    "A somewhat longer sentence, with punctuation; and digits 0123456789!",
]


def models_to_build():
    return [
        ("gpt2", GPT2Config(**COMMON, activation_function="gelu_new", tie_word_embeddings=True)),
        (
            "gpt2_untied",
            GPT2Config(
                **COMMON, activation_function="gelu", n_inner=96, layer_norm_epsilon=1e-6, tie_word_embeddings=False
            ),
        ),
    ]


def randomize(model, gen):
    """O(1) activations and logits: Conv1D weights ([in, out]) ~ N(0, 1/in), lm_head ~ N(0, 1/hidden),
    tables ~ N(0, 0.25^2), LayerNorm weights ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "wte" in name or "wpe" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[0]))
            # The checkpoint is stored in bfloat16: the reference uses exactly the stored values.
            p.copy_(p.bfloat16().float())


def byte_tokenizer():
    """Byte-level BPE without merges (one token per byte, ids 3..258) that prepends <s>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def next_token_loss(model, ids, mask):
    """Mean next-token cross-entropy over real tokens, float64."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    valid = mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1, :][valid], ids[:, 1:][valid], reduction="sum")
    return logits, nll / valid.sum(), nll, valid.sum()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "tests/fixtures")
    args = ap.parse_args()

    for k, (name, config) in enumerate(models_to_build()):
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(k)
        config._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(config).eval()
        gen = torch.Generator().manual_seed(2000 + k)
        randomize(model, gen)

        config.architectures = ["GPT2LMHeadModel"]
        config.save_pretrained(out)
        weights = {
            n: p.detach().bfloat16().contiguous()
            for n, p in model.state_dict().items()
            if not (config.tie_word_embeddings and n == "lm_head.weight") and not n.endswith(".attn.bias")
        }
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})

        model = model.double()
        seq = max(LENGTHS)
        ids = torch.zeros(len(LENGTHS), seq, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, n in enumerate(LENGTHS):
            ids[b, :n] = torch.randint(3, VOCAB, (n,), generator=gen)
            mask[b, :n] = 1
        logits, loss, _, _ = next_token_loss(model, ids, mask)
        labels = ids.masked_fill(mask == 0, -100)
        hf_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert abs(loss.item() - hf_loss.item()) < 1e-5 * loss.item(), (loss, hf_loss)

        named = {
            n: p
            for n, p in model.named_parameters()
            if n.startswith(f"transformer.h.{LAYER}.")
            or n.startswith("transformer.ln_f.")
            or n in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")
        }
        if config.tie_word_embeddings:
            named.pop("lm_head.weight", None)
        grads = torch.autograd.grad(loss, list(named.values()))
        tensors = {"input_ids": ids, "attention_mask": mask, "logits": logits[mask.bool()], "loss": loss.reshape(1)}
        tensors.update({f"grad.{n}": g for n, g in zip(named, grads)})
        meta = {"model": name, "layer": str(LAYER), "torch": torch.__version__, "transformers": transformers.__version__}

        if name == "gpt2":
            tok = byte_tokenizer()
            tok.save(str(out / "tokenizer.json"))
            total, count = 0.0, 0
            with torch.no_grad():
                for text in EVAL_TEXTS:
                    t = torch.tensor([tok.encode(text).ids])
                    _, _, nll, n = next_token_loss(model, t, torch.ones_like(t))
                    total, count = total + nll.item(), count + n.item()
            tensors["eval_loss"] = torch.tensor([total / count], dtype=torch.float64)
            meta["eval_texts"] = json.dumps(EVAL_TEXTS)
            meta["eval_tokens"] = str(count)

        tensors = {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous() for k, v in tensors.items()
        }
        save_file(tensors, str(out / "reference.safetensors"), metadata=meta)
        print(f"wrote {out}: loss {loss.item():.6f}, {len(grads)} gradients")


if __name__ == "__main__":
    main()
