"""The Llama-family fixture models as llama.cpp's own converter writes them (f32 GGUF): Llama 3.1
(`rope_freqs.weight` from its rope_scaling), Qwen2 (architecture `qwen2`, biases) and the tied model.

Runs llama.cpp's convert_hf_to_gguf.py (llama-cpp-python 0.3.16 source package, vendor/llama.cpp) on
tests/fixtures/families/<family>/model with gen_falcon_gguf.py's two test-only adjustments (the test
tokenizer is declared `gpt-2`; `mistral_common` stubbed when absent); the tensors are untouched.

Usage: python tests/reference/gen_families_gguf.py LLAMA_CPP_DIR
Writes tests/fixtures/families/<family>/llama_cpp_f32.gguf (about 200 KB each).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_falcon_gguf import stub_mistral_common  # noqa: E402

FAMILIES = ["llama3", "qwen2", "tied"]


def main():
    llama_cpp = sys.argv[1]
    stub_mistral_common()
    sys.path.insert(0, llama_cpp)
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    import convert_hf_to_gguf as conv
    conv.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    for fam in FAMILIES:
        d = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "families", fam)
        sys.argv = ["convert_hf_to_gguf.py", os.path.join(d, "model"), "--outtype", "f32",
                    "--outfile", os.path.join(d, "llama_cpp_f32.gguf")]
        conv.main()


if __name__ == "__main__":
    sys.exit(main())
