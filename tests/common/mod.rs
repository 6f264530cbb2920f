//! Helpers shared by the export / merge / generate and training-step tests (`mod common;` in each
//! test crate; a crate uses only some of them).
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use qtune::models::CausalLm;
use std::path::Path;
use std::process::Command;

/// max |a - b| / max |b| over all elements.
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    (d / b.iter().map(|y| y.abs()).fold(0f32, f32::max)) as f64
}

/// Runs the qtune binary: (success, stdout, stderr).
pub fn qtune(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_qtune"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// Two GGUF LoRA files hold the same adapter: the same LoRA metadata, the same tensors with the same
/// types, shapes and bytes.
pub fn assert_same_gguf_lora(ours: &Path, theirs: &Path) {
    use qtune::format::gguf;
    let a = gguf::load(ours).unwrap();
    let b = gguf::load(theirs).unwrap();
    for key in [
        "general.type",
        "adapter.type",
        "adapter.lora.alpha",
        "general.architecture",
    ] {
        assert_eq!(
            gguf::find(&a.gguf_metadata, key),
            gguf::find(&b.gguf_metadata, key),
            "{key}"
        );
    }
    assert_eq!(a.tensors.len(), b.tensors.len());
    for t in &b.tensors {
        let o = a
            .get(&t.name)
            .unwrap_or_else(|| panic!("{} missing", t.name));
        assert_eq!((o.qtype, &o.shape), (t.qtype, &t.shape), "{}", t.name);
        // Same values bit for bit: rows reordered exactly as llama.cpp's converter does.
        assert!(o.data.as_slice() == t.data.as_slice(), "{} differs", t.name);
    }
}

/// `qtune export --format gguf-lora` of `adapter` for `model` to `lora`, then `qtune merge --type
/// q8_0` to `merged`; both must succeed. Returns merge's stdout.
pub fn export_then_merge(model: &Path, adapter: &Path, lora: &Path, merged: &Path) -> String {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (m, a) = (s(model), s(adapter));
    let (ok, _, err) = qtune(&[
        "export",
        "--model",
        &m,
        "--adapter",
        &a,
        "--format",
        "gguf-lora",
        "--out",
        &s(lora),
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = qtune(&[
        "merge",
        "--model",
        &m,
        "--adapter",
        &a,
        "--type",
        "q8_0",
        "--out",
        &s(merged),
    ]);
    assert!(ok, "{err}");
    out
}

/// Two sequences of 12 tokens below `vocab`, the second with three padding tokens (right padding,
/// labels -100): (ids, mask, labels) on the CPU.
pub fn step_batch(vocab: u32) -> (Tensor, Tensor, Tensor) {
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 5) % vocab).collect();
    let mut m = vec![1u32; 24];
    m[21..].iter_mut().for_each(|v| *v = 0);
    let labels: Vec<i64> = ids
        .iter()
        .zip(&m)
        .map(|(&i, &k)| if k == 0 { -100 } else { i as i64 })
        .collect();
    let cpu = &Device::Cpu;
    (
        Tensor::from_vec(ids, (2, 12), cpu).unwrap(),
        Tensor::from_vec(m, (2, 12), cpu).unwrap(),
        Tensor::from_vec(labels, (2, 12), cpu).unwrap(),
    )
}

/// Sets every LoRA B to varying non-zero values (the same for every model of the same shape, on
/// its own device), so that all gradient paths carry signal. Varying: a B of equal entries makes
/// dA = s·(dz·B)ᵀ·x vanish wherever the next op is invariant to a shift across channels (Falcon's
/// LayerNorm), leaving rounding noise that no relative comparison can judge.
pub fn perturb_lora_b(m: &dyn CausalLm) {
    for (i, (name, v)) in m.lora_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|j| 0.05 * (i % 5 + 1) as f32 * (1.0 + 0.5 * (j as f32 * 0.7).sin()))
                .collect();
            let t = Tensor::from_vec(vals, v.shape(), v.device())
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap();
            v.set(&t).unwrap();
        }
    }
}

/// max |got - want| / max |want| of tensors of any float dtype on any device; NaN in `got` is
/// infinitely far.
pub fn max_rel_any(got: &Tensor, want: &Tensor) -> f32 {
    let v = |t: &Tensor| -> Vec<f32> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (g, w) = (v(got), v(want));
    assert_eq!(g.len(), w.len());
    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-12);
    g.iter()
        .zip(&w)
        .map(|(a, b)| {
            if a.is_nan() {
                f32::INFINITY
            } else {
                (a - b).abs()
            }
        })
        .fold(0f32, f32::max)
        / scale
}

/// The step tests' options: Q8_0 at load, LoRA r4 alpha 8 on all linears (seed 5), `dropout`,
/// cross-entropy chunks of 7 rows.
pub fn step_opts(dtype: DType, dropout: f32) -> qtune::models::LlamaOptions {
    qtune::models::LlamaOptions {
        quant: Some(qtune::quant::QType::Q8_0),
        dtype,
        lora: Some(qtune::models::LoraSpec {
            targets: vec!["all-linear".into()],
            r: 4,
            alpha: 8.0,
            dropout,
            seed: 5,
            ..Default::default()
        }),
        ce_chunk: 7,
        ..Default::default()
    }
}

/// Runs this test binary's test `name` alone in a child process with `QTUNE_NO_AMX=1` (the
/// AVX-512 BF16 kernels where AMX would run), asserts that it passed, and gives its output.
pub fn rerun_without_amx(name: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", name, "--nocapture"])
        .env("QTUNE_NO_AMX", "1")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
    text
}

/// A training step's result: the loss and the gradients by name.
pub type Step = (f32, std::collections::HashMap<String, Tensor>);

/// Asserts that two steps gave the same loss and gradients bit for bit.
pub fn assert_same_step((l0, g0): &Step, (l1, g1): &Step, what: &str) {
    assert_eq!(l0.to_bits(), l1.to_bits(), "{what}: loss {l1} vs {l0}");
    assert_eq!(g0.len(), g1.len());
    for (name, g) in g0 {
        let e = max_rel_any(&g1[name], g);
        assert!(e == 0.0, "{what}: {name} off by {e:e}");
    }
}

/// `f()` on a pool of two threads (the step's streams and pipeline need a second worker).
pub fn on_two_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(f)
}
