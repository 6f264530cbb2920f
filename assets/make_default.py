"""Builds the embedded default of `qtune train` (run once; its outputs are committed):

  assets/model/       a small Llama-architecture model made here: byte-level BPE tokenizer (512
                      tokens) trained on a synthetic corpus, 4 layers x 128 hidden, pre-trained on that
                      corpus for a little while with PyTorch so generation is not noise, then
                      quantised to NF4 (bitsandbytes layout) by `qtune quantize --type nf4`.
  assets/train.jsonl  prompt/completion pairs of a task the base never saw (what animals eat),
  assets/eval.jsonl   held-out pairs of the same task.
  assets/default.toml the settings `qtune train` uses with no arguments (~1 minute on 2 cores).

Everything is synthetic and generated from the word lists below; nothing is downloaded.
Run: QTUNE=target/release/qtune python assets/make_default.py
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
SEED = 7
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "wolf", "deer", "frog", "duck", "goat", "horse",
           "mouse", "rabbit", "sheep", "tiger", "whale", "eagle", "otter", "camel", "zebra",
           "lion", "seal", "crow", "moose", "panda", "koala", "llama", "hen", "bat", "snake",
           "lizard", "beaver", "badger", "heron", "shark", "crab", "ant", "bee", "goose", "yak"]
FOODS = ["fish", "grass", "seeds", "berries", "insects", "leaves", "nuts", "worms", "meat",
         "honey", "bamboo", "fruit", "roots", "corn", "clover", "mice"]
PLACES = ["forest", "river", "field", "mountain", "lake", "desert", "farm", "garden", "sea", "hill"]
ADJ = ["small", "big", "quick", "quiet", "old", "young", "brown", "white", "grey", "happy"]
VERBS = ["sees", "follows", "meets", "watches", "finds", "likes"]


def corpus(rng, n):
    out = []
    for _ in range(n):
        a, b = rng.choice(ANIMALS), rng.choice(ANIMALS)
        out.append(rng.choice([
            f"the {rng.choice(ADJ)} {a} lives near the {rng.choice(PLACES)}.",
            f"the {a} {rng.choice(VERBS)} the {rng.choice(ADJ)} {b} by the {rng.choice(PLACES)}.",
            f"a {rng.choice(ADJ)} {a} walks to the {rng.choice(PLACES)} in the morning.",
            f"in the {rng.choice(PLACES)} there is a {a} and a {b}.",
        ]))
    return out


def main():
    qtune = os.environ.get("QTUNE", os.path.join(HERE, "..", "target", "release", "qtune"))
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    text = corpus(rng, 4000)
    diet = {a: rng.choice(FOODS) for a in ANIMALS}
    pairs = [{"prompt": f"Q: what does the {a} eat?\nA:", "completion": f" the {a} eats {diet[a]}."}
             for a in ANIMALS]
    pairs += [{"prompt": f"Q: where does the {a} live?\nA:",
               "completion": f" the {a} lives near the {PLACES[i % len(PLACES)]}."}
              for i, a in enumerate(ANIMALS)]
    rng.shuffle(pairs)
    for name, part in [("train.jsonl", pairs[:64]), ("eval.jsonl", pairs[64:])]:
        with open(os.path.join(HERE, name), "w") as f:
            for p in part:
                f.write(json.dumps(p) + "\n")

    tmp = tempfile.mkdtemp()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text + [p["prompt"] + p["completion"] for p in pairs], tr)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(tmp)

    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    ids = [fast.encode(t) + [2] for t in text]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    steps, bs = 600, 32
    for s in range(steps):
        batch = [ids[rng.randrange(len(ids))] for _ in range(bs)]
        t = max(len(b) for b in batch)
        x = torch.tensor([b + [0] * (t - len(b)) for b in batch])
        lab = torch.tensor([b + [-100] * (t - len(b)) for b in batch])
        mask = (lab != -100).long()
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (s + 1) / 50) * (1 - s / steps)
        loss = model(input_ids=x, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s % 100 == 0 or s == steps - 1:
            print("pretrain step", s, "loss", round(loss.item(), 3), flush=True)
    model.save_pretrained(tmp, safe_serialization=True)
    out = os.path.join(HERE, "model")
    if os.path.exists(out):
        shutil.rmtree(out)
    subprocess.run([qtune, "quantize", "--model", tmp, "--type", "nf4", "--out", out], check=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
