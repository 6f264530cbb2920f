"""The Falcon fixture models as llama.cpp's own converter writes them (GGUF, `falcon` architecture).

Runs llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python 0.3.16 source package:
`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.16`, vendor/llama.cpp) on
tests/fixtures/falcon/<kind>/model, with two test-only adjustments that leave the tensors alone:
- our test tokenizer's pre-tokenizer hash is unknown to the converter; it is declared `gpt-2`
  (byte-level BPE, as FIELD-NOTES says);
- `mistral_common` (imported at the top, used only for Mistral models) is replaced by empty stubs
  when absent.
The converter writes `falcon.feed_forward_length` as 4 x hidden whatever `ffn_hidden_size` says, so
qtune sizes the MLP from the `ffn_up` tensor.

To keep fixtures small the GGUF itself is not committed: OUT.json records what a reader sees in it
(every tensor's type, shape and FNV-1a 64 hash of its bytes; the falcon.* metadata and the tokenizer
sizes), and qtune's own writer must reproduce it exactly.

Usage: python tests/reference/gen_falcon_gguf.py LLAMA_CPP_DIR KIND OUTTYPE OUT.json
Committed: tests/fixtures/falcon/gqa/llama_cpp_f16.json (`... gqa f16 <that path>`).
"""
import os
import sys
import tempfile
import types


def stub_mistral_common():
    try:
        import mistral_common  # noqa: F401
        return
    except ImportError:
        pass
    names = {
        "mistral_common": {},
        "mistral_common.tokens": {},
        "mistral_common.tokens.tokenizers": {},
        "mistral_common.tokens.tokenizers.base": {"TokenizerVersion": None},
        "mistral_common.tokens.tokenizers.multimodal": {"DATASET_MEAN": None, "DATASET_STD": None},
        "mistral_common.tokens.tokenizers.tekken": {"Tekkenizer": None},
        "mistral_common.tokens.tokenizers.sentencepiece": {"SentencePieceTokenizer": None},
        "mistral_common.tokens.tokenizers.mistral": {"MistralTokenizer": None},
        "mistral_common.tokens.tokenizers.utils": {},
    }
    for n, attrs in names.items():
        m = types.ModuleType(n)
        m.__dict__.update(attrs)
        sys.modules[n] = m


def fnv1a64(b):
    h = 0xcbf29ce484222325
    for x in b:
        h = ((h ^ x) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def summary(path):
    import numpy as np
    from gguf import GGUFReader
    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("falcon."):
            v = f.parts[f.data[0]]
            meta[k] = bytes(v).decode() if v.dtype == np.uint8 else v.tolist()[0]
    toks = r.fields["tokenizer.ggml.tokens"]
    merges = r.fields["tokenizer.ggml.merges"]
    eos = r.fields["tokenizer.ggml.eos_token_id"]
    tensors = {t.name: dict(type=t.tensor_type.name, shape=[int(x) for x in reversed(t.shape)],
                            fnv1a64=str(fnv1a64(np.asarray(t.data).tobytes()))) for t in r.tensors}
    return dict(metadata=meta, tokens=len(toks.data), merges=len(merges.data),
                eos_token_id=int(eos.parts[eos.data[0]][0]), tensors=tensors)


def main():
    llama_cpp, kind, outtype, out_json = sys.argv[1:5]
    out = tempfile.mktemp(suffix=".gguf")
    stub_mistral_common()
    sys.path.insert(0, llama_cpp)
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    import convert_hf_to_gguf as conv
    conv.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    src = os.path.join(os.path.dirname(__file__), "..", "fixtures", "falcon", kind, "model")
    sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", outtype, "--outfile", out]
    conv.main()
    import json
    with open(out_json, "w") as f:
        json.dump(summary(out), f, indent=1)
    os.remove(out)


if __name__ == "__main__":
    sys.exit(main())
