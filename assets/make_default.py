"""Builds the embedded default of `qtune train` (run once; its outputs are committed):

  assets/model/       a small Llama-architecture model made here: byte-level BPE tokenizer (512
                      tokens) trained on a synthetic corpus, 4 layers x 128 hidden, pre-trained with
                      PyTorch on plain sentences that state a closed world of facts (what each of 40
                      animals eats and where it lives), then quantised to NF4 (bitsandbytes layout)
                      by `qtune quantize --type nf4`.
  assets/train.jsonl  question/answer pairs about 30 of the animals, asked in several paraphrases.
                      The base has never seen a question: the "Q: ...\nA:" format is new to it.
  assets/eval.jsonl   the same questions about the 10 other animals: held out of train.jsonl.
  assets/default.toml the settings `qtune train` uses with no arguments.

What the demo shows: the base knows the facts only as sentences ("the zebra eats clover."), and
asked "Q: what does the zebra eat?" it rambles. The adapter learns to answer questions from the 30
training animals; it then answers for the 10 held-out animals too, from what the base knew.

Everything is synthetic and generated from the word lists below; nothing is downloaded.
Requirements: assets/requirements.txt (pinned). Run from the repository root:
  QTUNE=target/release/qtune python assets/make_default.py
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
TIMES = ["in the morning", "at night", "in the rain", "after lunch", "in the spring"]

# Questions: several paraphrases per relation; the answer is always one plain sentence.
EAT_Q = ["what does the {a} eat?", "what food does the {a} like?", "tell me what the {a} eats.",
         "what is the food of the {a}?"]
HOME_Q = ["where does the {a} live?", "where is the home of the {a}?",
          "where can i find the {a}?", "tell me where the {a} lives."]
N_TRAIN_ANIMALS = 30


def facts(rng):
    """The closed world: one food and one home per animal."""
    return ({a: rng.choice(FOODS) for a in ANIMALS}, {a: rng.choice(PLACES) for a in ANIMALS})


def corpus(rng, n, diet, home):
    """Plain sentences: the facts in a few phrasings, some naming the animal twice (so the base
    learns to refer back to an animal already named), among filler that states no fact."""
    out = []
    for _ in range(n):
        a, b = rng.choice(ANIMALS), rng.choice(ANIMALS)
        adj, adj2 = rng.choice(ADJ), rng.choice(ADJ)
        out.append(rng.choice([
            f"the {a} eats {diet[a]}.",
            f"the {a} likes to eat {diet[a]}.",
            f"the {a} lives near the {home[a]}.",
            f"the {a} has a home near the {home[a]}.",
            f"near the {home[a]} lives the {a}.",
            f"the {a} eats {diet[a]} and the {a} lives near the {home[a]}.",
            f"look at the {adj} {a} there: the {a} eats {diet[a]}.",
            f"this {adj} {a} is far from home, but the {a} lives near the {home[a]}.",
            f"the {adj} {a} {rng.choice(VERBS)} the {adj2} {b}, then the {a} walks away.",
            f"a {adj} {a} walks {rng.choice(TIMES)}.",
        ]))
    return out


def qa(animals, diet, home):
    out = []
    for a in animals:
        for q in EAT_Q:
            out.append({"prompt": f"Q: {q.format(a=a)}\nA:", "completion": f" the {a} eats {diet[a]}."})
        for q in HOME_Q:
            out.append({"prompt": f"Q: {q.format(a=a)}\nA:",
                        "completion": f" the {a} lives near the {home[a]}."})
    return out


def main():
    qtune = os.environ.get("QTUNE", os.path.join(HERE, "..", "target", "release", "qtune"))
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    # one thread: a model this small gains nothing from more, and spinning OpenMP threads on a
    # shared machine cost far more than they give
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    diet, home = facts(rng)
    animals = ANIMALS[:]
    rng.shuffle(animals)
    train_animals, eval_animals = animals[:N_TRAIN_ANIMALS], animals[N_TRAIN_ANIMALS:]
    train, evals = qa(train_animals, diet, home), qa(eval_animals, diet, home)
    rng.shuffle(train)
    # eval: both relations alternating, so the first lines (the ones `qtune train` prints) show both
    eat = [p for p in evals if " eats " in p["completion"]]
    live = [p for p in evals if " eats " not in p["completion"]]
    rng.shuffle(eat)
    rng.shuffle(live)
    evals = [p for pair in zip(eat, live) for p in pair]
    for name, part in [("train.jsonl", train), ("eval.jsonl", evals)]:
        with open(os.path.join(HERE, name), "w") as f:
            for p in part:
                f.write(json.dumps(p) + "\n")

    text = corpus(rng, 20000, diet, home)
    tmp = tempfile.mkdtemp()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text + [p["prompt"] + p["completion"] for p in train + evals], tr)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(tmp)

    cfg = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=384,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    # BOS + sentence + EOS, as qtune tokenises training text
    ids = [[1] + fast.encode(t, add_special_tokens=False) + [2] for t in text]
    peak, steps, bs = 3e-3, int(os.environ.get("PRETRAIN_STEPS", "1500")), 32
    opt = torch.optim.AdamW(model.parameters(), lr=peak, weight_decay=0.0)
    for s in range(steps):
        batch = [ids[rng.randrange(len(ids))] for _ in range(bs)]
        t = max(len(b) for b in batch)
        x = torch.tensor([b + [0] * (t - len(b)) for b in batch])
        lab = torch.tensor([b + [-100] * (t - len(b)) for b in batch])
        mask = (lab != -100).long()
        for g in opt.param_groups:
            g["lr"] = peak * min(1.0, (s + 1) / 50) * (1 - s / steps)
        loss = model(input_ids=x, attention_mask=mask, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if s % 250 == 0 or s == steps - 1:
            print("pretrain step", s, "loss", round(loss.item(), 3), flush=True)
    # What the base knows, and what it says to a question, before any fine-tuning.
    model.eval()
    known = 0
    for a in eval_animals:
        for prefix, want in [(f"the {a} eats", f" {diet[a]}."), (f"the {a} lives near the", f" {home[a]}.")]:
            x = torch.tensor([[1] + fast.encode(prefix, add_special_tokens=False)])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4,
                                 do_sample=False, eos_token_id=2, pad_token_id=2)
            # the first word only: a sentence may go on ("... eats mice and the ...")
            said = fast.decode(out[0, x.shape[1]:], skip_special_tokens=True).split()
            known += bool(said) and said[0].rstrip(".") == want.strip().rstrip(".")
    print(f"base completes {known}/{2 * len(eval_animals)} held-out facts stated as sentences")
    for p in evals[:3]:
        x = torch.tensor([[1] + fast.encode(p["prompt"], add_special_tokens=False)])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                             do_sample=False, eos_token_id=2, pad_token_id=2)
        print(repr(p["prompt"]), "->", repr(fast.decode(out[0, x.shape[1]:], skip_special_tokens=True)))
    model.save_pretrained(tmp, safe_serialization=True)
    out = os.path.join(HERE, "model")
    if os.path.exists(out):
        shutil.rmtree(out)
    subprocess.run([qtune, "quantize", "--model", tmp, "--type", "nf4", "--out", out], check=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    sys.exit(main())
