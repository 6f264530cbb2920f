"""Reference fixtures for DPO (issue #16): TRL 0.12.2's DPOTrainer on tiny random models with PEFT LoRA.

Ground truth is TRL itself: `DPOTrainer` with a PEFT LoRA model whose B is non-zero, `ref_model=None`
(the reference is the base with the adapter disabled, TRL's `null_ref_context`), `loss_type="sigmoid"`,
beta 0.1, batch 1, dropout 0, no clipping (`max_grad_norm=0`), a sequential sampler, torch AdamW
(betas 0.9/0.999, eps 1e-8, weight decay 0) at a constant lr, 6 steps. Only two things are changed
by subclassing, both recorded:
- `tokenize_row` keeps the prompt's special tokens (qtune's convention: the prompt encoded with the
  tokenizer's special tokens, i.e. BOS where the tokenizer adds one; each completion without special
  tokens plus EOS; prompt and completions tokenised separately and concatenated). TRL 0.12.2's own
  `tokenize_row` encodes the prompt with `add_special_tokens=False` (no BOS).
- `get_batch_loss_metrics` / `compute_ref_log_probs` are wrapped to read the UNROUNDED loss and
  metrics of each step's forward (before its update); TRL's log rounds them to 4 decimals.
Beside TRL, every step's policy and reference log-prob sums are recomputed directly with
transformers (sum of log_softmax over the completion tokens incl. EOS) as a cross-check.

Models: the tiny GQA Llama of tests/fixtures/llama/model (weights unchanged) with a copy of its
tokenizer that adds BOS (`<s> $A`, as Llama-2's does) and qtune's built-in ChatML template, written to
tests/fixtures/dpo/llama/model; the tiny Falcon-7B-layout model of tests/fixtures/falcon/mq/model (its
tokenizer adds no BOS, as Falcon's does not). Bases: f32, and the decoder-layer linears after Q8_0 /
Q4_0 (gguf-py) and NF4 double-quant (bitsandbytes, one torch thread) quantise->dequantise, so qtune's
quantised base is compared with TRL running on exactly the weights qtune sees.

Run: python tests/reference/gen_dpo_fixtures.py  (pinned stack in requirements.txt + requirements-trl.txt)
"""
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import SequentialSampler

import datasets
import transformers
import peft
import trl
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, processors
from trl import DPOConfig, DPOTrainer
from trl.data_utils import maybe_apply_chat_template, maybe_extract_prompt

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
OUT = os.path.join(FIX, "dpo")
SEED = 1606
BETA = 0.1
LR = 1e-2
STEPS = 6
B_SCALE = 0.1

# qtune's built-in "chatml" template (src/data/template.rs), as the model's own chat_template.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")

ARCHS = {
    "llama": dict(src=os.path.join(FIX, "llama", "model"), scope=".layers.",
                  targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  tags=["f32", "q8_0", "q4_0", "nf4"]),
    "falcon": dict(src=os.path.join(FIX, "falcon", "mq", "model"), scope=".h.",
                   targets=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                   tags=["f32", "q8_0", "q4_0", "nf4"]),
}

PAIRS = [
    {"prompt": "the quick brown fox", "chosen": " jumps over the lazy dog", "rejected": " sleeps"},
    {"prompt": "qtune trains adapters", "chosen": " on quantised weights", "rejected": " on a dog"},
    {"prompt": "hello world,", "chosen": " this is qtune", "rejected": " this is a fox that jumps"},
    {"prompt": "a small model", "chosen": " for a quantised test", "rejected": " for the lazy dog"},
    {"prompt": "the lazy dog", "chosen": " sleeps while the quick fox runs", "rejected": " trains adapters"},
    {"prompt": "weights stay quantised,", "chosen": " adapters train", "rejected": " weights train"},
    {"prompt": "hello", "chosen": " world", "rejected": " quantised world"},
    {"prompt": "the quick", "chosen": " brown fox", "rejected": " test"},
]
CHAT_PAIRS = [
    {"prompt": [{"role": "user", "content": "what does qtune train?"}],
     "chosen": [{"role": "assistant", "content": "adapters on quantised weights"}],
     "rejected": [{"role": "assistant", "content": "a lazy dog"}]},
    {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
     "chosen": [{"role": "assistant", "content": "hello world"}],
     "rejected": [{"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}]},
    {"prompt": [{"role": "user", "content": "what jumps?"}],
     "chosen": [{"role": "assistant", "content": "the quick brown fox"}],
     "rejected": [{"role": "assistant", "content": "the weights"}]},
    {"prompt": [{"role": "user", "content": "a small model?"}],
     "chosen": [{"role": "assistant", "content": "for a quantised test"}],
     "rejected": [{"role": "assistant", "content": "no"}]},
    {"prompt": [{"role": "user", "content": "who sleeps?"}],
     "chosen": [{"role": "assistant", "content": "the lazy dog"}],
     "rejected": [{"role": "assistant", "content": "qtune"}]},
    {"prompt": [{"role": "user", "content": "say hello"}],
     "chosen": [{"role": "assistant", "content": "hello world, this is qtune"}],
     "rejected": [{"role": "assistant", "content": "world"}]},
]


# ---------------------------------------------------------------- bases (as gen_llama_fixtures.py)
def q8_0_roundtrip(w):
    import gguf
    from gguf import quants
    q = quants.quantize(w.detach().numpy().astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).astype(np.float32))


def q4_0_roundtrip(w):
    import gguf
    from gguf import quants
    q = quants.quantize(w.detach().numpy().astype(np.float32), gguf.GGMLQuantizationType.Q4_0)
    return torch.from_numpy(quants.dequantize(q, gguf.GGMLQuantizationType.Q4_0).astype(np.float32))


def nf4_roundtrip(w):
    import bitsandbytes.functional as bf
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # bnb's double-quant offset (a mean) sums in a thread-dependent order
    try:
        q, st = bf.quantize_4bit(w.detach().contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
        return bf.dequantize_4bit(q, st, blocksize=64, quant_type="nf4").to(torch.float32)
    finally:
        torch.set_num_threads(n)


TRANSFORMS = {"f32": None, "q8_0": q8_0_roundtrip, "q4_0": q4_0_roundtrip, "nf4": nf4_roundtrip}


def fingerprint(w):
    """As gen_falcon_fixtures.py: sum(w[i] * (1 + i mod 7)) in f64 and the first 16 values."""
    a = w.detach().numpy().astype(np.float32).reshape(-1).astype(np.float64)
    k = 1.0 + (np.arange(a.size) % 7)
    return dict(weighted_sum=float((a * k).sum()), head=[float(x) for x in a[:16]])


def base(arch, tag):
    """The model on the tag's base: decoder-layer linears quantised->dequantised, the rest as stored."""
    a = ARCHS[arch]
    model = AutoModelForCausalLM.from_pretrained(a["src"], torch_dtype=torch.float32)
    state, prints = {}, {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and a["scope"] in name:
                if TRANSFORMS[tag] is not None:
                    mod.weight.copy_(TRANSFORMS[tag](mod.weight))
                prints[name + ".weight"] = fingerprint(mod.weight)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return model, state, prints


def lora_config(arch):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=ARCHS[arch]["targets"],
                      task_type="CAUSAL_LM")


def init_adapter(arch, d):
    """The initial adapter: PEFT's A (kaiming, seeded) and a non-zero B, saved as a PEFT directory."""
    model, _, _ = base(arch, "f32")
    torch.manual_seed(SEED)
    pm = get_peft_model(model, lora_config(arch))
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * B_SCALE)
    pm.save_pretrained(d)


# ---------------------------------------------------------------- tokenizers
def llama_model_dir():
    """tests/fixtures/dpo/llama/model: the tiny Llama's files, its tokenizer adding BOS, ChatML template."""
    src, d = ARCHS["llama"]["src"], os.path.join(OUT, "llama", "model")
    os.makedirs(d, exist_ok=True)
    for f in ["config.json", "generation_config.json", "model.safetensors"]:
        shutil.copyfile(os.path.join(src, f), os.path.join(d, f))
    tok = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHATML
    fast.save_pretrained(d)
    ARCHS["llama"]["model_dir"] = d


ARCHS["falcon"]["model_dir"] = ARCHS["falcon"]["src"]


def tokenizer(arch):
    tok = AutoTokenizer.from_pretrained(ARCHS[arch]["model_dir"])
    return tok


# ---------------------------------------------------------------- TRL, instrumented
def logps_direct(model, prompt, completion):
    """Sum over the completion tokens (incl. EOS) of log_softmax(logits) at the next token."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, :-1].float()
    lp = logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1:].sum().item()


class RecordingDPOTrainer(DPOTrainer):
    """DPOTrainer with qtune's tokenisation, a sequential sampler and unrounded per-step records."""

    @staticmethod
    def tokenize_row(features, processing_class, max_prompt_length, max_completion_length, add_special_tokens):
        tok = processing_class
        prompt = tok(features["prompt"], add_special_tokens=True)["input_ids"]  # keeps BOS where it adds one
        chosen = tok(features["chosen"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rejected = tok(features["rejected"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return {"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected}

    def _get_train_sampler(self):
        return SequentialSampler(self.train_dataset)

    def compute_ref_log_probs(self, batch):
        c, r = super().compute_ref_log_probs(batch)
        self._ref = (c.detach().double().mean().item(), r.detach().double().mean().item())
        return c, r

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        loss, metrics = super().get_batch_loss_metrics(model, batch, train_eval)
        rec = {"loss": loss.detach().item()}
        rec.update({k: float(v) for k, v in metrics.items()})
        rec["ref_logps/chosen"], rec["ref_logps/rejected"] = self._ref
        # The batch's own ids (batch 1: no padding inside prompt/chosen/rejected themselves).
        p = batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()].tolist()
        c = batch["chosen_input_ids"][0][batch["chosen_attention_mask"][0].bool()].tolist()
        r = batch["rejected_input_ids"][0][batch["rejected_attention_mask"][0].bool()].tolist()
        rec["ids"] = dict(prompt=p, chosen=c, rejected=r)
        with torch.no_grad():
            m = self.accelerator.unwrap_model(model)
            d = dict(policy_chosen=logps_direct(m, p, c), policy_rejected=logps_direct(m, p, r))
            with m.disable_adapter():
                d["ref_chosen"], d["ref_rejected"] = logps_direct(m, p, c), logps_direct(m, p, r)
        margin = (d["policy_chosen"] - d["ref_chosen"]) - (d["policy_rejected"] - d["ref_rejected"])
        d["loss"] = -F.logsigmoid(torch.tensor(BETA * margin, dtype=torch.float64)).item()
        rec["direct"] = d
        self.records.append(rec)
        return loss, metrics


def dpo_args(tmp, steps, eos):
    return DPOConfig(
        output_dir=tmp, per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0,
        optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        beta=BETA, loss_type="sigmoid", label_smoothing=0.0, padding_value=eos, disable_dropout=True,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        seed=SEED, bf16=False, fp16=False, precompute_ref_log_probs=False)


def trainer(pm, tok, rows, steps, tmp):
    t = RecordingDPOTrainer(model=pm, ref_model=None, args=dpo_args(tmp, steps, tok.eos_token_id),
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    t.records = []
    return t


def tokenised(t):
    ds = t.train_dataset
    out = []
    for i in range(len(ds)):
        # TRL 0.12.2's own tokenize_row on the same texts, for contrast (its prompt has no BOS).
        trl_own = DPOTrainer.tokenize_row({k: ds[i][k] for k in ("prompt", "chosen", "rejected")},
                                          t.processing_class, None, None, False)
        out.append(dict(prompt_text=ds[i]["prompt"], chosen_text=ds[i]["chosen"], rejected_text=ds[i]["rejected"],
                        prompt_ids=ds[i]["prompt_input_ids"], chosen_ids=ds[i]["chosen_input_ids"],
                        rejected_ids=ds[i]["rejected_input_ids"], trl_default_prompt_ids=trl_own["prompt_input_ids"]))
    return out


def final_losses(arch, tag, adapter_dir, tok, rows):
    """The saved final adapter, reloaded with PeftModel.from_pretrained, through TRL's own loss per pair."""
    model, _, _ = base(arch, tag)
    pm = PeftModel.from_pretrained(model, adapter_dir)
    pm.eval()
    with tempfile.TemporaryDirectory() as tmp:
        t = trainer(pm, tok, rows, 1, tmp)
        with torch.no_grad():
            for b in t.get_train_dataloader():
                t.get_batch_loss_metrics(pm, b, "train")
    return t.records


def run(arch, tag, rows, data_name, steps, d):
    tok = tokenizer(arch)
    model, state, prints = base(arch, tag)
    pm = PeftModel.from_pretrained(model, os.path.join(OUT, arch, "adapter_init"), is_trainable=True)
    os.makedirs(d, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = trainer(pm, tok, rows, steps, tmp)
        toks = tokenised(t)
        t.train()
    assert len(t.records) == steps, len(t.records)
    pm.save_pretrained(os.path.join(d, "adapter_final"))
    fin = final_losses(arch, tag, os.path.join(d, "adapter_final"), tok, rows)
    meta = dict(data=data_name, arch=arch, base=tag, beta=BETA, lr=LR, steps=steps, loss_type="sigmoid",
                batch_size=1, lora=dict(r=4, alpha=8, dropout=0.0, targets=ARCHS[arch]["targets"]),
                optimizer=dict(name="torch.optim.AdamW", betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0),
                adapter_init=f"../adapter_init", adapter_final="adapter_final",
                pairs=toks, steps_record=t.records, final=fin,
                final_mean_loss=float(np.mean([r["loss"] for r in fin])),
                versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                              peft=peft.__version__, trl=trl.__version__, datasets=datasets.__version__))
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if arch == "falcon":
        with open(os.path.join(d, "base_check.json"), "w") as f:
            json.dump(prints, f, indent=1)
    print(arch, tag, data_name, "losses", [round(r["loss"], 6) for r in t.records],
          "final", meta["final_mean_loss"])
    return state


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main():
    torch.manual_seed(SEED)
    os.makedirs(OUT, exist_ok=True)
    write_jsonl(os.path.join(OUT, "pairs.jsonl"), PAIRS)
    write_jsonl(os.path.join(OUT, "pairs_chat.jsonl"), CHAT_PAIRS)
    llama_model_dir()
    # What TRL's maybe_extract_prompt + maybe_apply_chat_template make of the conversational file.
    tok = tokenizer("llama")
    rendered = [maybe_apply_chat_template(maybe_extract_prompt(r), tok) for r in CHAT_PAIRS]
    with open(os.path.join(OUT, "pairs_chat_rendered.json"), "w") as f:
        json.dump(rendered, f, indent=1)
    archs = sys.argv[1:] or list(ARCHS)
    for arch in archs:
        init_adapter(arch, os.path.join(OUT, arch, "adapter_init"))
        for tag in ARCHS[arch]["tags"]:
            state = run(arch, tag, PAIRS, "pairs.jsonl", STEPS, os.path.join(OUT, arch, tag))
            if arch == "llama":
                check_base(tag, state)
        if arch == "llama":
            run(arch, "f32", CHAT_PAIRS, "pairs_chat.jsonl", STEPS, os.path.join(OUT, arch, "f32_chat"))


def check_base(tag, state):
    """The llama bases are those of tests/fixtures/llama/<tag>/base_dequantized.safetensors (written
    there for Q4_0, which gen_llama_fixtures.py does not make); any difference is an error."""
    from safetensors.torch import load_file
    p = os.path.join(FIX, "llama", tag, "base_dequantized.safetensors")
    if not os.path.exists(p):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        save_file(state, p)
        print("wrote", p)
        return
    old = load_file(p)
    assert old.keys() == state.keys()
    bad = [k for k in old if not torch.equal(old[k], state[k])]
    assert not bad, f"{tag}: base differs from {p}: {bad[:4]}"


if __name__ == "__main__":
    # PEFT keeps target_modules as a set and writes it in hash order: fix the hash seed so that
    # adapter_config.json is the same on every run (the tensors do not depend on it).
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    sys.exit(main())
