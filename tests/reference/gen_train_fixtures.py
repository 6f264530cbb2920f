"""Reference fixture for `qtune train` parity (issue 4): 10 AdamW steps of PEFT LoRA on PyTorch.

The tiny Llama of tests/fixtures/llama/model and its tokenizer (transformers), a JSONL of
prompt/completion and text lines tokenised by the issue's conventions:
  text              -> encode(text, special tokens) + EOS, loss on every next token;
  prompt/completion -> encode(prompt, special tokens) + encode(completion, none) + EOS, loss on the
                       completion and EOS.
LoRA initialised from the reference adapter tests/fixtures/llama/f32/adapter (non-zero B), then 10
torch.optim.AdamW steps (batch 1, one example per step in file order, no accumulation, dropout 0,
constant lr, no clipping, weight decay 0). Records every example's ids/labels and the 10 losses.

Run: python tests/reference/gen_train_fixtures.py  (pinned stack in requirements.txt)
"""
import json
import os
import sys

import torch
import transformers
import peft
from transformers import AutoTokenizer, LlamaForCausalLM
from peft import PeftModel

HERE = os.path.dirname(__file__)
MODEL = os.path.join(HERE, "..", "fixtures", "llama", "model")
ADAPTER = os.path.join(HERE, "..", "fixtures", "llama", "f32", "adapter")
OUT = os.path.join(HERE, "..", "fixtures", "train")
LR = 1e-2
STEPS = 10

# One format per file (qtune's loader requires it): data.jsonl prompt/completion, text.jsonl text.
LINES = [
    {"prompt": "the quick brown fox", "completion": " jumps over the lazy dog"},
    {"prompt": "qtune trains adapters", "completion": " on quantised weights"},
    {"prompt": "hello world,", "completion": " this is qtune"},
    {"prompt": "a small", "completion": " model for a quantised test"},
    {"prompt": "a small model", "completion": " for a quantised test"},
    {"prompt": "the lazy dog sleeps", "completion": " while the quick fox runs"},
    {"prompt": "qtune trains", "completion": " adapters"},
    {"prompt": "hello", "completion": " world"},
    {"prompt": "the quick", "completion": " brown fox jumps over the lazy dog"},
    {"prompt": "weights stay quantised,", "completion": " adapters train"},
]
TEXT_LINES = [
    {"text": "qtune trains adapters on quantised weights"},
    {"text": "a small model for a quantised test"},
    {"text": "the lazy dog sleeps while the quick fox runs"},
    {"text": "hello world"},
    {"text": "weights stay quantised, adapters train"},
]


def encode(tok, line):
    eos = tok.eos_token_id
    if "text" in line:
        ids = tok.encode(line["text"], add_special_tokens=True) + [eos]
        return ids, list(ids)
    p = tok.encode(line["prompt"], add_special_tokens=True)
    c = tok.encode(line["completion"], add_special_tokens=False) + [eos]
    return p + c, [-100] * len(p) + c


def run(lines, steps):
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = LlamaForCausalLM.from_pretrained(MODEL, torch_dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, ADAPTER, is_trainable=True)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    examples = [encode(tok, l) for l in lines]
    losses = []
    for i in range(steps):
        ids, labels = examples[i % len(examples)]
        opt.zero_grad()
        out = pm(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        losses.append(out.loss.item())
        out.loss.backward()
        opt.step()
    return examples, losses


def main():
    os.makedirs(OUT, exist_ok=True)
    for name, lines in [("data.jsonl", LINES), ("text.jsonl", TEXT_LINES)]:
        with open(os.path.join(OUT, name), "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
    examples, losses = run(LINES, STEPS)
    text_examples, text_losses = run(TEXT_LINES, len(TEXT_LINES))
    meta = dict(losses=losses, lr=LR, steps=STEPS,
                examples=[dict(ids=i, labels=l) for i, l in examples],
                text_losses=text_losses,
                text_examples=[dict(ids=i, labels=l) for i, l in text_examples],
                versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("losses", losses)


if __name__ == "__main__":
    sys.exit(main())
