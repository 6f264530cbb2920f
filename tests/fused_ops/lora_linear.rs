//! `lora_linear_up` (the frozen linear and LoRA's up projection in one op) against the two ops
//! it replaces, `lora_up_add(base(x), h, B)`: with f32 activations and f32 products the same
//! bits, output and every gradient (dx, dh, dB); with f32 activations and bf16 products the same
//! gradients' bits and the output within f32's tolerance (the bf16 kernels sum `h·Bᵀ` in the
//! base product's own accumulators: other f32 sums of the same bf16 operands); with bf16
//! activations within bf16's tolerance, the base product no longer rounded before the add. (The two ops are checked against
//! torch in `lora_ops_match_composite` and, through `LoraLinear`, against PEFT in
//! tests/qlinear.rs, whose forward now runs this op.)
use super::*;
use candle_core::Module;
use qtune::nn::fused::{lora_linear_up, lora_up_add};

/// A Q8_0 `(o, i)` base with values of scale 0.1, `bf16` products or not.
fn base(o: usize, i: usize, bf16: bool) -> QLinear {
    let w: Vec<f32> = values(o * i, 31).iter().map(|v| v * 0.1).collect();
    let mut data = vec![0u8; QType::Q8_0.bytes_for(o * i).unwrap()];
    qtune::quant::dispatch::quantize(QType::Q8_0, &w, &mut data).unwrap();
    let w = StoredTensor {
        name: "w".into(),
        qtype: QType::Q8_0,
        shape: vec![o, i],
        data: Bytes::from_vec(data),
        nf4: None,
    };
    let q = QLinear::new(Arc::new(w), None).unwrap();
    match bf16 {
        true => q.with_bf16_products(),
        false => q,
    }
}

#[test]
fn lora_linear_up_matches_the_two_ops() {
    // 151 rows: several row blocks of every product and an odd last one; 270 out: two column
    // blocks of the gradient sums, the second partial
    let (m, i, o, r) = (151, 256, 270, 16);
    // (activations, bf16 products, the output's tolerance, the gradients'); None: the same bits
    for (dtype, bf16p, out_tol, grad_tol) in [
        (DType::F32, false, None, None),
        (DType::BF16, false, Some(1e-2), Some(1e-2)),
        (DType::F32, true, Some(1e-5), None),
    ] {
        let q = base(o, i, bf16p);
        let x = Var::from_tensor(&det(&[m, i], 1.0, 41, dtype)).unwrap();
        let h = Var::from_tensor(&det(&[m, r], 1.0, 42, DType::F32)).unwrap();
        let b = Var::from_tensor(&det(&[o, r], 0.3, 43, dtype)).unwrap();
        let dy = det(&[m, o], 1.0, 44, DType::F32);
        let run = |f: &dyn Fn() -> Tensor| {
            let out = f();
            let g = (out.to_dtype(DType::F32).unwrap() * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let grads = [&x, &h, &b].map(|v| g.get(v.as_tensor()).unwrap().clone());
            (out, grads)
        };
        let (xt, ht, bt) = (x.as_tensor(), h.as_tensor(), b.as_tensor());
        let fused = run(&|| lora_linear_up(xt, &q, ht, bt).unwrap());
        let apart = run(&|| lora_up_add(&q.forward(xt).unwrap(), ht, bt, bf16p).unwrap());
        let what = format!("{dtype:?} (bf16 products {bf16p})");
        assert_eq!(fused.0.dtype(), dtype, "{what}: output dtype");
        assert_eq!(fused.0.dims(), [m, o], "{what}: output shape");
        let pairs = [("out", &fused.0, &apart.0)].into_iter().chain(
            ["dx", "dh", "dB"]
                .into_iter()
                .zip(fused.1.iter().zip(&apart.1))
                .map(|(n, (f, a))| (n, f, a)),
        );
        for (name, got, want) in pairs {
            assert_eq!(got.dtype(), want.dtype(), "{what} {name}: dtype");
            match if name == "out" { out_tol } else { grad_tol } {
                None => assert_eq!(bits(got), bits(want), "{what} {name}: bits"),
                Some(t) => assert_close(&format!("{what} {name}"), got, want, t),
            }
        }
    }
    // a base with a bias, or operands that do not fit it, are refused
    let q = base(o, i, false);
    let x = det(&[m, i], 1.0, 41, DType::F32);
    let h = det(&[m, r], 1.0, 42, DType::F32);
    assert!(lora_linear_up(&x, &q, &h, &det(&[o + 1, r], 1.0, 43, DType::F32)).is_err());
    assert!(lora_linear_up(
        &x.narrow(1, 0, i - 32).unwrap(),
        &q,
        &h,
        &det(&[o, r], 1.0, 43, DType::F32)
    )
    .is_err());
    let bias = Tensor::zeros(o, DType::F32, &Device::Cpu).unwrap();
    let biased = QLinear::new(q.weight().clone(), Some(bias)).unwrap();
    assert!(lora_linear_up(&x, &biased, &h, &det(&[o, r], 1.0, 43, DType::F32)).is_err());
}
