#!/usr/bin/env python3
"""Tiny seeded Llama-family models and Hugging Face transformers' outputs on them.

Writes, for tests/llama_reference.rs, one directory per model under tests/fixtures/:
  <name>/config.json         as transformers writes it (llama_scaled: rewritten in the older
                             rope_theta + rope_scaling form, which transformers still reads)
  <name>/model.safetensors   weights in bfloat16 (the reference uses exactly these values)
  <name>/tokenizer.json      a byte-level tokenizer that prepends <s> (llama_gqa only)
  <name>/reference.safetensors
      input_ids, attention_mask   [3, S] int64, three sequences of different lengths, right padded
      logits                      [R, vocab] logits of the R real positions, row-major by sequence
      loss                        [1] mean next-token cross-entropy over real tokens
      grad.<name>                 dloss/dtensor for every tensor of decoder layer 1 and the final
                                  norm (qwen2, tied: also the embedding, whose gradient sums its
                                  two uses)
      eval_loss                   [1] (llama_gqa only) mean next-token loss over the texts in the
                                  metadata, tokenized with tokenizer.json, every token weighted
                                  equally (what `symerge eval` reports)

The models are:
  llama_gqa     llama, 4 heads over 2 kv heads, untied lm_head
  llama_scaled  llama, linear RoPE scaling (factor 2), attention and MLP biases
  mistral       mistral, head_dim 32 != hidden / heads, 4 heads over 1 kv head
  qwen2         qwen2, q/k/v biases, tied embeddings, rope_theta 1e6

Weights are seeded random with O(1) activations (transformers' 0.02 init makes every logit ~0,
which would test little). The reference runs in float64: RMSNorm is patched to stay in float64
(transformers casts to float32) and attention uses sdpa (eager casts the softmax to float32). The
rotary angles stay as transformers computes them, in float32, as symerge does too. Values are
stored as float32.

    /tmp/torchenv/bin/python3 tests/reference/make_llama_fixtures.py [--out tests/fixtures]
"""

import argparse
import json
import math
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYER = 1
LENGTHS = [12, 7, 3]
VOCAB = 512
COMMON = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=VOCAB,
    rms_norm_eps=1e-6,
)
EVAL_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Merging models is cheap.",
    "Hi",
    "A somewhat longer sentence, with punctuation; and digits 0123456789!",
]


def rmsnorm_f64(self, hidden_states):
    """RMSNorm without transformers' float32 cast, so a float64 model stays float64."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


for module in (modeling_llama.LlamaRMSNorm, modeling_mistral.MistralRMSNorm, modeling_qwen2.Qwen2RMSNorm):
    module.forward = rmsnorm_f64


def models_to_build():
    return [
        ("llama_gqa", LlamaForCausalLM, LlamaConfig(**COMMON, num_key_value_heads=2, tie_word_embeddings=False)),
        (
            "llama_scaled",
            LlamaForCausalLM,
            LlamaConfig(
                **COMMON,
                num_key_value_heads=4,
                rope_scaling={"rope_type": "linear", "factor": 2.0},
                attention_bias=True,
                mlp_bias=True,
                tie_word_embeddings=False,
            ),
        ),
        (
            "mistral",
            MistralForCausalLM,
            MistralConfig(**COMMON, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False),
        ),
        (
            "qwen2",
            Qwen2ForCausalLM,
            Qwen2Config(**COMMON, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
        ),
    ]


def randomize(model, gen):
    """O(1) activations and logits: weights ~ N(0, 1/fan_in), embeddings ~ N(0, 0.25^2) (tied, they
    are also the output projection), norms ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
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
    shift_logits = logits[:, :-1, :]
    targets = ids[:, 1:]
    valid = mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(shift_logits[valid], targets[valid], reduction="sum")
    return logits, nll / valid.sum(), nll, valid.sum()


def write_v4_rope(path):
    """Rewrites a config's rope_parameters as the older rope_theta + rope_scaling fields."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "tests/fixtures")
    args = ap.parse_args()

    for k, (name, cls, config) in enumerate(models_to_build()):
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(k)
        config._attn_implementation = "sdpa"
        model = cls(config).eval()
        gen = torch.Generator().manual_seed(1000 + k)
        randomize(model, gen)

        config.save_pretrained(out)
        if name == "llama_scaled":
            write_v4_rope(out / "config.json")
            reread = type(config).from_pretrained(out)
            assert reread.rope_parameters["rope_type"] == "linear" and reread.rope_parameters["factor"] == 2.0
        weights = {
            n: p.detach().bfloat16().contiguous()
            for n, p in model.state_dict().items()
            if not (config.tie_word_embeddings and n == "lm_head.weight")
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
        # transformers' own loss (it computes in float32): the same definition.
        assert abs(loss.item() - hf_loss.item()) < 1e-5 * loss.item(), (loss, hf_loss)

        named = {
            n: p
            for n, p in model.named_parameters()
            if n.startswith(f"model.layers.{LAYER}.")
            or n == "model.norm.weight"
            or (config.tie_word_embeddings and n == "model.embed_tokens.weight")
        }
        grads = torch.autograd.grad(loss, list(named.values()))
        tensors = {
            "input_ids": ids,
            "attention_mask": mask,
            "logits": logits[mask.bool()],
            "loss": loss.reshape(1),
        }
        tensors.update({f"grad.{n}": g for n, g in zip(named, grads)})
        meta = {
            "model": name,
            "layer": str(LAYER),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

        if name == "llama_gqa":
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
