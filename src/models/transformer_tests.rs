//! Tests of the shared decoder (`transformer.rs`): its sequence hooks against running the prefix
//! tokens, and the checkpointed step against plain autograd.
use super::*;
use crate::models::Decoder;

/// Trainable prompt rows.
struct Rows(Var);
impl SequenceAdapter for Rows {
    fn prompt_rows(&self) -> Option<Tensor> {
        Some(self.0.as_tensor().clone())
    }
    fn params(&self) -> Vec<(String, Var)> {
        vec![("prompt_embeddings".into(), self.0.clone())]
    }
}

/// A trainable key/value prefix per layer, `(KVH, N, D)` each.
struct Prefix(Vec<(Var, Var)>);
impl SequenceAdapter for Prefix {
    fn kv_prefix(&self, layer: usize) -> Option<(Tensor, Tensor)> {
        let (k, v) = self.0.get(layer)?;
        Some((k.as_tensor().clone(), v.as_tensor().clone()))
    }
    fn prefix_len(&self) -> usize {
        self.0[0].0.dim(1).unwrap()
    }
    fn params(&self) -> Vec<(String, Var)> {
        let kv = self.0.iter().enumerate();
        kv.flat_map(|(i, (k, v))| [(format!("k{i}"), k.clone()), (format!("v{i}"), v.clone())])
            .collect()
    }
}

/// The checkpointed step's gradients of the sequence-level tensors equal plain autograd's.
fn same_grads_with_and_without_checkpointing(m: &mut Transformer, ids: &Tensor, lab: &Tensor) {
    m.opts.checkpoint = true;
    let (la, ga) = m.train_grads(ids, None, lab).unwrap();
    m.opts.checkpoint = false;
    let (lb, gb) = m.train_grads(ids, None, lab).unwrap();
    m.opts.checkpoint = true;
    assert!((la - lb).abs() < 1e-6 * la.abs());
    assert_eq!(ga.len(), gb.len());
    assert!(!ga.is_empty());
    for (n, a) in &ga {
        let r = rel(a, &gb[n]);
        assert!(r < 1e-5, "{n}: {r}");
        let norm = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{n} has no gradient");
    }
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let s = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / s.to_scalar::<f32>().unwrap()
}

/// Both sequence hooks are checked against running their tokens: prompt rows that are the
/// embeddings of tokens P, and a KV prefix that is the (rotated) cache of P, must give the
/// logits of P followed by the ids, at the ids' positions; the loss and the checkpointed step
/// with prompt rows are the loss over those positions.
#[test]
fn sequence_hooks_equal_running_the_prefix_tokens() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama");
    let store = WeightStore::open(&dir.join("model")).unwrap();
    let mut m = crate::models::open(&store, LlamaOptions::default()).unwrap();
    let (p, ids) = ([5u32, 9, 2], [7u32, 11, 3, 4, 8]);
    let all: Vec<u32> = p.iter().chain(&ids).copied().collect();
    let row = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let want = m
        .forward(&row(&all), None)
        .unwrap()
        .narrow(1, p.len(), ids.len())
        .unwrap();
    let dev = Device::Cpu;
    let rows = crate::models::embed_rows(&m.embed, &p, (1, 3), DType::F32, &dev, &m.path);
    let rows = Var::from_tensor(&rows.unwrap().squeeze(0).unwrap()).unwrap();
    m.set_sequence_adapter(Some(Box::new(Rows(rows))));
    assert_eq!(m.prompt_len(), 3);
    let got = m.forward(&row(&ids), None).unwrap();
    assert!(rel(&got, &want) < 1e-5, "prompt rows: {}", rel(&got, &want));
    // Labels: the ids' own; on the full sequence the prompt tokens are -100.
    let lab = |v: &[i64]| Tensor::new(v, &dev).unwrap().unsqueeze(0).unwrap();
    let ids_lab: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    // PEFT's convention: the last prompt row predicts the first id.
    let mut full_lab = vec![-100i64; p.len()];
    full_lab.extend(&ids_lab);
    let (l_rows, _) = m.train_grads(&row(&ids), None, &lab(&ids_lab)).unwrap();
    same_grads_with_and_without_checkpointing(&mut m, &row(&ids), &lab(&ids_lab));
    m.set_sequence_adapter(None);
    let l_full = m.loss(&row(&all), None, &lab(&full_lab)).unwrap();
    let l_full = l_full.to_scalar::<f32>().unwrap();
    assert!(
        (l_rows - l_full).abs() < 1e-5 * l_full.abs(),
        "{l_rows} {l_full}"
    );
    // KV prefix: the cache of P, whose keys carry P's rotary.
    let mut cache = Vec::new();
    m.decode_step(&p, 0, &mut cache).unwrap();
    let kv = cache
        .into_iter()
        .map(|c| {
            let (k, v) = c.unwrap();
            let var = |x: Tensor| Var::from_tensor(&x.squeeze(0).unwrap()).unwrap();
            (var(k), var(v))
        })
        .collect();
    m.set_sequence_adapter(Some(Box::new(Prefix(kv))));
    let got = m.forward(&row(&ids), None).unwrap();
    assert!(rel(&got, &want) < 1e-5, "KV prefix: {}", rel(&got, &want));
    // ... and decoding after the prefix: the last position's logits again.
    let mut cache = Vec::new();
    let l = m.decode_step(&ids, 0, &mut cache).unwrap();
    assert!(rel(&l, &want.squeeze(0).unwrap()) < 1e-5);
    same_grads_with_and_without_checkpointing(&mut m, &row(&ids), &lab(&ids_lab));
}
