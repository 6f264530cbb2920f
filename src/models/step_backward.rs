//! The checkpointed step's way back through the layers: each stream's layers recomputed one at
//! a time (optionally beside the next one's backward) and differentiated by our walk over their
//! fused ops or by candle's, the streams' gradient parts summed at each layer's end.
use super::*;

/// Every stream's checkpointed backward through the layers from its rows of the head's gradient
/// `g (B, N + T, C)`: layer 0's input gradient (the streams' rows again as one batch) and the
/// adapters' gradients. The streams take each layer side by side and meet at its end, so that
/// their recomputed graphs are alive together as one batch's would be (what the plan counts; run
/// apart, their peaks fell together or not from run to run, and the step's peak with them), and
/// a layer's two gradient parts are added there in f32 and rounded once.
pub(super) fn backward_streams<M: Decoder>(
    m: &M,
    st: &mut [Stream<M::Ctx>],
    g: Tensor,
    pipelined: bool,
) -> Result<(Tensor, HashMap<String, Tensor>)> {
    let mut walks = st
        .iter_mut()
        .map(|s| {
            let (r0, n) = s.rows;
            let g = g
                .narrow(0, r0, n)
                .and_then(|g| g.contiguous())
                .map_err(cerr("streams"))?;
            Ok(Walk {
                // moved: each checkpoint is freed once its layer is recomputed
                saved: std::mem::take(&mut s.saved),
                g,
                ctx: &s.ctx,
                key: s.key,
                next: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    drop(g);
    let dtypes = var_dtypes(m);
    let mut out = HashMap::new();
    for li in (0..m.num_layers()).rev() {
        let parts = match walks.as_mut_slice() {
            [w] => vec![backward_layer(m, w, li, pipelined)?],
            [w0, w1] => {
                let (a, b) = rayon::join(
                    || backward_layer(m, w0, li, pipelined),
                    || backward_layer(m, w1, li, pipelined),
                );
                vec![a?, b?]
            }
            _ => unreachable!("one or two streams"),
        };
        let mut parts = parts.into_iter();
        let first = parts.next().expect("one stream at least");
        let second = parts.next();
        for (name, g) in first {
            let dt = dtypes.get(&name);
            // One part is rounded as the op would have; two are added in f32 first.
            let g = match second.as_ref().and_then(|s| s.get(&name)) {
                Some(h) => g
                    .to_dtype(DType::F32)
                    .and_then(|g| g + h.to_dtype(DType::F32)?)
                    .and_then(|s| rounded(&s, dt)),
                None => rounded(&g, dt),
            };
            add_grad(&mut out, name, g.map_err(cerr("grads"))?)?;
        }
    }
    let gx = walks.into_iter().map(|w| w.g).collect();
    Ok((cat_rows(gx)?, out))
}

/// One stream's way back through the layers: its saved layer inputs (taken last first), the
/// gradient coming into the layer at hand, and the next layer's recompute when pipelined.
struct Walk<'a, C> {
    saved: Vec<Tensor>,
    g: Tensor,
    ctx: &'a C,
    key: Option<u64>,
    next: Option<Recomputed>,
}

/// A layer recomputed for its backward: its input as a variable, its output, and the ops it ran
/// when they are taped (see [`own_backward`]).
type Recomputed = (Var, Tensor, Option<fused::tape::Tape>);

/// The dtype of every adapter tensor by name (linear adapters' and sequence-level).
pub(super) fn var_dtypes<M: Decoder>(m: &M) -> HashMap<String, DType> {
    let vars = m.lora_vars(None).into_iter().chain(m.sequence_vars());
    vars.map(|(n, v)| (n, v.dtype())).collect()
}

/// A gradient in its tensor's dtype (`dt`; unchanged when unknown): the fused LoRA ops' weight
/// gradients leave [`fused::backward_collecting`] in f32 and are rounded here once.
pub(super) fn rounded(g: &Tensor, dt: Option<&DType>) -> candle_core::Result<Tensor> {
    match dt {
        Some(&dt) => fused::round_grad(g, dt),
        None => Ok(g.clone()),
    }
}

/// `out[name] += g` (inserted when absent).
fn add_grad(out: &mut HashMap<String, Tensor>, name: String, g: Tensor) -> Result<()> {
    let g = match out.remove(&name) {
        Some(prev) => (prev + g).map_err(cerr("grads"))?,
        None => g,
    };
    out.insert(name, g);
    Ok(())
}

/// Layer `li` of the checkpointed backward (the layers go last first): recompute it from its
/// saved input (or take the recompute made beside the layer above), backpropagate
/// `sum(out * g)`, and pass dx on in `w.g`; gives the layer's adapter gradients (the fused ops'
/// weights' in f32). Layer li-1's recompute runs beside this backward when `pipelined` (see
/// [`pipelined`]).
fn backward_layer<M: Decoder>(
    m: &M,
    w: &mut Walk<'_, M::Ctx>,
    li: usize,
    pipelined: bool,
) -> Result<HashMap<String, Tensor>> {
    let dev = w.g.device().clone();
    // The recompute's activation dtype (`LlamaOptions::recompute_dtype`): a bf16 step's layers
    // are recomputed and differentiated in f32 on the CPU, their products still bf16.
    let rdt = m.recompute_dtype();
    let (ctx, key) = (w.ctx, w.key);
    let recompute = |li: usize, xin: Tensor| -> Result<Recomputed> {
        let xin = xin
            .to_device(&dev)
            .and_then(|x| x.to_dtype(rdt))
            .map_err(cerr("checkpoint"))?;
        (|| -> candle_core::Result<_> {
            let xv = Var::from_tensor(&xin)?;
            let layer = || m.layer(li, xv.as_tensor(), ctx, key);
            let (y, tape) = match own_backward() {
                true => fused::tape::record(layer).map(|(y, t)| (y, Some(t)))?,
                false => (layer()?, None),
            };
            Ok((xv, y, tape))
        })()
        .map_err(cerr("recompute"))
    };
    let pop = |saved: &mut Vec<Tensor>| saved.pop().expect("one saved input per layer");
    let (xv, y, tape) = match w.next.take() {
        Some(r) => r,
        None => recompute(li, pop(&mut w.saved))?,
    };
    let g = &w.g;
    let backward = || -> Result<_> {
        (|| -> candle_core::Result<_> {
            // Our own walk where the layer ran our ops alone: dy as candle's seed below gives it.
            if let Some(tape) = tape {
                let dy = g.to_dtype(DType::F32)?.to_dtype(y.dtype())?;
                if let Some(gs) = fused::backward_tape(tape, &y, dy)? {
                    OWN_WALKS.fetch_add(1, Ordering::Relaxed);
                    return Ok(gs);
                }
            }
            let s = nn::mul_const(&y.to_dtype(DType::F32)?, &g.to_dtype(DType::F32)?)?.sum_all()?;
            fused::backward_collecting(&s)
        })()
        .map_err(cerr("recompute"))
    };
    let gs = if pipelined && li > 0 {
        let xin = pop(&mut w.saved);
        let (gs, r) = rayon::join(backward, || recompute(li - 1, xin));
        w.next = Some(r?);
        gs?
    } else {
        backward()?
    };
    drop(y);
    let mut layer = HashMap::new();
    collect(m, &gs, Some(li), &mut layer)?;
    if li > 0 || m.prompt_len() > 0 {
        w.g = match gs.get(xv.as_tensor()) {
            Some(gx) => gx.detach(),
            None => xv.as_tensor().zeros_like().map_err(cerr("grads"))?,
        };
    }
    Ok(layer)
}

/// Whether the checkpointed backward recomputes layer li-1 beside layer li's backward: on the
/// CPU with two threads or more, when asked for (`QTUNE_PIPELINE=1`, or [`PIPELINED_RECOMPUTE`]
/// set). Why: candle's backward runs its gradient sums (a zero tensor and an add per edge) and
/// frees on one thread, and the other worker had nothing to do through them; the recompute of the
/// next layer is independent work (its input is a checkpoint) that fills that time: ~100M bf16
/// step 1.08-1.17x (session 19), 1.07-1.13x at batch 1 (session 22; nothing beside a batch's two
/// streams, which keep both workers busy already). Why not by default: that layer's graph is
/// alive beside the backward's (the plan counts it whole), but how much of it exists at the
/// backward's peak depends on the two threads' timing, and their interleaved allocations leave
/// holes the heap keeps: the peak varies run to run by more than the plan can promise. Session
/// 19, glibc's dynamic mmap threshold: tests/llama_rss.rs's shape 190-226 MiB against 215
/// planned. Session 22, the threshold pinned (`bench::tune_allocator`): that shape at batch 1
/// 225-230 MiB against 212-215 in three runs of four (+5 % allowed), and under a pinned
/// threshold tests/falcon_rss.rs's second step used 78-84 % of its planned part (80 % asked),
/// where the one-layer backward measures within 2 MiB run to run. The same gradients bit for
/// bit (tests/pipelined_step.rs).
pub(crate) fn pipelined(cpu: bool) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let asked = *ON.get_or_init(|| std::env::var("QTUNE_PIPELINE").is_ok_and(|v| v != "0"));
    cpu && rayon::current_num_threads() > 1
        && (asked || PIPELINED_RECOMPUTE.load(Ordering::Relaxed))
}

/// Whether the checkpointed backward walks a layer's recorded ops itself ([`fused::tape`]) rather
/// than through candle's backward: by default (candle's walk where the layer ran other ops too);
/// `QTUNE_OWN_BACKWARD=0` or [`OWN_BACKWARD`] cleared gives candle's walk everywhere. Why: candle
/// gives each gradient a zero tensor and an add before anything else (13 % of a ~100M bf16 step's
/// samples at batch 4, session 23); the sums are the same bit for bit (tests/own_backward.rs).
pub(crate) fn own_backward() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("QTUNE_OWN_BACKWARD").is_ok_and(|v| v == "0"));
    !off && OWN_BACKWARD.load(Ordering::Relaxed)
}

/// Cleared (tests, comparisons), the checkpointed backward runs candle's walk (see
/// [`own_backward`]).
pub static OWN_BACKWARD: AtomicBool = AtomicBool::new(true);

pub(super) static OWN_WALKS: AtomicUsize = AtomicUsize::new(0);

/// How many backward passes (a layer's, or the head's) this process walked itself so far (see
/// [`own_backward`]).
pub fn own_backward_walks() -> usize {
    OWN_WALKS.load(Ordering::Relaxed)
}

/// Set (tests), the checkpointed backward is pipelined as `QTUNE_PIPELINE=1` asks (see
/// [`pipelined`]).
pub static PIPELINED_RECOMPUTE: AtomicBool = AtomicBool::new(false);
