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

Usage: python tests/reference/gen_falcon_gguf.py LLAMA_CPP_DIR KIND OUTTYPE OUT.gguf
Committed: tests/fixtures/falcon/gqa/model-f16.gguf = `... gqa f16 tests/fixtures/falcon/gqa/model-f16.gguf`.
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


def main():
    llama_cpp, kind, outtype, out = sys.argv[1:5]
    stub_mistral_common()
    sys.path.insert(0, llama_cpp)
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    import convert_hf_to_gguf as conv
    conv.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    src = os.path.join(os.path.dirname(__file__), "..", "fixtures", "falcon", kind, "model")
    sys.argv = ["convert_hf_to_gguf.py", src, "--outtype", outtype, "--outfile", out]
    conv.main()


if __name__ == "__main__":
    sys.exit(main())
