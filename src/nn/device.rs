//! The compute device a run names (`--device cpu`, `cuda` or `cuda:N`) and its memory figures.
//!
//! On a GPU the frozen weights are copied to the device once, still quantised; activations,
//! adapters and gradients live there; AdamW keeps its f32 state on the host (see `train::optim`).
use crate::{Error, Result};
use candle_core::{DType, Device};

/// Hidden sizes from which `auto` picked bf16 on a CPU with AVX-512 BF16 (AMX or not) in sessions
/// 8–15, and without AMX in session 16 ([`auto_dtype_before_recorded`]: the rule a checkpoint of
/// those versions resumes in).
pub const AUTO_BF16_MIN_HIDDEN: usize = 1024;

/// The compute dtype `--dtype` names on the device `--device` names, for a model of `hidden` size
/// (when known): `f32`, `bf16`, or `auto` — bf16 on a GPU and on a CPU with AVX-512 BF16 (AMX or
/// not) at every width; f32 otherwise (other CPUs' bf16 mode only converts around the f32
/// kernels). Measured (session 17, alternating): with AMX bf16 is the faster mode at every width;
/// with the tiles off (`QTUNE_NO_AMX`, the AVX-512 BF16 kernels) 1.08–1.10× f32 on the embedded
/// default (hidden 128) and 1.12–1.13× at ~100M, once every command ran on the thread pool (in
/// session 16, before, 5–9 % slower at 128: the 1024 threshold then).
pub fn compute_dtype(dtype: &str, device: &str, hidden: Option<usize>) -> Result<DType> {
    match dtype.to_ascii_lowercase().as_str() {
        "bf16" => Ok(DType::BF16),
        "f32" => Ok(DType::F32),
        "auto" if crate::quant::matmul_bf16::has_avx512_bf16() => Ok(DType::BF16),
        // no bf16 kernels: bf16 on a GPU only, as the rule qtune had before
        "auto" => Ok(auto_dtype_before_recorded(device, hidden)),
        d => Err(Error::Invalid(format!(
            "--dtype {d}: use auto, bf16 or f32"
        ))),
    }
}

/// What `auto` resolved to in qtune before checkpoints recorded it (sessions 8–15): bf16 on a GPU,
/// and on a CPU with AVX-512 BF16 for models of [`AUTO_BF16_MIN_HIDDEN`] or wider, AMX or not. A
/// checkpoint of those versions resumes in it.
pub fn auto_dtype_before_recorded(device: &str, hidden: Option<usize>) -> DType {
    let cpu_bf16 = crate::quant::matmul_bf16::has_avx512_bf16()
        && hidden.is_none_or(|h| h >= AUTO_BF16_MIN_HIDDEN);
    match device.starts_with("cuda") || cpu_bf16 {
        true => DType::BF16,
        false => DType::F32,
    }
}

/// The recompute dtype `--recompute-dtype` names: `auto` (None: see
/// [`crate::models::LlamaOptions::recompute_dtype`]), `f32` or `bf16`.
pub fn recompute_dtype(name: &str) -> Result<Option<DType>> {
    match name.to_ascii_lowercase().as_str() {
        "auto" => Ok(None),
        "f32" => Ok(Some(DType::F32)),
        "bf16" => Ok(Some(DType::BF16)),
        d => Err(Error::Invalid(format!(
            "--recompute-dtype {d}: use auto, f32 or bf16"
        ))),
    }
}

/// The device called `name`: `cpu`, `cuda` (GPU 0) or `cuda:N`. A CUDA name needs a build with
/// `--features cuda` and a GPU of compute capability 8.0 or newer.
pub fn open(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        n => match n.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => i,
            _ => {
                return Err(Error::Invalid(format!(
                    "--device {n}: use cpu, cuda or cuda:N"
                )))
            }
        },
    };
    open_cuda(ordinal)
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device> {
    let e = |e: candle_core::Error| {
        // the driver's words, without the backtrace candle attaches under RUST_BACKTRACE
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        Error::Invalid(format!(
            "--device cuda:{ordinal}: {e}; check `nvidia-smi`, or use --device cpu"
        ))
    };
    let dev = Device::new_cuda(ordinal).map_err(e)?;
    crate::cuda::check_device(dev.as_cuda_device().map_err(e)?).map_err(e)?;
    Ok(dev)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device> {
    Err(Error::Invalid(format!(
        "--device cuda:{ordinal}: this qtune was built without CUDA; rebuild with \
         `cargo build --release --features cuda` (needs nvcc; see README, CUDA) or use --device cpu"
    )))
}

/// `$gpu` with `$d` bound to `$dev`'s CUDA device (returned from the calling function); `$cpu`
/// on the CPU and in a build without CUDA.
macro_rules! per_device {
    ($dev:expr, |$d:ident| $gpu:expr, $cpu:expr) => {{
        #[cfg(feature = "cuda")]
        if let Device::Cuda($d) = $dev {
            return $gpu.map_err(gpu_err);
        }
        let _ = $dev;
        $cpu
    }};
}

/// Bytes in use on `dev`'s GPU now (context, modules, cuBLAS and whatever else runs there);
/// `None` on the CPU.
pub fn used_bytes(dev: &Device) -> Result<Option<u64>> {
    per_device!(
        dev,
        |d| crate::cuda::device_used_bytes(d).map(Some),
        Ok(None)
    )
}

/// Starts a new allocation peak on `dev` (no-op on the CPU).
pub fn reset_peak(dev: &Device) -> Result<()> {
    per_device!(dev, |d| crate::cuda::reset_pool_peak(d), Ok(()))
}

/// Peak bytes allocated on `dev` since [`reset_peak`] (tensors, quantised weights, scratch);
/// `None` on the CPU.
pub fn peak_allocated(dev: &Device) -> Result<Option<u64>> {
    per_device!(dev, |d| crate::cuda::pool_peak_bytes(d).map(Some), Ok(None))
}

#[cfg(feature = "cuda")]
fn gpu_err(e: candle_core::Error) -> Error {
    Error::Invalid(format!("reading GPU memory figures: {e}"))
}

/// Current resident set size of this process (VmRSS), 0 where /proc is unavailable.
pub fn current_rss_bytes() -> u64 {
    proc_status_kib("VmRSS:").map_or(0, |kb| kb * 1024)
}

/// Peak resident set size of this process (VmHWM), 0 where /proc is unavailable.
pub fn peak_rss_bytes() -> u64 {
    proc_status_kib("VmHWM:").map_or(0, |kb| kb * 1024)
}

/// A `kB` line of /proc/self/status.
fn proc_status_kib(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
}

/// Gives the pages of freed heap memory back to the system (glibc `malloc_trim(0)`: the top of
/// the heap, and `madvise` on the whole pages inside every free chunk); a no-op elsewhere.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; no live block moves.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// With `QTUNE_HEAP_TRACE` set, one line on stderr of RSS, its peak and glibc's `mallinfo2`
/// (heap size, mmapped bytes and count, bytes in use, free, and the free top `keepcost`), MiB,
/// at `point` of `phase`: where the step's retained heap shows (docs/BENCHMARKS.md). Costs one
/// environment check the first time, nothing after when unset.
pub fn heap_probe(phase: &str, point: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("QTUNE_HEAP_TRACE").is_some()) {
        return;
    }
    let (rss, peak) = (
        current_rss_bytes() as f64 / 1048576.0,
        peak_rss_bytes() as f64 / 1048576.0,
    );
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        let mi = unsafe { libc::mallinfo2() };
        let m = |b: usize| b as f64 / 1048576.0;
        eprintln!(
            "heap {phase:>8} {point:<12} rss {:7.1} peak {:7.1} | arena {:7.1} mmap {:6.1} ({}) \
             in use {:7.1} free {:7.1} top {:6.1}",
            rss,
            peak,
            m(mi.arena),
            m(mi.hblkhd),
            mi.hblks,
            m(mi.uordblks),
            m(mi.fordblks),
            m(mi.keepcost)
        );
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    eprintln!(
        "heap {phase:>8} {point:<12} rss {:7.1} peak {:7.1}",
        rss, peak
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_dtype_follows_the_hardware() {
        assert_eq!(
            compute_dtype("auto", "cuda:1", Some(64)).unwrap(),
            DType::BF16
        );
        let cpu = if crate::quant::matmul_bf16::has_avx512_bf16() {
            DType::BF16
        } else {
            DType::F32
        };
        assert_eq!(compute_dtype("AUTO", "cpu", Some(4096)).unwrap(), cpu);
        assert_eq!(compute_dtype("auto", "cpu", None).unwrap(), cpu);
        // a toy model too (session 17)
        assert_eq!(compute_dtype("auto", "cpu", Some(128)).unwrap(), cpu);
        // what a checkpoint of sessions 8-15 resumes in: a toy model in f32 on every CPU
        assert_eq!(auto_dtype_before_recorded("cpu", Some(128)), DType::F32);
        assert_eq!(auto_dtype_before_recorded("cpu", Some(4096)), cpu);
        assert_eq!(compute_dtype("f32", "cuda", None).unwrap(), DType::F32);
        assert_eq!(
            compute_dtype("bf16", "cpu", Some(128)).unwrap(),
            DType::BF16
        );
        let e = compute_dtype("f16", "cpu", None).unwrap_err().to_string();
        assert!(e.contains("--dtype f16: use auto, bf16 or f32"), "{e}");
    }

    #[test]
    fn names_are_checked() {
        assert!(matches!(open("cpu"), Ok(Device::Cpu)));
        let e = open("gpu").unwrap_err().to_string();
        assert!(e.contains("use cpu, cuda or cuda:N"), "{e}");
        assert!(open("cuda:x").is_err());
        if !cfg!(feature = "cuda") {
            let e = open("cuda").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        assert_eq!(used_bytes(&Device::Cpu).unwrap(), None);
        assert_eq!(peak_allocated(&Device::Cpu).unwrap(), None);
    }
}
