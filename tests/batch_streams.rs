//! A CPU batch of two sequences or more through sequential blocks runs as two independent
//! streams (`models::step::streams`): against the whole batch as one stream, the same loss and
//! evaluation loss bit for bit (each row's forward does not depend on the split) and the same
//! gradients to the dtype's rounding (a LoRA weight's gradient is now the two halves' sum); with
//! two streams the step is the same bit for bit on one thread and on two (bf16); with dropout the
//! second stream draws its own masks. In bf16 the gradients are the same bit for bit where the
//! kernels do not depend on the number of rows (the AVX-512 BF16 ones; with AMX, in a child
//! without it). Llama with padding; Falcon's parallel blocks keep one stream. One test in its own
//! binary: it flips a process-wide switch.
mod common;

use candle_core::{DType, Tensor};
use qtune::models::{batch_streams, CausalLm, Falcon, Llama, BATCH_STREAMS};
use qtune::quant::matmul_bf16::{has_amx, has_avx512_bf16};
use qtune::store::WeightStore;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;

type Step = (f32, HashMap<String, Tensor>, f32);
type Load<'a> = dyn Fn() -> Box<dyn CausalLm> + Sync + 'a;

/// One step and one evaluation of a freshly loaded model, streams on or off, on `threads`.
fn run(load: &Load, vocab: u32, on: bool, threads: usize) -> Step {
    let (ids, mask, labels) = common::step_batch(vocab);
    BATCH_STREAMS.store(on, Ordering::Relaxed);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let r = pool.install(|| {
        let m = load();
        common::perturb_lora_b(m.as_ref());
        let (l, g) = m.train_grads(&ids, Some(&mask), &labels).unwrap();
        let e = m.eval_loss(&ids, Some(&mask), &labels).unwrap();
        (l, g, e)
    });
    BATCH_STREAMS.store(true, Ordering::Relaxed);
    r
}

fn check(load: &Load, vocab: u32, dtype: DType, what: &str) {
    // the fixture batch has two sequences: two streams
    assert_eq!(batch_streams(load().decoder(), 2, true), 2);
    let (l1, g1, e1) = run(load, vocab, false, 2);
    let (l2, g2, e2) = run(load, vocab, true, 2);
    assert_eq!(l1.to_bits(), l2.to_bits(), "{what}: loss {l2} vs {l1}");
    assert_eq!(e1.to_bits(), e2.to_bits(), "{what}: eval loss {e2} vs {e1}");
    assert_eq!(g1.len(), g2.len());
    let tol = match dtype {
        DType::F32 => Some(1e-5),
        // AMX runs whole 16-row tiles and the AVX-512 BF16 micro-tiles the rows past them, whose
        // f32 sums associate differently: a row's input gradient depends on how many rows the
        // product has (12 a stream here against 24), and bf16 roundings downstream carry that
        // to ~1e-2. Checked in a child without AMX (below), where the kernels do not depend on
        // the rows, and the streams change the step not at all.
        _ if has_amx() => None,
        _ if has_avx512_bf16() => Some(0.0),
        // the f32 kernels under a bf16 step: the gemm crate's tiles follow the rows
        _ => Some(1e-2),
    };
    for (name, g) in g1.iter().filter(|_| tol.is_some()) {
        let e = common::max_rel_any(&g2[name], g);
        assert!(
            e <= tol.unwrap(),
            "{what}: {name} off by {e:e} with streams"
        );
    }
    if dtype == DType::BF16 {
        // our bf16 kernels' sums do not depend on the thread count, and two streams are two
        // whatever the pool
        let (l3, g3, _) = run(load, vocab, true, 1);
        assert_eq!(l2.to_bits(), l3.to_bits(), "{what}: loss on one thread");
        for (name, g) in &g2 {
            let e = common::max_rel_any(&g3[name], g);
            assert!(e == 0.0, "{what}: {name} off by {e:e} on one thread");
        }
    }
}

#[test]
fn batch_streams_keep_the_step() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let llama = WeightStore::open(&root.join("llama/model")).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let load = || -> Box<dyn CausalLm> {
            Box::new(Llama::load(&llama, common::step_opts(dtype, 0.0)).unwrap())
        };
        check(&load, 300, dtype, &format!("llama {dtype:?}"));
    }
    // Falcon's parallel blocks run a batch as one stream (`Decoder::split_batch`).
    let store = WeightStore::open(&root.join("falcon/mq/model")).unwrap();
    let falcon = Falcon::load(&store, common::step_opts(DType::F32, 0.0)).unwrap();
    assert_eq!(batch_streams(falcon.decoder(), 2, true), 1);
    // With dropout the second stream's masks are its own: the loss moves.
    let load = || -> Box<dyn CausalLm> {
        Box::new(Llama::load(&llama, common::step_opts(DType::F32, 0.3)).unwrap())
    };
    let (l1, _, e1) = run(&load, 300, false, 2);
    let (l2, _, e2) = run(&load, 300, true, 2);
    assert_ne!(
        l1.to_bits(),
        l2.to_bits(),
        "dropout: the same loss with streams"
    );
    assert_eq!(e1.to_bits(), e2.to_bits(), "dropout: evaluation has none");
}

/// Where the CPU has AMX, [`batch_streams_keep_the_step`] again in a child process with
/// `QTUNE_NO_AMX=1`: the bf16 gradients with and without streams bit for bit.
#[test]
fn batch_streams_without_amx() {
    if !has_amx() {
        eprintln!("no AMX here: the test above compared the bf16 gradients");
        return;
    }
    common::rerun_without_amx("batch_streams_keep_the_step");
}
