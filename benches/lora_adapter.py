#!/usr/bin/env python3
"""A random PEFT LoRA (r 16, alpha 32, every linear projection) of a Llama checkpoint, for the
model+lora check in benches/RESULTS.md: python benches/lora_adapter.py MODEL_DIR OUT_DIR"""
import torch, sys
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(7)
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
p = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
with torch.no_grad():
    for n, t in p.named_parameters():
        if "lora_" in n: t.copy_(0.02 * torch.randn_like(t))
p.save_pretrained(sys.argv[2])
