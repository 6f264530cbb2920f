"""Model, tokenizer and data for issue 15's quality bar: bf16 training against f32 on real text.

"Over 100 steps of the ~100M shape on real text (any public-domain text you write or generate),
the bf16 loss curve within 1 % of f32's." This script makes everything that run needs, from
nothing downloaded:
  (a) corpus.txt: ~400 KB of English prose generated here from templates and word lists written
      for this script (so it is ours to publish; seeded, deterministic);
  (b) a byte-level BPE tokenizer trained on it with `tokenizers` (target vocab 32000; the corpus
      decides the real size), saved as tokenizer.json + tokenizer_config.json (<s> / </s>);
  (c) a LlamaForCausalLM of benches/compare/llama-100m.json's shape (vocab = the tokenizer's
      size), seeded random init, saved as a Hugging Face directory in bf16 safetensors
      (`qtune train --quant q4_0` quantises it on load);
  (d) train.jsonl / eval.jsonl: {"text": ...} rows of ~256 tokens, disjoint slices of the corpus.

Run: python tests/reference/gen_quality_model.py OUT_DIR   (pinned stack in requirements.txt)
Then see docs/quality-bf16.md for the two `qtune train` runs and compare_quality.py.
"""
import json
import os
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = os.path.join(HERE, "..", "..", "benches", "compare", "llama-100m.json")
SEED = 0
CORPUS_BYTES = 400_000
ROW_TOKENS = 256
TRAIN_ROWS = 200  # 100 steps x batch 2
EVAL_ROWS = 8

# ---- (a) the corpus: prose from templates and word lists written for this script ----------------

PEOPLE = """the miller, the old shepherd, a young clerk, the ferryman, my grandmother, the schoolmaster,
a travelling tinker, the baker's daughter, the lighthouse keeper, a weary soldier, the innkeeper,
the blacksmith, a quiet widow, the village doctor, two fishermen, the harbour master, a stranger
in a grey coat, the gardener, the carpenter's apprentice, an elderly priest, the postman, a wandering
poet, the night watchman, the weaver, a small boy, the mayor, the cook, a tall woman with red hair,
the shopkeeper, the stable lad, a retired captain, the washerwoman, the surveyor, the glassblower,
the bookbinder, a pair of students, the potter, the chimney sweep, the lamplighter, the cobbler""".split(",")
PLACES = """the mill pond, the market square, the long road north, the churchyard, the edge of the forest,
the harbour wall, the high pasture, the old stone bridge, the kitchen garden, the railway station,
the top of the hill, the river bank, the orchard, the village green, the narrow lane, the cellar,
the attic, the lighthouse, the salt marsh, the quarry, the frozen lake, the library, the workshop,
the inn by the crossroads, the wheat fields, the cliff path, the town hall, the bakery, the chapel,
the little school, the ruined tower, the meadow, the beech wood, the dockyard, the fish market""".split(",")
THINGS = """a lantern, a letter, an old map, a basket of apples, a silver key, a broken clock, a loaf of bread,
a wooden chest, a bundle of firewood, a pair of boots, a copper kettle, a book of songs, a ball of
wool, a fishing net, a small brown dog, a cart full of hay, a jar of honey, a compass, a walking stick,
a length of rope, a bottle of ink, a wheel of cheese, a violin, a bag of seeds, a candle, a hammer,
a shawl, a telescope, a kite, a spade, a sack of flour, a blue umbrella, a clay pipe, a feather,
a tin whistle, a sealed envelope, a ledger, a music box, a sheepskin rug, a bell""".split(",")
VERBS_PAST = """carried, found, mended, lost, sold, painted, buried, opened, hid, polished, borrowed, counted,
dropped, wrapped, remembered, returned, weighed, examined, offered, forgot, described, followed,
admired, repaired, locked away, gave away, pointed at, picked up, set down, handed over""".split(",")
MOTIONS = """walked slowly to, hurried along, wandered through, climbed up to, rode out to, ran down to,
crept into, strolled past, waited at, returned to, searched, cleaned, guarded, left, visited, crossed,
sketched, measured, watched over, rowed across""".split(",")
TIMES = """in the early morning, at dusk, on a cold Tuesday, after the harvest, before the first snow,
late one evening, during the long summer, on market day, when the tide was low, at midnight,
in the spring of that year, just after dawn, on the feast day, while the bells were ringing,
through the whole of the winter, on a wet afternoon, at the turn of the year, before breakfast""".split(",")
WEATHER = """The rain fell steadily on the roofs, A thin fog lay over the water, The wind came hard from
the sea, The sky was clear and very blue, Snow had covered every path, The air smelled of smoke and
wet leaves, A pale sun hung low over the hills, Thunder rolled somewhere far to the west, The frost
made the grass crackle underfoot, Warm light spilled across the fields""".split(",")
FEELINGS = """glad, uneasy, tired, curious, proud, afraid, calm, restless, hopeful, ashamed, grateful,
lonely, amused, puzzled, content, anxious, cheerful, stubborn, sorry, delighted""".split(",")
REASONS = """because nobody else would do it, since the price of grain had fallen, for the sake of an old
promise, as the letter had asked, so that the children would be warm, because the weather was
turning, though no one had asked, as their father had done before them, in case the river rose again,
because it seemed the right thing to do, so as not to be late, for reasons nobody quite understood""".split(",")
SAYINGS = """A stitch in time saves a great deal of trouble later, Nothing is ever as simple as it looks from
the road, The river does not hurry and yet it reaches the sea, A kind word costs less than bread,
Old boots know the way home, Every door has two sides, Patience is a better guide than any map,
What the hands learn the heart remembers, A full basket is heavy but an empty one is heavier,
The longest night still ends in morning""".split(",")
NUMBERS = "two,three,four,five,six,seven,eight,nine,ten,eleven,twelve,twenty,forty,a hundred".split(",")
FACTS = [
    "Water boils at one hundred degrees at the level of the sea and at a lower temperature on a high mountain.",
    "The moon shows the same face to the earth because it turns once for every journey around it.",
    "Bees carry pollen from flower to flower, and many fruits would not set without them.",
    "A sundial tells the time by the shadow of a rod, and it is of no use on a cloudy day.",
    "Iron rusts when it is left in damp air, which is why tools are oiled before the winter.",
    "The tides rise and fall twice a day, pulled by the moon and, more weakly, by the sun.",
    "Bread rises because yeast turns sugar into gas, and the gas is caught in the dough.",
    "Sound travels faster through water than through air, and faster still through iron.",
    "A compass needle points north because the earth itself behaves like a great magnet.",
    "Leaves turn yellow in autumn when the green colour fades and the other colours show through.",
    "Salt water freezes at a lower temperature than fresh water, so the sea rarely turns to ice.",
    "A lever lets a small force lift a large weight, if the force moves through a longer distance.",
]


def pick(rng, xs):
    return " ".join(rng.choice(xs).split())  # the lists wrap across source lines


def sentence(rng):
    """One sentence from one of several templates."""
    p, q = pick(rng, PEOPLE), pick(rng, PEOPLE)
    k = rng.randrange(10)
    if k == 0:
        return f"{pick(rng, TIMES).capitalize()}, {p} {pick(rng, MOTIONS)} {pick(rng, PLACES)} with {pick(rng, THINGS)}."
    if k == 1:
        return f"{p.capitalize()} {pick(rng, VERBS_PAST)} {pick(rng, THINGS)} {pick(rng, REASONS)}."
    if k == 2:
        return f"{pick(rng, WEATHER)}, and {p} felt {pick(rng, FEELINGS)}."
    if k == 3:
        return f"\"{pick(rng, SAYINGS)},\" said {p} to {q}, and {q} nodded."
    if k == 4:
        return (f"There were {pick(rng, NUMBERS)} of them at {pick(rng, PLACES)}, "
                f"and {p} counted them twice to be sure.")
    if k == 5:
        return rng.choice(FACTS)
    if k == 6:
        return (f"When {p} reached {pick(rng, PLACES)}, {q} was already there, "
                f"looking {pick(rng, FEELINGS)} and holding {pick(rng, THINGS)}.")
    if k == 7:
        return f"Nobody knew why {p} had {pick(rng, VERBS_PAST)} {pick(rng, THINGS)}, but {q} had a guess."
    if k == 8:
        return (f"{p.capitalize()} asked {q} whether {pick(rng, THINGS)} could still be found at "
                f"{pick(rng, PLACES)}, and the answer was {rng.choice(['yes', 'no', 'perhaps'])}.")
    return f"{pick(rng, TIMES).capitalize()}, {pick(rng, WEATHER).lower()}."


def corpus(rng, nbytes):
    """Paragraphs of 3-8 sentences, blank-line separated, until nbytes."""
    paras, size = [], 0
    while size < nbytes:
        para = " ".join(sentence(rng) for _ in range(rng.randint(3, 8)))
        paras.append(para)
        size += len(para) + 2
    return "\n\n".join(paras) + "\n"


# ---- (b) tokenizer --------------------------------------------------------------------------------


def train_tokenizer(path_txt, out):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        min_frequency=2,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([path_txt], trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 2048,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return tok, bos, eos


# ---- (c) model ------------------------------------------------------------------------------------


def build_model(vocab, bos, eos, out):
    with open(SHAPE) as f:
        shape = json.load(f)
    shape.update(vocab_size=vocab, bos_token_id=bos, eos_token_id=eos, torch_dtype="bfloat16")
    cfg = LlamaConfig(**shape)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)  # transformers' init: N(0, initializer_range=0.02)
    n = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    return n


# ---- (d) data -------------------------------------------------------------------------------------


def rows(tok, paras, count):
    """{"text": ...} rows of whole paragraphs, closed once they reach ~ROW_TOKENS tokens."""
    out, cur, n = [], [], 0
    while len(out) < count:
        p = next(paras)
        cur.append(p)
        n += len(tok.encode(p, add_special_tokens=False).ids)
        if n >= ROW_TOKENS - 8:
            text = " ".join(cur)
            ids = tok.encode(text, add_special_tokens=False).ids[: ROW_TOKENS - 2]
            out.append({"text": tok.decode(ids)})
            cur, n = [], 0
    return out


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "quality"
    model_dir = os.path.join(out, "model")
    os.makedirs(model_dir, exist_ok=True)
    rng = random.Random(SEED)
    text = corpus(rng, CORPUS_BYTES)
    path_txt = os.path.join(out, "corpus.txt")
    with open(path_txt, "w") as f:
        f.write(text)
    tok, bos, eos = train_tokenizer(path_txt, model_dir)
    vocab = tok.get_vocab_size()
    n = build_model(vocab, bos, eos, model_dir)
    paras = iter(text.split("\n\n"))
    train = rows(tok, paras, TRAIN_ROWS)
    evals = rows(tok, paras, EVAL_ROWS)  # later paragraphs: disjoint from train
    for name, rs in (("train.jsonl", train), ("eval.jsonl", evals)):
        with open(os.path.join(out, name), "w") as f:
            for r in rs:
                f.write(json.dumps(r) + "\n")
    lens = [len(tok.encode(r["text"]).ids) for r in train]
    print(f"corpus {len(text)} bytes, vocab {vocab}, params {n / 1e6:.1f}M, "
          f"train {len(train)} rows (tokens {min(lens)}-{max(lens)}), eval {len(evals)} rows")


if __name__ == "__main__":
    main()
