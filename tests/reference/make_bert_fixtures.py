#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers for the packaged MiniLM-L6 checkpoint.

Writes, for tests/bert_reference.rs:
  tests/fixtures/minilm_head.safetensors       the seeded 3-label head (classifier.weight/bias)
  tests/fixtures/minilm_reference.safetensors  for six fixed texts:
      input_ids, token_type_ids, attention_mask   [6, S] int64, padded to the longest text
      cls_hidden                                  [6, 384] last hidden state of each [CLS] row
      logits                                      [6, 3]
      targets                                     [6, 3] soft labels (probabilities)
      loss                                        [1] mean soft-label cross-entropy
      grad.<name>                                 dloss/dtensor for every tensor of encoder
                                                  layer 3, the pooler, the classifier and the
                                                  embedding LayerNorm, flattened and sampled
                                                  every `grad_strides[name]` elements
  with the texts (JSON) and versions in the file's metadata.

The model runs in float64 so the reference is exact to far below the f32 tolerance of the test;
values are stored as float32. Needs torch, transformers, tokenizers and safetensors; CPU is fine.

    scripts/fetch-assets.sh
    python3 tests/reference/make_bert_fixtures.py [--model target/assets/minilm] [--out tests/fixtures]
"""

import argparse
import json
import pathlib

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import BertForSequenceClassification

ROOT = pathlib.Path(__file__).resolve().parents[2]
TEXTS = [
    "A man is playing a guitar.",
    "Hi.",
    "The stock market fell sharply today after the central bank raised interest rates again.",
    "Merging fine-tuned models without any training data is surprisingly effective in practice.",
    "Cats sleep most of the day.",
    "Is this the real life? Is this just fantasy? Caught in a landslide, no escape from reality.",
]
LAYER = 3
NUM_LABELS = 3
MAX_LEN = 128
GRAD_SAMPLE = 4096


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=pathlib.Path, default=ROOT / "target/assets/minilm")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "tests/fixtures")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(
        args.model, num_labels=NUM_LABELS, attn_implementation="eager"
    )
    model.eval()  # dropout off
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        # A seeded head with a non-zero bias, so the bias path is exercised too.
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=gen) * 0.2)
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=gen) * 0.2)
    save_file(
        {
            "classifier.weight": model.classifier.weight.detach().float().contiguous(),
            "classifier.bias": model.classifier.bias.detach().float().contiguous(),
        },
        str(args.out / "minilm_head.safetensors"),
    )
    model = model.double()

    # The file pads to 128; like symerge, pad each batch to its longest text instead.
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    encs = tok.encode_batch(TEXTS)
    seq = max(len(e.ids) for e in encs)
    ids = torch.zeros(len(TEXTS), seq, dtype=torch.int64)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encs):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        types[i, :n] = torch.tensor(e.type_ids)
        mask[i, :n] = 1

    targets = torch.softmax(torch.randn(len(TEXTS), NUM_LABELS, generator=gen, dtype=torch.float64) * 2.0, dim=-1)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    logits = out.logits
    loss = -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()

    # Names as symerge keys them: without the `bert.` wrapper prefix.
    named = {}
    for name, p in model.named_parameters():
        short = name.removeprefix("bert.")
        if (
            short.startswith(f"encoder.layer.{LAYER}.")
            or short.startswith("pooler.")
            or short.startswith("classifier.")
            or short.startswith("embeddings.LayerNorm.")
        ):
            named[short] = p
    grads = torch.autograd.grad(loss, list(named.values()))

    tensors = {
        "input_ids": ids,
        "token_type_ids": types,
        "attention_mask": mask,
        "cls_hidden": out.hidden_states[-1][:, 0, :],
        "logits": logits,
        "targets": targets,
        "loss": loss.reshape(1),
    }
    # Every gradient element would make a 7 MB fixture; an evenly strided sample of at most
    # GRAD_SAMPLE elements per tensor keeps it small and still covers every row and column pattern.
    strides = {}
    for name, g in zip(named, grads):
        flat = g.reshape(-1)
        stride = max(1, -(-flat.numel() // GRAD_SAMPLE))
        strides[name] = stride
        tensors[f"grad.{name}"] = flat[::stride]
    tensors = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous() for k, v in tensors.items()
    }
    meta = {
        "texts": json.dumps(TEXTS),
        "layer": str(LAYER),
        "max_len": str(MAX_LEN),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "grad_strides": json.dumps(strides),
    }
    path = args.out / "minilm_reference.safetensors"
    save_file(tensors, str(path), metadata=meta)
    print(f"wrote {path} ({len(tensors)} tensors, loss {loss.item():.6f}) and {args.out / 'minilm_head.safetensors'}")


if __name__ == "__main__":
    main()
