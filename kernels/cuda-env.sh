# Source this (bash) to build qtune with `--features cuda` on a machine with no CUDA toolkit and
# no GPU, from PyPI wheels alone:   source kernels/cuda-env.sh
#
# It makes target/cuda-venv (nvcc 13.0 and the CUDA 13.0 cuBLAS, cuRAND, NVRTC and runtime
# libraries that candle's cudarc links against) and target/cuda-lib (the unversioned .so names the
# linker wants, plus a stub libcuda.so: the real one comes with the NVIDIA driver and is found at
# run time on the GPU machine), then exports NVCC, CUDA_HOME, CUDA_COMPUTE_CAP, PATH and
# LIBRARY_PATH. `cargo check --features cuda` needs only the nvcc part; linking needs all of it.
#
# The stub: kernels/cuda-stub-symbols.txt lists the driver API functions cudarc 0.19 references
# (`nm -u --format=just-symbols target/release/deps/libcudarc-*.rlib | grep '^cu[A-Z]' | sort -u`);
# each becomes a function returning CUDA_ERROR_NO_DEVICE (100) in a library whose SONAME is
# libcuda.so.1, so a binary records the dependency that the NVIDIA driver satisfies at run time.
# The stub is never on a run-time search path (its file name is libcuda.so, the loader looks for
# libcuda.so.1): a binary started without a driver fails to load instead of calling it. Copied as
# libcuda.so.1 onto LD_LIBRARY_PATH, it lets a CUDA build run its CPU paths on a machine with no
# GPU, every driver call answering "no CUDA-capable device" (docs/BENCHMARKS.md).
_qt_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_qt_venv="$_qt_root/target/cuda-venv"
_qt_lib="$_qt_root/target/cuda-lib"
if [ ! -x "$_qt_venv/bin/python" ]; then
    python3 -m venv "$_qt_venv"
    "$_qt_venv/bin/pip" install -q -r "$_qt_root/kernels/requirements-nvcc.txt" \
        "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88"
fi
_qt_cu="$("$_qt_venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
mkdir -p "$_qt_lib"
for _qt_so in "$_qt_cu"/lib/lib*.so.*; do
    _qt_base="$(basename "$_qt_so")"
    ln -sf "$_qt_so" "$_qt_lib/${_qt_base%%.so.*}.so"
done
if [ -s "$_qt_root/kernels/cuda-stub-symbols.txt" ]; then
    sed 's/.*/int &(void) { return 100; }/' "$_qt_root/kernels/cuda-stub-symbols.txt" >"$_qt_lib/cuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_qt_lib/libcuda.so" "$_qt_lib/cuda_stub.c"
fi
export CUDA_HOME="$_qt_cu" CUDA_PATH="$_qt_cu" CUDA_ROOT="$_qt_cu"
export NVCC="$_qt_cu/bin/nvcc" PATH="$_qt_cu/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export LIBRARY_PATH="$_qt_lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
unset _qt_root _qt_venv _qt_lib _qt_cu _qt_so _qt_base
