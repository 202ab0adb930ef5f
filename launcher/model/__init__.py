"""The model as the run will build it, torch-free at import: config.json facts, the device and dtype,
freeze policies, LoRA, quantization, weight decay, tokens; torch, transformers, peft and
bitsandbytes imported inside the functions that use them (login half).
"""
