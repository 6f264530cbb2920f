//! What a bench measures of the process and the machine: FLOPs of a step, RSS and CPU time from
//! `/proc`, the allocator's tuning, and the dense GEMM peak MFU refers to.

use crate::models::LlamaConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// FLOPs of one training step: 6 per linear weight per token (forward, checkpoint recompute and
/// input gradient; the frozen base has no weight gradient) plus PaLM's attention term
/// 12·L·H·D·T per token (QKᵀ and A·V, forward and backward).
pub fn step_flops(cfg: &LlamaConfig, linear_params: usize, tokens: usize, seq: usize) -> f64 {
    let attn = 12.0 * (cfg.num_layers * cfg.num_heads * cfg.head_dim * seq) as f64;
    (6.0 * linear_params as f64 + attn) * tokens as f64
}

/// Value of a `/proc/self/status` line in bytes (0 where there is none, e.g. off Linux).
pub fn status_bytes(key: &str) -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system, all threads) this process has used, in seconds (0 off Linux).
/// `/proc/self/stat` counts in USER_HZ ticks, 100 per second on Linux.
pub fn process_cpu_s() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.get(s.rfind(')')? + 2..)?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let tick = |i: usize| f.get(i)?.parse::<f64>().ok();
            Some((tick(11)? + tick(12)?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// Resets VmHWM to the current RSS (Linux `clear_refs` 5); false where unsupported.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Limits glibc to one malloc arena, serves every block below 32 MiB from it, and leaves giving
/// memory back to the step's own trims. Tensors are freed on other threads than the ones that
/// made them (rayon workers), and per-thread arenas each keep their own freed memory: with one
/// arena the peak RSS of the 100M-shape bf16 step is 10 % lower (−6 % against the plan instead of
/// +4 %) at the same speed. Pinning the mmap threshold low (MALLOC_MMAP_THRESHOLD_=65536) makes
/// RSS follow the live bytes exactly, but every large tensor then costs fresh pages (faults,
/// zeroing, munmap's TLB shootdowns): 1.8x slower at the 100M shape, 1.4x at 7B. glibc's dynamic
/// threshold settles near a step's largest tensor, but its trim threshold (twice that) hands the
/// top of the heap back whenever a free leaves that much there, and the next tensor faults those
/// pages in again: at Llama-2-7B ~15 % of a bf16 step's samples were page faults, unmaps and
/// their TLB shootdowns. So the mmap threshold is pinned at glibc's largest (32 MiB) and the
/// automatic trim is as good as off (1 GiB): freed memory goes back where the step says
/// (`models::step`'s `malloc_trim` between its phases), which is what the plan counts. Measured
/// (session 21): Llama-2-7B Q4_0 bf16 step 1.06-1.14x, Falcon-7B 1.03-1.05x, peaks within 0.8 %
/// of the plan as before; the ~100M shape the same speed, its peak 1-5 MiB higher. Thresholds set
/// through glibc's environment (`MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`) are left as they are.
/// Call before the first tensor exists; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // Thresholds the user set (glibc's environment variables) win over ours.
        let env = |k: &str| std::env::var_os(k).is_some();
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let user = env("MALLOC_MMAP_THRESHOLD_") || env("MALLOC_TRIM_THRESHOLD_");
        let own = !(user || tunables.contains("threshold"));
        // SAFETY: glibc's mallopt only changes allocator tuning.
        unsafe {
            mallopt(M_ARENA_MAX, 1);
            if own {
                // glibc's ceiling for the threshold on 64-bit (HEAP_MAX_SIZE / 2)
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
                mallopt(M_TRIM_THRESHOLD, 1 << 30);
            }
        }
    }
}

/// Best rate (GFLOP/s) of a few 1536³ f32 GEMMs on all threads: the dense ceiling MFU refers to.
pub fn measure_f32_peak() -> f64 {
    let n = 1536;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.1).collect();
    let b = a.clone();
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut best = f64::INFINITY;
    for _ in 0..4 {
        let t0 = Instant::now();
        // SAFETY: a, b, c are n×n row-major and live for the call; c is written only here.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(&c);
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// The best rate (GFLOP/s) of a 4096³ product in `dtype` on `dev` (a GPU: bf16 uses its tensor
/// cores through cuBLAS), MFU's denominator there.
pub fn measure_device_peak(dev: &Device, dtype: DType) -> Result<f64> {
    let n = 4096;
    let e = |e: candle_core::Error| Error::Invalid(format!("measuring the GEMM peak: {e}"));
    let a = Tensor::ones((n, n), dtype, dev).map_err(e)?;
    let b = (Tensor::ones((n, n), dtype, dev).map_err(e)? * 0.5).map_err(e)?;
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        dev.synchronize().map_err(e)?;
        let t0 = Instant::now();
        for _ in 0..10 {
            std::hint::black_box(a.matmul(&b).map_err(e)?);
        }
        dev.synchronize().map_err(e)?;
        best = best.min(t0.elapsed().as_secs_f64() / 10.0);
    }
    Ok(2.0 * (n * n * n) as f64 / best / 1e9)
}
