//! A layer's (or the head's) backward walked by us over the fused ops it ran, instead of by candle.
//!
//! Why: candle's backward gives every argument of every op a fresh zero tensor on its first
//! gradient and then adds the gradient to it (`zeros + g`, one allocation and three passes where a
//! move would do), and adds the later ones onto that; at the ~100M shape (bf16, batch 4, Intel
//! AMX) those zero fills and adds were 13 % of a training step's samples. While [`record`] runs a
//! forward (one layer's recompute), every fused op also notes itself on a tape: its custom op,
//! its arguments and its output. [`Tape::backward`] then walks the tape from the layer's output
//! and calls each op's own `bwd`, as candle would, in the order candle's backward would (its
//! depth-first topological order, so a gradient with several parts sums them in the same order,
//! bit for bit), but the first part of a gradient is kept as it is and only later parts are added.
//!
//! The tape is only used when it is the whole graph: every argument that carries a graph must be
//! a variable or the output of an op on the tape. A forward that ran any other op on the way
//! (candle's reshapes, a DoRA norm, a prefix's concatenation, an op on a GPU) gives no walk, and
//! the caller runs candle's backward over the graph candle built alongside as before.
use super::{slice_of, zip_map, Elem};
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Result, Storage, Tensor, TensorId,
};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

type Op1 = Arc<Box<dyn CustomOp1 + Send + Sync>>;
type Op2 = Arc<Box<dyn CustomOp2 + Send + Sync>>;
type Op3 = Arc<Box<dyn CustomOp3 + Send + Sync>>;

/// A recorded op of one, two or three arguments.
enum Op {
    One(Op1),
    Two(Op2),
    Three(Op3),
}

/// One op a recorded forward ran: the op, its arguments and its output.
struct Entry {
    op: Op,
    args: Vec<Tensor>,
    out: Tensor,
}

/// The fused ops a forward ran under [`record`], in the order it ran them.
pub struct Tape {
    entries: Vec<Entry>,
}

std::thread_local! {
    /// The tape of the forward running on this thread under [`record`]; `None` outside one (and
    /// inside a backward: see [`suspended`]). Saved and restored around each use, because rayon
    /// may run another stream's job on this thread while one of our ops waits for its workers.
    static TAPE: RefCell<Option<Vec<Entry>>> = const { RefCell::new(None) };
}

/// Puts `tape` in this thread's slot for the length of `f`, then the slot's previous value back.
fn with_slot<R>(tape: Option<Vec<Entry>>, f: impl FnOnce() -> R) -> (R, Option<Vec<Entry>>) {
    let outer = TAPE.with(|t| t.replace(tape));
    let r = f();
    let tape = TAPE.with(|t| t.replace(outer));
    (r, tape)
}

/// `f()` (a forward) with the fused ops it runs on this thread noted on a tape.
pub fn record<R, E>(
    f: impl FnOnce() -> std::result::Result<R, E>,
) -> std::result::Result<(R, Tape), E> {
    let (r, entries) = with_slot(Some(Vec::new()), f);
    let entries = entries.unwrap_or_default();
    Ok((r?, Tape { entries }))
}

/// `f()` with nothing recorded: a backward's `bwd` calls may run ops on arguments that carry a
/// graph, and a job rayon runs here while they wait is not part of the forward being recorded.
pub(crate) fn suspended<R>(f: impl FnOnce() -> R) -> R {
    with_slot(None, f).0
}

/// Notes an op on the running tape, if any and if one of its arguments carries a graph.
fn note(op: impl FnOnce() -> Op, args: &[&Tensor], out: &Tensor) {
    if !args.iter().any(|a| a.track_op()) {
        return;
    }
    TAPE.with(|t| {
        if let Some(entries) = t.borrow_mut().as_mut() {
            entries.push(Entry {
                op: op(),
                args: args.iter().map(|&a| a.clone()).collect(),
                out: out.clone(),
            });
        }
    });
}

/// `x.apply_op1(c)`, noted on the running tape.
pub(crate) fn apply1<C: CustomOp1 + Send + Sync + 'static>(x: &Tensor, c: C) -> Result<Tensor> {
    apply1_arc(x, Arc::new(Box::new(c)))
}

/// `x.apply_op1_arc(c)`, noted on the running tape.
pub(crate) fn apply1_arc(x: &Tensor, c: Op1) -> Result<Tensor> {
    let y = x.apply_op1_arc(c.clone())?;
    note(|| Op::One(c), &[x], &y);
    Ok(y)
}

/// `a.apply_op2(b, c)`, noted on the running tape.
pub(crate) fn apply2<C: CustomOp2 + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    c: C,
) -> Result<Tensor> {
    let c: Op2 = Arc::new(Box::new(c));
    let y = a.apply_op2_arc(b, c.clone())?;
    note(|| Op::Two(c), &[a, b], &y);
    Ok(y)
}

/// `a.apply_op3(b, d, c)`, noted on the running tape.
pub(crate) fn apply3<C: CustomOp3 + Send + Sync + 'static>(
    a: &Tensor,
    b: &Tensor,
    d: &Tensor,
    c: C,
) -> Result<Tensor> {
    let c: Op3 = Arc::new(Box::new(c));
    let y = a.apply_op3_arc(b, d, c.clone())?;
    note(|| Op::Three(c), &[a, b, d], &y);
    Ok(y)
}

impl Tape {
    /// How many ops were noted.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no op was noted.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The gradients of everything on the tape that carries a graph (the variables and the
    /// forward's input included) from `dy`, the gradient of `root`, or `None` when the tape is
    /// not the whole graph from the variables to `root` (see the module docs). Call it inside
    /// `backward_collecting`'s store (`lora::sink`), which holds the LoRA weights' gradients
    /// aside as candle's backward does.
    pub(crate) fn backward(self, root: &Tensor, dy: Tensor) -> Result<Option<GradStore>> {
        let at: HashMap<TensorId, usize> = (self.entries.iter().enumerate())
            .map(|(i, e)| (e.out.id(), i))
            .collect();
        let whole = at.contains_key(&root.id())
            && self.entries.iter().all(|e| {
                e.args
                    .iter()
                    .all(|a| !a.track_op() || a.is_variable() || at.contains_key(&a.id()))
            });
        if !whole {
            return Ok(None);
        }
        let order = self.post_order(at[&root.id()], &at);
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        grads.insert(root.id(), dy);
        for &i in order.iter().rev() {
            let e = &self.entries[i];
            // candle detaches a node's gradient before its op's bwd (no graph of the backward)
            let Some(g) = grads.remove(&e.out.id()).map(|g| g.detach()) else {
                continue;
            };
            let parts = match (&e.op, e.args.as_slice()) {
                (Op::One(c), [a]) => vec![c.bwd(a, &e.out, &g)?],
                (Op::Two(c), [a, b]) => {
                    let (ga, gb) = c.bwd(a, b, &e.out, &g)?;
                    vec![ga, gb]
                }
                (Op::Three(c), [a, b, d]) => {
                    let (ga, gb, gd) = c.bwd(a, b, d, &e.out, &g)?;
                    vec![ga, gb, gd]
                }
                _ => unreachable!("an entry holds as many arguments as its op takes"),
            };
            drop(g);
            for (a, part) in e.args.iter().zip(parts) {
                let Some(part) = part else { continue };
                if !a.track_op() {
                    continue; // a constant: candle keeps its gradient, nobody reads it
                }
                // candle's `zeros + part` is `part` (contiguous); a later part is added as
                // candle adds it
                let sum = match grads.remove(&a.id()) {
                    None => part.contiguous()?,
                    Some(prev) => sum(&prev, &part)?,
                };
                grads.insert(a.id(), sum);
            }
        }
        let mut store = GradStore::default();
        for (id, g) in grads {
            store.insert_id(id, g);
        }
        Ok(Some(store))
    }

    /// The entries that lead from the variables to entry `root` in candle's order
    /// (`Tensor::sorted_nodes` before its reversal): depth first from the root, arguments in
    /// order, each entry after its arguments' entries.
    fn post_order(&self, root: usize, at: &HashMap<TensorId, usize>) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.entries.len());
        let mut seen = HashSet::new();
        // (entry, next argument to visit)
        let mut stack = vec![(root, 0usize)];
        seen.insert(root);
        while let Some((i, next)) = stack.pop() {
            let args = &self.entries[i].args;
            match args.get(next) {
                None => order.push(i),
                Some(a) => {
                    stack.push((i, next + 1));
                    if let Some(&j) = at.get(&a.id()) {
                        if seen.insert(j) {
                            stack.push((j, 0));
                        }
                    }
                }
            }
        }
        order
    }
}

/// `a + b` as candle's add gives it (the same bits), on the pool: a half-precision sum rounds each
/// element's f32 sum once with a SIMD rounding (candle's CPU bf16 add rounds element by element
/// behind a feature check per vector, and a bf16 recompute's gradient sums took 44 % of its ~100M
/// step that way, session 23); an f32 sum is the same add on both threads (candle's runs on the
/// calling thread alone: 2 % of a ~100M bf16 step at batch 1, the other worker idle, session 24).
fn sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let ours = matches!(a.dtype(), DType::BF16 | DType::F16 | DType::F32);
    if !ours || !a.device().is_cpu() || a.dtype() != b.dtype() || a.dims() != b.dims() {
        return a.add(b);
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (dims, cpu) = (a.dims(), &Device::Cpu);
    // the storage guards borrow `a` and `b`: the result is bound before they go
    let v = match (&*sa, &*sb) {
        (Storage::Cpu(CpuStorage::BF16(x)), Storage::Cpu(CpuStorage::BF16(y))) => {
            let (x, y) = (slice_of(x, la, "sum")?, slice_of(y, lb, "sum")?);
            Tensor::from_vec(zip_map(x, y, |p, q| p.f() + q.f()), dims, cpu)
        }
        (Storage::Cpu(CpuStorage::F32(x)), Storage::Cpu(CpuStorage::F32(y))) => {
            let (x, y) = (slice_of(x, la, "sum")?, slice_of(y, lb, "sum")?);
            Tensor::from_vec(zip_map(x, y, |p, q| p + q), dims, cpu)
        }
        (Storage::Cpu(CpuStorage::F16(x)), Storage::Cpu(CpuStorage::F16(y))) => {
            let (x, y) = (slice_of(x, la, "sum")?, slice_of(y, lb, "sum")?);
            Tensor::from_vec(zip_map(x, y, |p, q| p.f() + q.f()), dims, cpu)
        }
        _ => a.add(&b),
    };
    v
}

#[cfg(test)]
mod tests {
    use super::super::{backward_collecting, backward_tape, rms_norm, swiglu};
    use super::*;
    use candle_core::{Device, Var};

    /// `x (4, 8)` as a variable, a norm weight, and a gradient for a `(4, 8)` output.
    fn inputs() -> (Var, Tensor, Tensor) {
        let vals = |n: usize, k: f32| (0..n).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
        let cpu = &Device::Cpu;
        let x = Var::from_tensor(&Tensor::from_vec(vals(32, 0.7), (4, 8), cpu).unwrap()).unwrap();
        let w = Tensor::from_vec(vals(8, 1.3), 8, cpu).unwrap();
        let dy = Tensor::from_vec(vals(32, 0.9), (4, 8), cpu).unwrap();
        (x, w, dy)
    }

    #[test]
    fn walk_gives_candles_gradient() {
        let (x, w, dy) = inputs();
        // x reaches y twice (through the norm and directly): two parts to sum
        let fwd = || swiglu(&rms_norm(x.as_tensor(), &w, 1e-5)?, x.as_tensor());
        let (y, tape) = record(fwd).unwrap();
        assert_eq!(tape.len(), 2);
        let ours = backward_tape(tape, &y, dy.clone()).unwrap().expect("whole");
        let s = crate::nn::mul_const(&y, &dy).unwrap().sum_all().unwrap();
        let theirs = backward_collecting(&s).unwrap();
        let get = |g: &GradStore| g.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(get(&ours), get(&theirs));
    }

    #[test]
    fn a_candle_op_on_the_way_gives_no_walk() {
        let (x, w, dy) = inputs();
        let fwd = || {
            swiglu(
                &rms_norm(x.as_tensor(), &w, 1e-5)?.affine(2.0, 0.0)?,
                x.as_tensor(),
            )
        };
        let (y, tape) = record(fwd).unwrap();
        assert!(backward_tape(tape, &y, dy).unwrap().is_none());
        // and outside `record` nothing is noted
        let (_, tape) = record(|| Ok::<_, candle_core::Error>(())).unwrap();
        swiglu(x.as_tensor(), x.as_tensor()).unwrap();
        assert!(tape.is_empty());
    }
}
