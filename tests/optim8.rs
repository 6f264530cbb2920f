//! 8-bit AdamW moments (`--optim-8bit`) against bitsandbytes 0.47.0's blockwise quantiser
//! (tests/reference/gen_optim_fixtures.py: the `AdamW8bit` kernel's step in numpy float32, moments
//! quantised by bnb's `quantize_blockwise` / `dequantize_blockwise`), resume bit-identity, and the
//! refusal of a state saved with the other moment storage.
use candle_core::{DType, Device, Tensor, Var};
use qtune::train::optim8::{signed_map, unsigned_map, Moments8, BLOCK, MIN_8BIT_SIZE};
use qtune::train::{AdamW, AdamWConfig, MomentStorage};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim")
}

fn cases() -> Vec<Value> {
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    v["adamw8bit"].as_array().unwrap().clone()
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join(format!("{name}.safetensors")), &Device::Cpu).unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// max |a - b| / max |b|.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b
        .iter()
        .fold(0f64, |m, &x| m.max(x.abs() as f64))
        .max(1e-30);
    a.iter()
        .zip(b)
        .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()))
        / scale
}

fn config_of(c: &Value) -> AdamWConfig {
    AdamWConfig {
        beta1: c["betas"][0].as_f64().unwrap(),
        beta2: c["betas"][1].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        moments: MomentStorage::Blockwise8,
    }
}

const NAMES: [&str; 2] = ["big", "small"];

fn vars(t: &HashMap<String, Tensor>, dtype: DType) -> Vec<(String, Var)> {
    NAMES
        .iter()
        .map(|n| {
            let v = t[&format!("init/{n}")].to_dtype(dtype).unwrap();
            (n.to_string(), Var::from_tensor(&v).unwrap())
        })
        .collect()
}

fn grads(t: &HashMap<String, Tensor>, k: usize) -> HashMap<String, Tensor> {
    NAMES
        .iter()
        .map(|n| (n.to_string(), t[&format!("grad{k}/{n}")].clone()))
        .collect()
}

#[test]
fn maps_are_bitsandbytes_create_dynamic_map() {
    let t = load("adamw8bit");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&signed_map()), bits(&f32s(&t["map/signed"])));
    assert_eq!(bits(&unsigned_map()), bits(&f32s(&t["map/unsigned"])));
    assert_eq!(BLOCK as u64, cases()[0]["block"].as_u64().unwrap());
}

#[test]
fn adamw8bit_matches_the_bitsandbytes_reference() {
    for c in cases() {
        let name = c["name"].as_str().unwrap();
        let t = load(name);
        let ps = vars(&t, DType::F32);
        let mut opt = AdamW::new(ps.clone(), config_of(&c)).unwrap();
        // The big parameter is 8-bit and not a whole number of blocks; the small one stays f32.
        let n = t["init/big"].elem_count();
        assert!(n >= MIN_8BIT_SIZE && !n.is_multiple_of(BLOCK));
        assert!(opt.moments_8bit("big").is_some() && opt.moments_8bit("small").is_none());
        let (mut worst_p, mut worst_a) = (0f64, 0f64);
        for (k, lr) in c["lrs"].as_array().unwrap().iter().enumerate() {
            opt.step(&grads(&t, k), lr.as_f64().unwrap()).unwrap();
            for (n, v) in &ps {
                let want = f32s(&t[&format!("param{k}/{n}")]);
                let e = rel(&f32s(v.as_tensor()), &want);
                // "small" is torch's AdamW (f32 moments): as tight as tests/optim.rs.
                let tol = if *n == "big" { 1e-5 } else { 1e-6 };
                assert!(e <= tol, "{name} step {k} {n}: rel err {e:e}");
                if *n == "big" {
                    worst_p = worst_p.max(e);
                }
            }
            let q = opt.moments_8bit("big").unwrap();
            let want = |key: &str| t[&format!("{key}_{k}/big")].clone();
            // Codes: equal everywhere (no value of this fixture lies within rounding of a
            // midpoint between two codes; the test would name it).
            for (what, ours, theirs) in [
                ("exp_avg", &q.exp_avg_code, u8s(&want("c1"))),
                ("exp_avg_sq", &q.exp_avg_sq_code, u8s(&want("c2"))),
            ] {
                let diff: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
                assert!(
                    diff.is_empty(),
                    "{name} step {k} {what}: {} codes differ, first at {:?}",
                    diff.len(),
                    diff.iter()
                        .take(5)
                        .map(|&i| (i, ours[i], theirs[i]))
                        .collect::<Vec<_>>()
                );
            }
            for (ours, key) in [(&q.exp_avg_absmax, "a1"), (&q.exp_avg_sq_absmax, "a2")] {
                let e = rel(ours, &f32s(&want(key)));
                assert!(e <= 1e-5, "{name} step {k} absmax {key}: rel err {e:e}");
                worst_a = worst_a.max(e);
            }
        }
        eprintln!("{name}: max rel err params {worst_p:e}, absmax {worst_a:e}");
        // The dequantised moments are the reference's after requantisation: within one code step
        // of the unquantised ones the reference updated the parameter with.
        let (m, v) = opt.moments("big").unwrap();
        for (ours, key, map) in [
            (&m, "exp_avg/big", signed_map()),
            (&v, "exp_avg_sq/big", unsigned_map()),
        ] {
            let e = rel(ours, &f32s(&t[key]));
            let widest = map.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
            assert!(e <= widest as f64, "{name} {key}: {e:e}");
        }
    }
}

fn bits(v: &Var) -> Vec<u32> {
    f32s(v.as_tensor()).iter().map(|x| x.to_bits()).collect()
}

/// Two steps, save, load into fresh Vars, the remaining steps: identical to the uninterrupted run.
fn resume_case(dtype: DType) {
    let c = &cases()[0];
    let t = load(c["name"].as_str().unwrap());
    let lrs: Vec<f64> = serde_json::from_value(c["lrs"].clone()).unwrap();
    let full = vars(&t, dtype);
    let mut a = AdamW::new(full.clone(), config_of(c)).unwrap();
    for (k, &lr) in lrs.iter().enumerate() {
        a.step(&grads(&t, k), lr).unwrap();
    }
    let first = vars(&t, dtype);
    let mut b = AdamW::new(first.clone(), config_of(c)).unwrap();
    for (k, &lr) in lrs.iter().enumerate().take(2) {
        b.step(&grads(&t, k), lr).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("optimizer");
    b.save_state(&state).unwrap();
    let resumed: Vec<(String, Var)> = first
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::zeros(v.dims(), dtype, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut r = AdamW::new(resumed.clone(), config_of(c)).unwrap();
    r.load_state(&state).unwrap();
    assert_eq!(r.moments_8bit("big"), b.moments_8bit("big"));
    for (k, &lr) in lrs.iter().enumerate().skip(2) {
        r.step(&grads(&t, k), lr).unwrap();
    }
    for ((n, va), (_, vr)) in full.iter().zip(&resumed) {
        assert_eq!(bits(va), bits(vr), "{dtype:?} {n}");
        assert_eq!(a.master(n), r.master(n), "{n}");
        assert_eq!(a.moments(n), r.moments(n), "{n}");
        assert_eq!(a.moments_8bit(n), r.moments_8bit(n), "{n}");
        assert_eq!(a.step_count(n), r.step_count(n), "{n}");
    }
}

#[test]
fn resume_with_8bit_moments_is_bit_exact_f32() {
    resume_case(DType::F32);
}

#[test]
fn resume_with_8bit_moments_is_bit_exact_bf16() {
    resume_case(DType::BF16);
}

#[test]
fn a_state_of_the_other_moment_storage_is_refused_naming_the_directory() {
    let c = &cases()[0];
    let t = load(c["name"].as_str().unwrap());
    let eight = config_of(c);
    let f32cfg = AdamWConfig {
        moments: MomentStorage::F32,
        ..eight
    };
    let tmp = tempfile::tempdir().unwrap();
    for (saved, loading) in [(eight, f32cfg), (f32cfg, eight)] {
        let mut a = AdamW::new(vars(&t, DType::F32), saved).unwrap();
        a.step(&grads(&t, 0), 1e-3).unwrap();
        let state = tmp.path().join(format!("{:?}", saved.moments));
        a.save_state(&state).unwrap();
        let mut b = AdamW::new(vars(&t, DType::F32), loading).unwrap();
        let err = b.load_state(&state).unwrap_err().to_string();
        assert!(
            err.contains(&state.display().to_string()) && err.contains("--optim-8bit"),
            "{err}"
        );
        assert_eq!(
            b.step_count("big"),
            Some(0),
            "a refused load changes nothing"
        );
    }
}

#[test]
fn state_bytes_follow_the_storage() {
    let t = load("adamw8bit");
    let n_big = t["init/big"].elem_count();
    let n_small = t["init/small"].elem_count();
    let eight = AdamW::new(
        vars(&t, DType::F32),
        AdamWConfig {
            moments: MomentStorage::Blockwise8,
            ..AdamWConfig::default()
        },
    )
    .unwrap();
    let full = AdamW::new(vars(&t, DType::F32), AdamWConfig::default()).unwrap();
    // f32: master + two moments, 12 bytes per element.
    assert_eq!(full.state_bytes(), 12 * (n_big + n_small));
    // 8-bit: master 4, codes 2 per element, two f32 absmax per block of 256; "small" stays f32.
    let want = 6 * n_big + 8 * n_big.div_ceil(256) + 12 * n_small;
    assert_eq!(eight.state_bytes(), want);
    assert_eq!(
        MomentStorage::Blockwise8.state_bytes(n_big)
            + MomentStorage::Blockwise8.state_bytes(n_small),
        want
    );
    assert_eq!(
        Moments8::bytes_for(n_big),
        2 * n_big + 8 * n_big.div_ceil(256)
    );
}
