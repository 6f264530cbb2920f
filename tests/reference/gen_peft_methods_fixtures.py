"""Reference fixtures for PEFT methods beyond LoRA (issue #17): DoRA, prompt tuning, prefix tuning, P-tuning.

PEFT 0.13.2 itself on the tiny GQA Llama (tests/fixtures/llama/model) and the tiny Falcon-7B-layout
model (tests/fixtures/falcon/mq/model), on bases f32 and the decoder-layer linears after Q8_0 / Q4_0
(gguf-py) and NF4 double-quant (bitsandbytes, one torch thread) quantise->dequantise, as
gen_llama_fixtures.py / gen_dpo_fixtures.py. For each method: the batch (ids, mask, labels: the
llama fixture's shape, right padding on row 1, prompt masked on row 0), 6 torch AdamW steps (betas
0.9/0.999, eps 1e-8, no weight decay) with the loss of each step's forward before its update, the
initial and final adapter as `save_pretrained` writes them, and the loss of the final adapter
reloaded with `PeftModel.from_pretrained`.

Methods (N = 4 virtual tokens):
- dora: LoraConfig(use_dora=True) r4 alpha8 on every linear; our own init: PEFT's A, a non-zero B
  and a PERTURBED lora_magnitude_vector (PEFT's own init magnitude x (1 + 0.2 N(0,1))); also the
  magnitude PEFT computed at init (row norms of the dequantised weight) and merge_and_unload's
  weights of layer 0 for the init adapter.
- prompt: PromptTuningConfig RANDOM init (PEFT: nn.Embedding's N(0,1)); prompt_text: TEXT init
  (records the init only, and trains it too).
- prefix: PrefixTuningConfig(prefix_projection=False); prefix_proj: prefix_projection=True,
  encoder_hidden_size 32 (encoder state init/final recorded).
- ptuning: PromptEncoderConfig MLP, encoder_hidden_size 32 (encoder state init/final recorded).
Prompt-learning methods train at lr 1e-1 (their loss moves by ~5e-4 in 6 steps at 1e-2 and less
at LoRA-like rates); DoRA at 1e-2.
Where PEFT cannot run a method on a model, the error is recorded in expected.json instead.

Run: python tests/reference/gen_peft_methods_fixtures.py [ARCH..]  (pinned stack in requirements.txt)
"""
import json
import os
import sys
import traceback

import numpy as np
import torch
from safetensors.torch import save_file

import transformers
import peft
from transformers import AutoModelForCausalLM
from peft import (LoraConfig, PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig,
                  get_peft_model)

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "fixtures")
OUT = os.path.join(FIX, "peft_methods")
SEED = 1717
STEPS = 6
N_VIRTUAL = 4
LR = {"dora": 1e-2, "prompt": 1e-1, "prompt_text": 1e-1, "prefix": 1e-1, "prefix_proj": 1e-2, "ptuning": 1e-2}
METHODS = list(LR)
PROMPT_INIT_TEXT = "qtune trains adapters"

ARCHS = {
    "llama": dict(model_dir=os.path.join(FIX, "llama", "model"), scope=".layers.", vocab=300, first_id=3,
                  targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                  layer0="base_model.model.model.layers.0.", tags=["f32", "q8_0", "q4_0", "nf4"]),
    "falcon": dict(model_dir=os.path.join(FIX, "falcon", "mq", "model"), scope=".h.", vocab=300, first_id=1,
                   targets=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
                   layer0="base_model.model.transformer.h.0.", tags=["f32", "q8_0", "q4_0", "nf4"]),
}


# ---------------------------------------------------------------- bases (as gen_dpo_fixtures.py)
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


def base(arch, tag):
    a = ARCHS[arch]
    model = AutoModelForCausalLM.from_pretrained(a["model_dir"], torch_dtype=torch.float32)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and a["scope"] in name and TRANSFORMS[tag] is not None:
                mod.weight.copy_(TRANSFORMS[tag](mod.weight))
    return model


def batch(arch):
    g = torch.Generator().manual_seed(SEED + 1)
    a = ARCHS[arch]
    ids = torch.randint(a["first_id"], a["vocab"], (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on the second row
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :3] = -100  # prompt tokens excluded from the loss
    return ids, mask, labels


# ---------------------------------------------------------------- methods
def config(arch, method):
    if method == "dora":
        return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", use_dora=True,
                          target_modules=ARCHS[arch]["targets"], task_type="CAUSAL_LM")
    if method == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="RANDOM")
    if method == "prompt_text":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=PROMPT_INIT_TEXT,
                                  tokenizer_name_or_path=ARCHS[arch]["model_dir"])
    if method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prefix_projection=False)
    if method == "prefix_proj":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL, prefix_projection=True,
                                  encoder_hidden_size=32)
    if method == "ptuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL,
                                   encoder_reparameterization_type="MLP", encoder_hidden_size=32)
    raise ValueError(method)


def build(arch, method, tag, extra):
    """PEFT model on the tag's base with the method's init (seeded; DoRA: our own non-zero init)."""
    model = base(arch, tag)
    torch.manual_seed(SEED)
    pm = get_peft_model(model, config(arch, method))
    if method == "dora":
        mags = {n: p.detach().clone().contiguous() for n, p in pm.named_parameters() if "lora_magnitude_vector" in n}
        extra["magnitude_peft_init"] = mags
        g = torch.Generator().manual_seed(SEED + 3)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                elif "lora_magnitude_vector" in n:
                    p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return pm


def encoder_state(pm):
    enc = pm.prompt_encoder["default"]
    return {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}


def loss_of(pm, ids, mask, labels):
    return pm(input_ids=ids, attention_mask=mask, labels=labels).loss


def position_checks(arch, method, pm, ids, mask):
    """Compare PEFT's logits with the base model run by hand at explicit rotary positions."""
    out = {}
    with torch.no_grad():
        want = pm(input_ids=ids, attention_mask=mask).logits
        bm = pm.base_model
        n, t = N_VIRTUAL, ids.shape[1]
        full_mask = torch.cat([torch.ones(ids.shape[0], n, dtype=mask.dtype), mask], 1)
        if method in ("prompt", "prompt_text", "ptuning"):
            emb = torch.cat([pm.get_prompt(ids.shape[0]), pm.word_embeddings(ids)], 1)
            pos = torch.arange(n + t)[None].expand(ids.shape[0], -1)
            got = bm(inputs_embeds=emb, attention_mask=full_mask, position_ids=pos).logits
            out["logits_vs_positions_0_to_N+T-1_max_abs_diff"] = (got - want).abs().max().item()
            out["peft_logits_shape"] = list(want.shape)
            assert want.shape[1] == n + t
        elif method in ("prefix", "prefix_proj"):
            for name, start in [("N_to_N+T-1", n), ("0_to_T-1", 0)]:
                pos = torch.arange(start, start + t)[None].expand(ids.shape[0], -1)
                got = bm(input_ids=ids, attention_mask=full_mask, past_key_values=pm.get_prompt(ids.shape[0]),
                         position_ids=pos).logits
                out[f"logits_vs_positions_{name}_max_abs_diff"] = (got - want).abs().max().item()
            pkv = pm.get_prompt(1)
            out["past_key_values_per_layer_shape"] = list(pkv[0][0].shape) if isinstance(pkv, (tuple, list)) \
                else list(pkv.key_cache[0].shape)
            out["peft_logits_shape"] = list(want.shape)
    return out


def run(arch, method, tag):
    d = os.path.join(OUT, arch, method, tag)
    os.makedirs(d, exist_ok=True)
    ids, mask, labels = batch(arch)
    meta = dict(arch=arch, method=method, base=tag, lr=LR[method], steps=STEPS, num_virtual_tokens=N_VIRTUAL,
                input_ids=ids.tolist(), attention_mask=mask.tolist(), labels=labels.tolist(),
                optimizer=dict(name="torch.optim.AdamW", betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0),
                versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__))
    extra = {}
    try:
        pm = build(arch, method, tag, extra)
        pm.train()
        pm.save_pretrained(os.path.join(d, "adapter_init"))
        if "magnitude_peft_init" in extra:
            save_file(extra["magnitude_peft_init"], os.path.join(d, "magnitude_peft_init.safetensors"))
        has_encoder = method in ("ptuning", "prefix_proj")
        if has_encoder:
            save_file(encoder_state(pm), os.path.join(d, "encoder_init.safetensors"))
        meta["peft_config"] = pm.peft_config["default"].to_dict()
        if method == "prompt_text":
            from transformers import AutoTokenizer
            tids = AutoTokenizer.from_pretrained(ARCHS[arch]["model_dir"])(PROMPT_INIT_TEXT)["input_ids"]
            reps = (tids * N_VIRTUAL)[:N_VIRTUAL]
            meta["init_text"] = PROMPT_INIT_TEXT
            meta["init_text_ids"] = tids
            meta["init_rows_are_embeddings_of"] = reps
            emb = pm.word_embeddings.weight[torch.tensor(reps)]
            meta["checks_init_text_max_abs_diff"] = (pm.prompt_encoder["default"].embedding.weight - emb).abs().max().item()
        meta["checks"] = position_checks(arch, method, pm, ids, mask)
        if method == "dora":
            meta["dora_negative_control"] = dora_negative_control(pm, ids, mask, labels)
            if tag == "f32":
                merged(arch, pm, d)
        params = [p for p in pm.parameters() if p.requires_grad]
        meta["trainable"] = [n for n, p in pm.named_parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR[method], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        losses = []
        for _ in range(STEPS):
            opt.zero_grad()
            l = loss_of(pm, ids, mask, labels)
            losses.append(l.item())
            l.backward()
            opt.step()
        with torch.no_grad():
            meta["loss_after"] = loss_of(pm, ids, mask, labels).item()
        meta["losses"] = losses
        pm.save_pretrained(os.path.join(d, "adapter_final"))
        if has_encoder:
            save_file(encoder_state(pm), os.path.join(d, "encoder_final.safetensors"))
        # The saved final adapter, reloaded as users load it (prompt learning loads for inference only).
        rm = PeftModel.from_pretrained(base(arch, tag), os.path.join(d, "adapter_final"))
        rm.eval()
        with torch.no_grad():
            meta["reloaded_loss"] = loss_of(rm, ids, mask, labels).item()
        if method != "dora":
            try:
                PeftModel.from_pretrained(base(arch, tag), os.path.join(d, "adapter_final"), is_trainable=True)
                meta["is_trainable_reload"] = "accepted"
            except Exception as e:  # noqa: BLE001 (recorded as PEFT's answer)
                meta["is_trainable_reload"] = f"{type(e).__name__}: {e}"
        print(arch, method, tag, "losses", [round(x, 6) for x in losses], "reloaded", meta["reloaded_loss"])
    except Exception as e:  # noqa: BLE001 (PEFT refusing a method on a model is a result)
        meta["error"] = f"{type(e).__name__}: {e}"
        meta["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        print(arch, method, tag, "ERROR", meta["error"])
        # Nothing of a run PEFT cannot do is kept but the record of why (peft_config shows its choice).
        for f in ["adapter_init", "encoder_init.safetensors", "magnitude_peft_init.safetensors"]:
            p = os.path.join(d, f)
            if os.path.isdir(p):
                import shutil
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(meta, f, indent=1, default=lambda o: sorted(o) if isinstance(o, set) else str(o))


def dora_negative_control(pm, ids, mask, labels):
    """The init loss with the stored magnitude, and what it would be if a loader recomputed the
    magnitude (||W|| or ||W + s·B·A||) instead of using the stored one: all three must differ."""
    out = {}
    with torch.no_grad():
        out["loss_stored_magnitude"] = loss_of(pm, ids, mask, labels).item()
        saved = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_magnitude_vector" in n}
        for name, with_ba in [("loss_if_magnitude_is_norm_W", False), ("loss_if_magnitude_is_norm_W_plus_sBA", True)]:
            for mname, mod in pm.named_modules():
                if hasattr(mod, "lora_magnitude_vector") and "default" in getattr(mod, "lora_magnitude_vector", {}):
                    w = mod.get_base_layer().weight
                    s = mod.scaling["default"]
                    ba = mod.lora_B["default"].weight @ mod.lora_A["default"].weight
                    m = torch.linalg.norm(w + s * ba if with_ba else w, dim=1)
                    mod.lora_magnitude_vector["default"].weight.copy_(m)
            out[name] = loss_of(pm, ids, mask, labels).item()
        for n, p in pm.named_parameters():
            if n in saved:
                p.copy_(saved[n])
        assert loss_of(pm, ids, mask, labels).item() == out["loss_stored_magnitude"]
    return out


def merged(arch, pm, d):
    """merge_and_unload's weights of layer 0 for the init DoRA adapter (a reloaded copy is merged)."""
    rm = PeftModel.from_pretrained(base(arch, "f32"), os.path.join(d, "adapter_init"))
    m = rm.merge_and_unload()
    prefix = ARCHS[arch]["layer0"].replace("base_model.model.", "")
    out = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()
           if k.startswith(prefix) and k.endswith(".weight") and any(t in k for t in ARCHS[arch]["targets"])}
    save_file(out, os.path.join(d, "merged_layer0.safetensors"))


def main():
    archs = [a for a in sys.argv[1:] if a in ARCHS] or list(ARCHS)
    methods = [m for m in sys.argv[1:] if m in METHODS] or METHODS
    for arch in archs:
        for method in methods:
            for tag in ARCHS[arch]["tags"]:
                run(arch, method, tag)


if __name__ == "__main__":
    # PEFT keeps target_modules as a set and writes it in hash order: fix the hash seed so that
    # adapter_config.json is the same on every run (the tensors do not depend on it).
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    sys.exit(main())
