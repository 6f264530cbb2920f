#!/usr/bin/env bash
# Fetches llama.cpp's tokenizer test suite (models/ggml-vocab-*.gguf with their .inp/.out files,
# ~56 MB) from the llama-cpp-python 0.3.16 source package on PyPI into target/vocab-suite (or $1).
# tests/vocab_suite.rs reads it from $QTUNE_VOCAB_SUITE (default: target/vocab-suite). The files
# are llama.cpp's; they are never committed here.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST="${1:-target/vocab-suite}"
VERSION=0.3.16
SHA256=34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6
if ls "$DEST"/ggml-vocab-*.gguf.out >/dev/null 2>&1; then
    echo "vocab suite already in $DEST"
    exit 0
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
PY="${PYTHON:-python3}"
"$PY" -m venv "$TMP/venv"
"$TMP/venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$VERSION" -d "$TMP"
SDIST="$TMP/llama_cpp_python-$VERSION.tar.gz"
echo "$SHA256  $SDIST" | sha256sum -c -
mkdir -p "$DEST"
tar -xzf "$SDIST" -C "$TMP" --wildcards "llama_cpp_python-$VERSION/vendor/llama.cpp/models/ggml-vocab-*"
cp "$TMP/llama_cpp_python-$VERSION/vendor/llama.cpp/models/"ggml-vocab-* "$DEST/"
echo "vocab suite: $(ls "$DEST"/ggml-vocab-*.gguf | wc -l) vocabularies in $DEST"
