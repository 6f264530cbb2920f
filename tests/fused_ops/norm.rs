//! The fused LayerNorm, the residual adds fused into the norms and the three-term residual add
//! (src/nn/fused/residual.rs) against torch 2.5.1 autograd and transformers 4.46.3
//! (tests/reference/gen_norm_fixture.py), on shapes with C = 77 (odd, past the kernels' eight
//! lanes) and C = 136:
//! - f32: outputs and every input gradient within 1e-5 of the reference's largest magnitude;
//! - bf16: element by element within one bf16 ulp of torch's value (both sides reproduce torch's
//!   roundings; only f32 summation orders differ, which can flip a rounding once). Where torch
//!   rounds twice (x's and a's gradient: the norm's input gradient rounded, then added to the
//!   residual path's and rounded again), a flip in the first rounding carries through: within one
//!   ulp of the result plus one ulp of the norm's own input gradient (which is checked alone at one
//!   ulp first).
//!
//! The sequential cases run the block's output op both ways candle may order the two backward
//! passes: with the output depending on y (as through a block's MLP: the output op's backward
//! first, its gradient added in the norm op's pass) and not (the norm op's first). Each is also
//! checked with the residual path's gradient dropped (the norm's input gradient alone as x's),
//! which the checks must reject.
use super::gelu::bf16_ulp;
use super::*;
use qtune::nn::fused::{add_layer_norm, add_rms_norm, layer_norm, residual_add3};

const EPS: f64 = 1e-5;
const F32_TOL: f64 = 1e-5;
const SHAPES: [&str; 2] = ["s0", "s1"];

/// Elements of `got` off `want` by more than `ulps` ulps of `want` plus one ulp of `extra`'s
/// element (if given), and the largest error in ulps of `want`.
fn off_ulps(got: &Tensor, want: &Tensor, ulps: f64, extra: Option<&Tensor>) -> (usize, f64) {
    let (g, w) = (to_vec(got), to_vec(want));
    let e = extra.map(to_vec);
    assert_eq!(g.len(), w.len());
    let (mut bad, mut worst) = (0, 0f64);
    for i in 0..g.len() {
        let err = (g[i] as f64 - w[i] as f64).abs();
        let allowed = ulps * bf16_ulp(w[i]) + e.as_ref().map_or(0.0, |e| bf16_ulp(e[i]));
        if err > allowed || !g[i].is_finite() {
            bad += 1;
        }
        worst = worst.max(err / bf16_ulp(w[i]));
    }
    (bad, worst)
}

/// Whether `got` passes the dtype's rule against `want` (see the module doc); prints the error.
fn passes(what: &str, got: &Tensor, want: &Tensor, bf16: bool, extra: Option<&Tensor>) -> bool {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    if !bf16 {
        let e = rel_err(got, want);
        eprintln!("{what}: relative error {e:.2e} (tolerance {F32_TOL:.0e})");
        return e <= F32_TOL;
    }
    let (bad, worst) = off_ulps(got, want, 1.0, extra);
    eprintln!(
        "{what}: {bad} of {} elements outside the rule, worst {worst:.2} ulps",
        want.elem_count()
    );
    bad == 0
}

fn vars(ts: [Tensor; 3]) -> [Var; 3] {
    ts.map(|t| Var::from_tensor(&t).unwrap())
}

/// The loss Σ_k outs_k · grads_k in f32 and the gradients of `of`.
fn grads_of(outs: &[&Tensor], grads: &[Tensor], of: &[&Var]) -> Vec<Tensor> {
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (o, g) in outs.iter().zip(grads) {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        loss = (loss + (f32(o) * f32(g)).unwrap().sum_all().unwrap()).unwrap();
    }
    let gs = loss.backward().unwrap();
    of.iter()
        .map(|v| gs.get(v.as_tensor()).expect("a gradient").clone())
        .collect()
}

#[test]
fn layer_norm_matches_torch() {
    let f = Fixture::load("norm_residual");
    for (tag, s) in ["f32", "bf16"].iter().flat_map(|t| SHAPES.map(|s| (*t, s))) {
        let get = |n: &str| f.get(&format!("{tag}.{s}.{n}"));
        let [x, _, _] = vars([get("x"), get("a"), get("r")]);
        let y = layer_norm(x.as_tensor(), &get("w"), &get("b"), EPS).unwrap();
        assert_eq!(y.dtype(), x.dtype(), "{tag} {s}: output dtype");
        let dx = &grads_of(&[&y], &[get("dy")], &[&x])[0];
        let bf16 = tag == "bf16";
        for (what, got) in [("y", &y), ("dx", dx)] {
            let name = format!("layer_norm {tag} {s} {what}");
            assert!(passes(&name, got, &get(&format!("ln.{what}")), bf16, None));
        }
    }
}

/// A sequential block's `h = x + a; y = norm(h); out = h + r` as `add_*_norm(x, a)` and
/// `Residual::output(r)`: y, out, and the gradients of x, a and r.
#[test]
fn residual_norms_match_torch() {
    let f = Fixture::load("norm_residual");
    for (tag, s) in ["f32", "bf16"].iter().flat_map(|t| SHAPES.map(|s| (*t, s))) {
        let get = |n: &str| f.get(&format!("{tag}.{s}.{n}"));
        let bf16 = tag == "bf16";
        for kind in ["add_ln", "add_rms"] {
            let want = |n: &str| get(&format!("{kind}.{n}"));
            let [x, a, r] = vars([get("x"), get("a"), get("r")]);
            let (w, b) = (get("w"), get("b"));
            let norm = || match kind {
                "add_ln" => add_layer_norm(x.as_tensor(), a.as_tensor(), &w, &b, EPS).unwrap(),
                _ => add_rms_norm(x.as_tensor(), a.as_tensor(), &w, EPS).unwrap(),
            };
            let name = |what: &str| format!("{kind} {tag} {s} {what}");
            // the norm's input gradient alone (x's, with y the only output)
            let (y, _) = norm();
            assert_eq!(y.dtype(), x.dtype());
            assert!(passes(&name("y"), &y, &want("y"), bf16, None));
            let dh = &grads_of(&[&y], &[get("dy")], &[&x])[0];
            let dh_norm = want("dh_norm");
            assert!(passes(&name("dh_norm"), dh, &dh_norm, bf16, None));
            // both outputs: the residual path's gradient joins, in either backward order
            for through_y in [true, false] {
                let (y, residual) = norm();
                // r + 0·y: r's value, with the output depending on y as through an MLP
                let m = match through_y {
                    true => (r.as_tensor() + y.affine(0.0, 0.0).unwrap()).unwrap(),
                    false => r.as_tensor().clone(),
                };
                let out = residual.output(&m).unwrap();
                assert_eq!(out.dtype(), x.dtype());
                let name = |what: &str| name(&format!("{what} (output through y: {through_y})"));
                assert!(passes(&name("out"), &out, &want("out"), bf16, None));
                // candle runs the backward of nodes in the reverse of a depth-first post-order
                // from the loss: without the dependency, the loss term first in the sum has its
                // ops run last, so out's term goes first to have the norm op's backward run first
                let g = match through_y {
                    true => grads_of(&[&y, &out], &[get("dy"), get("dout")], &[&x, &a, &r]),
                    false => grads_of(&[&out, &y], &[get("dout"), get("dy")], &[&x, &a, &r]),
                };
                for (what, got) in ["dx", "da", "dr"].iter().zip(&g) {
                    let extra = (*what != "dr").then_some(&dh_norm);
                    assert!(passes(&name(what), got, &want(what), bf16, extra));
                }
            }
            // without the residual path's gradient the checks fail
            assert!(
                !passes(
                    &name("dx (residual dropped)"),
                    dh,
                    &want("dx"),
                    bf16,
                    Some(&dh_norm)
                ),
                "{}: the check cannot tell a dropped residual gradient",
                name("dx")
            );
        }
    }
}

/// A parallel block's output `x + (m + a)` as `residual_add3(m, a, x)`, and its gradients.
#[test]
fn parallel_residual_matches_torch() {
    let f = Fixture::load("norm_residual");
    for (tag, s) in ["f32", "bf16"].iter().flat_map(|t| SHAPES.map(|s| (*t, s))) {
        let get = |n: &str| f.get(&format!("{tag}.{s}.{n}"));
        let [x, a, m] = vars([get("x"), get("a"), get("r")]);
        let out = residual_add3(m.as_tensor(), a.as_tensor(), x.as_tensor()).unwrap();
        let name = format!("parallel {tag} {s} out");
        let want = get("par.out");
        assert!(passes(&name, &out, &want, tag == "bf16", None));
        if tag == "bf16" {
            // torch's two roundings exactly, not one: bit for bit
            assert_eq!(to_vec(&out), to_vec(&want), "{name}: not torch's roundings");
        }
        let dout = get("dout");
        for (v, g) in [&x, &a, &m].iter().zip(grads_of(
            &[&out],
            std::slice::from_ref(&dout),
            &[&x, &a, &m],
        )) {
            assert_eq!(
                to_vec(&g),
                to_vec(&dout),
                "{tag} {s}: gradient of {:?}",
                v.dims()
            );
        }
    }
}

#[test]
fn norm_ops_check_their_operands() {
    let dev = &Device::Cpu;
    let z = |dims: &[usize], dt: DType| Tensor::zeros(dims, dt, dev).unwrap();
    let (x, w) = (z(&[2, 8], DType::F32), z(&[8], DType::F32));
    assert!(
        layer_norm(&x, &z(&[7], DType::F32), &w, EPS).is_err(),
        "weight shape"
    );
    assert!(
        layer_norm(&x, &w, &z(&[9], DType::F32), EPS).is_err(),
        "bias shape"
    );
    assert!(
        add_rms_norm(&x, &z(&[2, 7], DType::F32), &w, EPS).is_err(),
        "a's shape"
    );
    let (_, residual) = add_rms_norm(&x, &x, &w, EPS).unwrap();
    assert!(
        residual.output(&z(&[2, 9], DType::F32)).is_err(),
        "m's shape"
    );
    assert!(
        add_rms_norm(&x, &z(&[2, 8], DType::BF16), &w, EPS).is_err(),
        "a's dtype"
    );
    assert!(
        residual_add3(&x, &x, &z(&[2, 8], DType::BF16)).is_err(),
        "dtype"
    );
    assert!(
        layer_norm(&z(&[2, 8], DType::U32), &w, &w, EPS).is_err(),
        "integers"
    );
    // a transposed view is made contiguous first
    let f = Fixture::load("norm_residual");
    let (x, w, b) = (f.get("f32.s0.x"), f.get("f32.s0.w"), f.get("f32.s0.b"));
    let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
    let want = to_vec(&layer_norm(&x, &w, &b, EPS).unwrap());
    assert_eq!(to_vec(&layer_norm(&xt, &w, &b, EPS).unwrap()), want);
}
