//! DPO's batched step: a micro-batch's chosen and rejected sequences run as rows of one
//! right-padded batch ([`CausalLm::train_grads_rows`]). Each row's summed cross-entropy and the
//! gradient of `Σ w·CE` must equal running every row alone (no padding) and summing, with and
//! without checkpointing, on Llama and Falcon.
use candle_core::{Device, Tensor};
use qtune::models::{CausalLm, LlamaOptions, LoraSpec};
use qtune::store::WeightStore;
use std::collections::HashMap;
use std::path::Path;

/// Rows of different lengths (prompt -100, then the completion), as DPO builds them.
fn rows() -> Vec<(Vec<u32>, Vec<i64>)> {
    let mk = |start: u32, prompt: usize, len: usize| {
        let ids: Vec<u32> = (0..len as u32)
            .map(|i| (start + i * 37) % 250 + 3)
            .collect();
        let lab = ids
            .iter()
            .enumerate()
            .map(|(t, &i)| if t < prompt { -100 } else { i as i64 })
            .collect();
        (ids, lab)
    };
    vec![mk(5, 3, 9), mk(5, 3, 6), mk(11, 4, 12), mk(11, 4, 7)]
}

/// `rows` right-padded into (ids, mask, labels).
fn batch(rows: &[(Vec<u32>, Vec<i64>)]) -> (Tensor, Tensor, Tensor) {
    let t = rows.iter().map(|r| r.0.len()).max().unwrap();
    let (mut ids, mut mask, mut lab) = (Vec::new(), Vec::new(), Vec::new());
    for (i, l) in rows {
        let pad = t - i.len();
        ids.extend(i.iter().copied().chain(std::iter::repeat_n(0, pad)));
        mask.extend(std::iter::repeat_n(1u32, i.len()).chain(std::iter::repeat_n(0, pad)));
        lab.extend(l.iter().copied().chain(std::iter::repeat_n(-100, pad)));
    }
    let b = rows.len();
    let d = &Device::Cpu;
    (
        Tensor::from_vec(ids, (b, t), d).unwrap(),
        Tensor::from_vec(mask, (b, t), d).unwrap(),
        Tensor::from_vec(lab, (b, t), d).unwrap(),
    )
}

fn model(dir: &str, checkpoint: bool) -> Box<dyn CausalLm> {
    let store = WeightStore::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)).unwrap();
    let m = qtune::models::load(
        &store,
        LlamaOptions {
            lora: Some(LoraSpec::default()),
            checkpoint,
            ..LlamaOptions::default()
        },
    )
    .unwrap();
    // Non-zero B everywhere, so that every adapter tensor has a gradient.
    for (i, (name, v)) in m.lora_params().into_iter().enumerate() {
        if name.contains("lora_B") {
            // Varied values: a constant B would sum the output gradient over features, which a
            // following LayerNorm makes ~0 (no signal left to compare).
            let n = v.elem_count();
            let x: Vec<f32> = (0..n)
                .map(|j| 0.05 * ((j * 7 + i) as f32 * 0.37).sin())
                .collect();
            let t = Tensor::from_vec(x, v.shape(), &Device::Cpu)
                .and_then(|t| t.to_dtype(v.dtype()))
                .unwrap();
            v.set(&t).unwrap();
        }
    }
    m
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn check(dir: &str) {
    let w = [0.3, -0.2, 0.5, -0.1];
    for checkpoint in [true, false] {
        let m = model(dir, checkpoint);
        let rs = rows();
        let (ids, mask, lab) = batch(&rs);
        let (vals, grads) = m
            .train_grads_rows(&ids, Some(&mask), &lab, &mut |v| {
                assert_eq!(v.len(), 4);
                Ok(w.to_vec())
            })
            .unwrap();
        let eval = m.eval_row_losses(&ids, Some(&mask), &lab).unwrap();
        let mut sum: HashMap<String, Tensor> = HashMap::new();
        for (r, row) in rs.iter().enumerate() {
            let (i, k, l) = batch(std::slice::from_ref(row));
            let (v1, g1) = m
                .train_grads_rows(&i, Some(&k), &l, &mut |_| Ok(vec![w[r]]))
                .unwrap();
            let (alone, n) = v1[0];
            assert_eq!(n, row.1.iter().skip(1).filter(|&&x| x >= 0).count());
            assert_eq!(vals[r].1, n);
            for got in [vals[r].0, eval[r].0] {
                assert!(
                    (got - alone).abs() <= 1e-5 * alone.abs(),
                    "{dir} row {r}: padded {got} alone {alone}"
                );
            }
            for (name, g) in g1 {
                let s = match sum.remove(&name) {
                    Some(p) => (p + g).unwrap(),
                    None => g,
                };
                sum.insert(name, s);
            }
        }
        assert_eq!(sum.len(), grads.len());
        for (name, g) in &grads {
            let want = &sum[name];
            let scale = max_abs(want);
            assert!(scale > 0.0, "{dir} {name}: no gradient");
            let err = max_abs(&(g - want).unwrap()) / scale;
            assert!(err < 1e-5, "{dir} {name} (checkpoint {checkpoint}): {err}");
        }
    }
}

#[test]
fn llama_rows_batched_equal_rows_alone() {
    check("tests/fixtures/llama/model");
}

#[test]
fn falcon_rows_batched_equal_rows_alone() {
    check("tests/fixtures/falcon/gqa/model");
}
