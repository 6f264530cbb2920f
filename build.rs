//! With `--features cuda`: compiles kernels/*.cu to PTX with nvcc into OUT_DIR, where src/cuda/
//! embeds it (`include_str!`). Without the feature it does nothing, so the default build needs no
//! CUDA at all.
//!
//! Why nvcc at build time and not NVRTC at run time: the `cuda` feature already needs nvcc to build
//! candle's own kernels (candle-kernels), so this adds no requirement, kernel errors surface at
//! `cargo build` rather than on a user's GPU, and the binary needs no libnvrtc at run time.
//! Why PTX for compute_80 and not cubins: one PTX runs on every GPU of compute capability 8.0 and
//! newer (the driver compiles it once and caches it); the PTX ISA of nvcc 13.0 (9.0) is what a
//! CUDA 13.0 driver (580) accepts. kernels/build.sh compiles the same sources to sm_80/86/89/90
//! cubins with warnings as errors (CI), which checks them with ptxas too.
use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 2] = ["dequant", "ops"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CUDA_HOME")
                .map(|h| PathBuf::from(h).join("bin/nvcc"))
                .filter(|p| p.exists())
        })
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for k in KERNELS {
        let src = format!("kernels/{k}.cu");
        let ptx = out.join(format!("{k}.ptx"));
        let status = Command::new(&nvcc)
            .args(["-std=c++17", "-O3", "--ptx", "-arch=compute_80", &src, "-o"])
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "--features cuda: cannot run {} ({e}); install a CUDA toolkit with nvcc (13.0 tried) \
                     or `pip install -r kernels/requirements-nvcc.txt`, and set NVCC or CUDA_HOME",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {src}");
    }
}
