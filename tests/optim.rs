//! AdamW, gradient clipping and LR schedules against torch 2.5.1 / transformers 4.46.3
//! (tests/reference/gen_optim_fixtures.py), and resume-from-state == uninterrupted, bit for bit.
use candle_core::{DType, Device, Tensor, Var};
use qtune::train::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule, ScheduleKind};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/optim")
}

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap()
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

/// max |a - b| / max |b|: the f32 tolerance is 1e-6 of the tensor's scale.
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

// "tiny" has gradients ~1e-8, where eps matters.
const NAMES: [&str; 4] = [
    "layers.0.q.lora_A.weight",
    "layers.0.q.lora_B.weight",
    "bias",
    "tiny",
];

fn schedule_of(c: &Value) -> LrSchedule {
    LrSchedule {
        kind: c["schedule"].as_str().unwrap().parse().unwrap(),
        base_lr: c["lr"].as_f64().unwrap(),
        warmup_steps: c["warmup"].as_u64().unwrap() as usize,
        total_steps: c["total"].as_u64().unwrap() as usize,
    }
}

fn config_of(c: &Value) -> AdamWConfig {
    AdamWConfig {
        beta1: c["betas"][0].as_f64().unwrap(),
        beta2: c["betas"][1].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        ..AdamWConfig::default()
    }
}

fn vars(t: &HashMap<String, Tensor>, prefix: &str, dtype: DType) -> Vec<(String, Var)> {
    NAMES
        .iter()
        .map(|n| {
            let v = t[&format!("{prefix}/{n}")].to_dtype(dtype).unwrap();
            (n.to_string(), Var::from_tensor(&v).unwrap())
        })
        .collect()
}

/// Step k's gradients as the fixture applied them ("bias" has none at step 1), in `dtype`.
fn grads(t: &HashMap<String, Tensor>, k: usize, dtype: DType) -> HashMap<String, Tensor> {
    NAMES
        .iter()
        .filter(|n| !(**n == "bias" && k == 1))
        .map(|n| {
            (
                n.to_string(),
                t[&format!("grad{k}/{n}")].to_dtype(dtype).unwrap(),
            )
        })
        .collect()
}

#[test]
fn adamw_matches_torch_f32() {
    for c in cases()["adamw"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        if c["bf16_values"].as_bool().unwrap() {
            continue;
        }
        let t = load(name);
        let sched = schedule_of(c);
        let ps = vars(&t, "init", DType::F32);
        let mut opt = AdamW::new(ps.clone(), config_of(c)).unwrap();
        let steps = c["steps"].as_u64().unwrap() as usize;
        for k in 0..steps {
            let lr = sched.lr(k);
            let want_lr = c["lrs"][k].as_f64().unwrap();
            assert!(
                (lr - want_lr).abs() <= 1e-15 * want_lr.abs(),
                "{name} lr {k}: {lr} vs {want_lr}"
            );
            opt.step(&grads(&t, k, DType::F32), lr).unwrap();
            for (n, v) in &ps {
                let want = f32s(&t[&format!("param{k}/{n}")]);
                let e = rel(&f32s(v.as_tensor()), &want);
                assert!(e <= 1e-6, "{name} step {k} {n}: rel err {e:e}");
                assert_eq!(opt.master(n).unwrap(), f32s(v.as_tensor()).as_slice());
            }
        }
        for n in NAMES {
            let (m, v) = opt.moments(n).unwrap();
            let em = rel(&m, &f32s(&t[&format!("exp_avg/{n}")]));
            let ev = rel(&v, &f32s(&t[&format!("exp_avg_sq/{n}")]));
            assert!(
                em <= 1e-6 && ev <= 1e-6,
                "{name} {n}: moments rel err {em:e} {ev:e}"
            );
        }
        assert_eq!(opt.step_count("bias"), Some(steps as u64 - 1));
        assert_eq!(opt.step_count(NAMES[0]), Some(steps as u64));
    }
}

#[test]
fn adamw_bf16_params_follow_an_f32_master() {
    let c = cases()["adamw"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["bf16_values"].as_bool().unwrap())
        .unwrap()
        .clone();
    let t = load(c["name"].as_str().unwrap());
    let sched = schedule_of(&c);
    let ps = vars(&t, "init", DType::BF16);
    let mut opt = AdamW::new(ps.clone(), config_of(&c)).unwrap();
    for k in 0..c["steps"].as_u64().unwrap() as usize {
        // The fixture's values and gradients are bf16-representable: torch ran f32 on them, which is
        // what our f32 master does; the bf16 Var is the master's rounding.
        opt.step(&grads(&t, k, DType::BF16), sched.lr(k)).unwrap();
        for (n, v) in &ps {
            assert_eq!(v.dtype(), DType::BF16);
            let want = f32s(&t[&format!("param{k}/{n}")]);
            let e = rel(opt.master(n).unwrap(), &want);
            assert!(e <= 1e-6, "step {k} {n}: master rel err {e:e}");
            let want_bf16 = f32s(&t[&format!("param{k}/{n}")].to_dtype(DType::BF16).unwrap());
            let got = f32s(v.as_tensor());
            for (i, (g, w)) in got.iter().zip(&want_bf16).enumerate() {
                // Equal, or one bf16 step apart where the f32 values straddle a rounding boundary.
                let ulp = (w.abs().max(1e-30) * 2f32.powi(-7)).max(f32::MIN_POSITIVE);
                assert!((g - w).abs() <= ulp, "step {k} {n}[{i}]: {g} vs {w}");
            }
        }
    }
}

#[test]
fn bf16_master_keeps_small_updates() {
    // lr 1e-4 on weights near 1: each update (~1e-4) is below half a bf16 step at 1 (2^-8), so a
    // bf16-only optimizer would never move them; the master accumulates and the Var follows.
    let v = Var::from_tensor(&Tensor::ones(8, DType::BF16, &Device::Cpu).unwrap()).unwrap();
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![("w".into(), v.clone())], cfg).unwrap();
    let g: HashMap<String, Tensor> = [(
        "w".to_string(),
        Tensor::ones(8, DType::BF16, &Device::Cpu).unwrap(),
    )]
    .into();
    for _ in 0..100 {
        opt.step(&g, 1e-4).unwrap();
    }
    let got = f32s(v.as_tensor());
    assert!(got.iter().all(|&x| x < 0.995), "{got:?}");
}

#[test]
fn schedules_match_transformers() {
    for s in cases()["schedules"].as_array().unwrap() {
        let sched = LrSchedule {
            kind: s["kind"].as_str().unwrap().parse().unwrap(),
            base_lr: s["base_lr"].as_f64().unwrap(),
            warmup_steps: s["warmup"].as_u64().unwrap() as usize,
            total_steps: s["total"].as_u64().unwrap() as usize,
        };
        for (k, want) in s["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = sched.lr(k);
            assert!(
                (got - want).abs() <= 1e-15 * want.abs().max(1e-300),
                "{sched:?} step {k}: {got} vs {want}"
            );
        }
    }
    assert_eq!(
        "cosine".parse::<ScheduleKind>().unwrap(),
        ScheduleKind::Cosine
    );
    assert!("cosin".parse::<ScheduleKind>().is_err());
}

#[test]
fn clip_grad_norm_matches_torch() {
    for c in cases()["clip"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let t = load(name);
        let mut g: HashMap<String, Tensor> = NAMES
            .iter()
            .map(|n| (n.to_string(), t[&format!("grad/{n}")].clone()))
            .collect();
        let total = clip_grad_norm(&mut g, c["max_norm"].as_f64().unwrap()).unwrap();
        let want = c["total_norm"].as_f64().unwrap();
        assert!(
            (total - want).abs() <= 1e-6 * want,
            "{name}: norm {total} vs {want}"
        );
        for n in NAMES {
            let e = rel(&f32s(&g[n]), &f32s(&t[&format!("clipped/{n}")]));
            assert!(e <= 1e-6, "{name} {n}: rel err {e:e}");
        }
        if name == "clip_inactive" {
            for n in NAMES {
                assert_eq!(f32s(&g[n]), f32s(&t[&format!("grad/{n}")]));
            }
        }
    }
    let mut empty = HashMap::new();
    assert_eq!(clip_grad_norm(&mut empty, 1.0).unwrap(), 0.0);
    assert!(clip_grad_norm(&mut empty, 0.0).is_err());
}

fn bits(v: &Var) -> Vec<u32> {
    f32s(v.as_tensor()).into_iter().map(f32::to_bits).collect()
}

fn resume_case(dtype: DType) {
    let c = &cases()["adamw"][1]; // weight decay, cosine, betas (0.9, 0.95)
    let t = load(c["name"].as_str().unwrap());
    let sched = schedule_of(c);
    let cfg = config_of(c);
    let steps = c["steps"].as_u64().unwrap() as usize;

    let full = vars(&t, "init", dtype);
    let mut a = AdamW::new(full.clone(), cfg).unwrap();
    for k in 0..steps {
        a.step(&grads(&t, k, dtype), sched.lr(k)).unwrap();
    }

    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("ckpt/optimizer");
    let first = vars(&t, "init", dtype);
    let mut b = AdamW::new(first.clone(), cfg).unwrap();
    for k in 0..2 {
        b.step(&grads(&t, k, dtype), sched.lr(k)).unwrap();
    }
    b.save_state(&state).unwrap();
    // Save again over it (a later checkpoint to the same path) and leave no temporaries.
    b.save_state(&state).unwrap();
    let left: Vec<_> = std::fs::read_dir(tmp.path().join("ckpt"))
        .unwrap()
        .collect();
    assert_eq!(left.len(), 1);
    drop(b);

    // A new process: Vars from wherever (here zeros), state restores master and moments.
    let resumed: Vec<(String, Var)> = first
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::zeros(v.dims(), dtype, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    let mut r = AdamW::new(resumed.clone(), cfg).unwrap();
    r.load_state(&state).unwrap();
    for (n, v) in &resumed {
        assert_eq!(
            bits(v),
            bits(&first.iter().find(|(m, _)| m == n).unwrap().1)
        );
    }
    for k in 2..steps {
        r.step(&grads(&t, k, dtype), sched.lr(k)).unwrap();
    }
    for ((n, va), (_, vr)) in full.iter().zip(&resumed) {
        assert_eq!(bits(va), bits(vr), "{dtype:?} {n}");
        assert_eq!(a.master(n), r.master(n), "{n}");
        assert_eq!(a.moments(n), r.moments(n), "{n}");
        assert_eq!(a.step_count(n), r.step_count(n), "{n}");
    }
}

#[test]
fn resume_is_bit_exact_f32() {
    resume_case(DType::F32);
}

#[test]
fn resume_is_bit_exact_bf16() {
    resume_case(DType::BF16);
}

#[test]
fn bad_inputs_are_named_errors() {
    let p = |n: &str, s: usize| {
        (
            n.to_string(),
            Var::zeros(s, DType::F32, &Device::Cpu).unwrap(),
        )
    };
    let cfg = AdamWConfig::default();
    let err = AdamW::new(vec![p("a", 2), p("a", 2)], cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("'a'") && err.contains("twice"), "{err}");
    let int = (
        "i".to_string(),
        Var::zeros(2, DType::U32, &Device::Cpu).unwrap(),
    );
    assert!(AdamW::new(vec![int], cfg)
        .unwrap_err()
        .to_string()
        .contains("'i'"));
    let bad = AdamWConfig { beta1: 1.0, ..cfg };
    assert!(AdamW::new(vec![p("a", 2)], bad).is_err());

    let mut opt = AdamW::new(vec![p("a", 2), p("b", 3)], cfg).unwrap();
    let g = |n: &str, s: usize| -> HashMap<String, Tensor> {
        [(
            n.to_string(),
            Tensor::ones(s, DType::F32, &Device::Cpu).unwrap(),
        )]
        .into()
    };
    let err = opt.step(&g("c", 2), 1e-3).unwrap_err().to_string();
    assert!(
        err.contains("'c'") && err.contains("not a parameter"),
        "{err}"
    );
    let err = opt.step(&g("b", 2), 1e-3).unwrap_err().to_string();
    assert!(err.contains("'b'") && err.contains("shape"), "{err}");
    assert!(opt.step(&g("a", 2), f64::NAN).is_err());
    assert_eq!(
        opt.step_count("a"),
        Some(0),
        "a failed step changes nothing"
    );
    opt.step(&g("a", 2), 1e-3).unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("s");
    opt.save_state(&state).unwrap();
    // Another adapter (other names / shapes) or other hyper-parameters: refused, by name.
    let mut other = AdamW::new(vec![p("a", 2), p("x", 3)], cfg).unwrap();
    let err = other.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("'x'") || err.contains("x"), "{err}");
    let mut other = AdamW::new(vec![p("a", 2), p("b", 4)], cfg).unwrap();
    let err = other.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("b") && err.contains("[4]"), "{err}");
    let mut other = AdamW::new(vec![p("a", 2)], cfg).unwrap();
    assert!(other
        .load_state(&state)
        .unwrap_err()
        .to_string()
        .contains("2 parameters"));
    let mut other = AdamW::new(
        vec![p("a", 2), p("b", 3)],
        AdamWConfig {
            weight_decay: 0.0,
            ..cfg
        },
    )
    .unwrap();
    assert!(other
        .load_state(&state)
        .unwrap_err()
        .to_string()
        .contains("same optimizer settings"));
    // Corrupt JSON names the file.
    std::fs::write(state.join("optimizer.json"), "{").unwrap();
    let err = opt.load_state(&state).unwrap_err().to_string();
    assert!(err.contains("optimizer.json"), "{err}");
    // A directory that is not optimizer state is never replaced.
    std::fs::write(tmp.path().join("keep.txt"), "x").unwrap();
    let err = opt.save_state(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("refusing"), "{err}");
    assert!(tmp.path().join("keep.txt").exists());
}

#[test]
fn grads_by_name_reads_a_backward_pass() {
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[1f32, 2.0, 3.0], &dev).unwrap()).unwrap();
    let frozen = Var::from_tensor(&Tensor::new(&[5f32], &dev).unwrap()).unwrap();
    let opt = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).unwrap();
    // loss = sum(a^2) * frozen: d/da = 2a * 5
    let loss = a
        .as_tensor()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .broadcast_mul(frozen.as_tensor())
        .unwrap();
    let store = loss.backward().unwrap();
    let g = opt.grads_by_name(&store);
    assert_eq!(g.len(), 1);
    assert_eq!(f32s(&g["a"]), vec![10.0, 20.0, 30.0]);
}
