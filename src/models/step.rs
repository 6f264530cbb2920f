//! The model's steps over any [`Decoder`]: the forward, the loss, evaluation without a graph, and
//! the checkpointed training step (with its per-row variant for objectives over whole sequences),
//! each with the head's targets (shifted labels; the prompt rows' predictions where there are).
use super::{cerr, Decoder};
use crate::nn::{self, fused};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// A batch as a step reads it: token ids `(B, T)`, the optional padding mask `(B, T)` (1 on
/// real tokens) and the labels `(B, T)` (-100 ignored; shifted here).
#[derive(Clone, Copy)]
pub struct Tokens<'a> {
    /// Token ids `(B, T)` u32.
    pub ids: &'a Tensor,
    /// Padding mask `(B, T)`, or None for none.
    pub mask: Option<&'a Tensor>,
    /// Labels `(B, T)` i64.
    pub labels: &'a Tensor,
}

impl<'a> Tokens<'a> {
    /// The batch of `ids`, `mask` and `labels`.
    pub fn new(ids: &'a Tensor, mask: Option<&'a Tensor>, labels: &'a Tensor) -> Self {
        Tokens { ids, mask, labels }
    }
}

fn check_batch(ids: &Tensor) -> Result<(usize, usize, Vec<u32>)> {
    let (b, t) = ids
        .dims2()
        .map_err(|_| Error::Invalid(format!("input ids must be (B, T), got {:?}", ids.dims())))?;
    let v = ids
        .to_dtype(DType::U32)
        .and_then(|x| x.flatten_all()?.to_vec1::<u32>())
        .map_err(cerr("input ids"))?;
    Ok((b, t, v))
}

/// Shifted targets: row `b*T + t` predicts `labels[b, t+1]`; -100 where ignored or past the end.
fn targets(labels: &Tensor, b: usize, t: usize) -> Result<Vec<i64>> {
    if labels.dims() != [b, t] {
        return Err(Error::Invalid(format!(
            "labels have shape {:?}, expected ({b}, {t}) like the input ids",
            labels.dims()
        )));
    }
    let l = labels
        .to_dtype(DType::I64)
        .and_then(|x| x.flatten_all()?.to_vec1::<i64>())
        .map_err(cerr("labels"))?;
    Ok((0..b * t)
        .map(|n| if n % t + 1 < t { l[n + 1] } else { -100 })
        .collect())
}

/// With prompt rows (N > 0) the head reads positions N-1..N+T-1: the last virtual row predicts
/// the first token (PEFT prepends N labels of -100 and shifts), so row `b*(T+1) + j` predicts
/// `labels[b, j]` (j < T) and the last row nothing. Without: [`targets`] over `T` rows.
fn head_targets<M: Decoder>(
    m: &M,
    labels: &Tensor,
    b: usize,
    t: usize,
) -> Result<(Vec<i64>, usize)> {
    if m.prompt_len() == 0 {
        return Ok((targets(labels, b, t)?, t));
    }
    targets(labels, b, t)?; // the shape check
    let l = labels
        .to_dtype(DType::I64)
        .and_then(|x| x.flatten_all()?.to_vec1::<i64>())
        .map_err(cerr("labels"))?;
    let tg = (0..b * (t + 1))
        .map(|n| (n / (t + 1), n % (t + 1)))
        .map(|(r, j)| if j < t { l[r * t + j] } else { -100 })
        .collect();
    Ok((tg, t + 1))
}

/// The rows of `x (B, N + T, C)` the head reads for the loss (see [`head_targets`]).
fn head_rows<M: Decoder>(m: &M, x: Tensor, t: usize) -> Result<Tensor> {
    match m.prompt_len() {
        0 => Ok(x),
        n => x.narrow(1, n - 1, t + 1).map_err(cerr("prompt rows")),
    }
}

/// Final hidden states `(B, N + T, C)` before the last norm (N prompt rows), with the graph, in
/// eval mode (no dropout).
fn hidden<M: Decoder>(m: &M, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, t, v) = check_batch(ids)?;
    let ctx = m.ctx(b, t, mask)?;
    let mut x = m.embed(&v, b, t)?;
    for li in 0..m.num_layers() {
        x = m.layer(li, &x, &ctx, None).map_err(cerr("forward"))?;
    }
    Ok(x)
}

/// The head's input of an evaluation without a graph (each layer's output detached): the hidden
/// rows the head reads, their targets, B and the head rows per sequence.
fn eval_head_input<M: Decoder>(m: &M, s: Tokens<'_>) -> Result<(Tensor, Vec<i64>, usize, usize)> {
    let (b, t, v) = check_batch(s.ids)?;
    let (tg, th) = head_targets(m, s.labels, b, t)?;
    // The same streams as a training step's (see [`streams`]): each row's hidden states do not
    // depend on the split (tests/batch_streams.rs), so this is speed alone.
    let parts = streams(m, b, s.ids.device().is_cpu());
    let batch = StepBatch {
        v: &v,
        t,
        mask: s.mask,
        key: None,
    };
    let ran = on_streams(parts.len(), |si| {
        stream_forward(m, &batch, parts[si], si, Keep::Nothing)
    })?;
    let x = cat_rows(ran.into_iter().map(|(_, x)| x).collect())?;
    Ok((head_rows(m, x, t)?, tg, b, th))
}

/// [`super::CausalLm::eval_loss`] of a [`Decoder`]: [`loss`]'s value, computed without keeping a graph.
pub fn eval_loss<M: Decoder>(m: &M, s: Tokens<'_>) -> Result<f32> {
    let _awake = crate::nn::awake::Awake::start(m.hidden_size());
    let (x, tg, b, th) = eval_head_input(m, s)?;
    loss_of(m, &x, &tg, b, th)?
        .to_dtype(DType::F32)
        .and_then(|l| l.to_scalar::<f32>())
        .map_err(cerr("loss"))
}

/// The last `t` positions of `x (B, N + T, C)`: the tokens' hidden states after any prompt rows.
fn drop_prompt<M: Decoder>(m: &M, x: Tensor, t: usize) -> Result<Tensor> {
    match m.prompt_len() {
        0 => Ok(x),
        n => x.narrow(1, n, t).map_err(cerr("prompt rows")),
    }
}

/// [`super::CausalLm::forward`] of a [`Decoder`]: all logits at once (tests, small inputs).
pub fn forward<M: Decoder>(m: &M, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (_, t, _) = check_batch(ids)?;
    let x = drop_prompt(m, hidden(m, ids, mask)?, t)?;
    m.final_norm(&x)
        .and_then(|x| m.lm_head().forward(&x))
        .and_then(|l| l.to_dtype(DType::F32))
        .map_err(cerr("lm_head"))
}

/// `(Σ CE, targets)` of the hidden rows `x (B, T, C)` (before the final norm) through the fused
/// head, with the graph.
fn head_sum<M: Decoder>(
    m: &M,
    x: &Tensor,
    tg: &[i64],
    b: usize,
    t: usize,
) -> Result<(Tensor, usize)> {
    // On the CPU the fused norm and cross-entropy take the rows as they are (no reshape node: a
    // head of fused ops alone is one the step walks itself, see `train_with`).
    let x = match x.device().is_cpu() {
        true => m.final_norm(x),
        false => x
            .reshape((b * t, m.hidden_size()))
            .and_then(|x| m.final_norm(&x)),
    }
    .map_err(cerr("final norm"))?;
    fused::cross_entropy_chunked(&x, m.lm_head(), tg, m.ce_chunk()).map_err(cerr("loss"))
}

fn loss_of<M: Decoder>(m: &M, x: &Tensor, tg: &[i64], b: usize, t: usize) -> Result<Tensor> {
    let (sum, n) = head_sum(m, x, tg, b, t)?;
    if n == 0 {
        return Err(Error::Invalid(
            "no target tokens: every label is -100".into(),
        ));
    }
    // `sum / n` as candle's affine computes it (`sum · f32(1/n)`), as an op of ours
    let inv = Tensor::new((1.0 / n as f64) as f32, sum.device())
        .and_then(|k| k.to_dtype(sum.dtype()))
        .map_err(cerr("loss"))?;
    nn::mul_const(&sum, &inv).map_err(cerr("loss"))
}

/// [`super::CausalLm::loss`] of a [`Decoder`]: mean shifted cross-entropy, eval mode, with the graph.
pub fn loss<M: Decoder>(m: &M, s: Tokens<'_>) -> Result<Tensor> {
    let (b, t, _) = check_batch(s.ids)?;
    let (tg, th) = head_targets(m, s.labels, b, t)?;
    let x = head_rows(m, hidden(m, s.ids, s.mask)?, t)?;
    loss_of(m, &x, &tg, b, th)
}

/// Adds the gradients in `grads` of the adapter tensors of `layer` (None: all) and of the
/// sequence-level tensors (shared by the layers: their parts are summed) to `out`.
fn collect<M: Decoder>(
    m: &M,
    grads: &GradStore,
    layer: Option<usize>,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let vars = match layer {
        Some(usize::MAX) => m.sequence_vars(),
        l => m
            .lora_vars(l)
            .into_iter()
            .chain(m.sequence_vars())
            .collect(),
    };
    for (name, var) in vars {
        let g = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.zeros_like().map_err(cerr("grads"))?,
        };
        let g = match out.remove(&name) {
            Some(prev) => (prev + g).map_err(cerr("grads"))?,
            None => g,
        };
        out.insert(name, g);
    }
    Ok(())
}

/// Each row's summed cross-entropy and target count (`(Σ CE, n)`): a sequence's log-probability is
/// `-Σ CE`.
pub type RowLosses = Vec<(f64, usize)>;

/// The row weights of a training step, from its forward's per-row `(Σ CE, targets)`.
pub type RowWeights<'a> = &'a mut dyn FnMut(&[(f64, usize)]) -> Result<Vec<f64>>;

/// The head of one row per sequence: `(Σ CE of row r with its graph, its targets)` for
/// `x (B, T, C)` before the final norm; rows without a target give `None`.
fn row_heads<M: Decoder>(
    m: &M,
    x: &Tensor,
    tg: &[i64],
    b: usize,
    t: usize,
) -> Result<Vec<Option<(Tensor, usize)>>> {
    (0..b)
        .map(|r| {
            let labels = &tg[r * t..(r + 1) * t];
            if labels.iter().all(|&l| l < 0) {
                return Ok(None);
            }
            let xr = x.narrow(0, r, 1).map_err(cerr("head rows"))?;
            head_sum(m, &xr, labels, 1, t).map(Some)
        })
        .collect()
}

/// The values of [`row_heads`].
fn row_values(heads: &[Option<(Tensor, usize)>]) -> Result<RowLosses> {
    heads
        .iter()
        .map(|h| match h {
            None => Ok((0.0, 0)),
            Some((s, n)) => s
                .to_dtype(DType::F32)
                .and_then(|s| s.to_scalar::<f32>())
                .map(|v| (v as f64, *n))
                .map_err(cerr("loss")),
        })
        .collect()
}

/// [`super::CausalLm::eval_row_losses`] of a [`Decoder`]: per-row sums without keeping a graph.
pub fn eval_row_losses<M: Decoder>(m: &M, s: Tokens<'_>) -> Result<RowLosses> {
    let _awake = crate::nn::awake::Awake::start(m.hidden_size());
    let (x, tg, b, th) = eval_head_input(m, s)?;
    row_values(&row_heads(m, &x, &tg, b, th)?)
}

/// How a training step turns the final hidden states `(B, T, C)` (with their graph) and the
/// shifted targets into the scalar to differentiate, and what it reports.
type Head<'a, M, R> = &'a mut dyn FnMut(&M, &Tensor, &[i64], usize, usize) -> Result<(R, Tensor)>;

/// [`super::CausalLm::train_grads`] of a [`Decoder`]: the mean cross-entropy over every target.
pub fn train_grads<M: Decoder>(m: &M, s: Tokens<'_>) -> Result<(f32, HashMap<String, Tensor>)> {
    train_with(m, s, &mut |m, x, tg, b, t| {
        let loss = loss_of(m, x, tg, b, t)?;
        Ok((loss.to_scalar::<f32>().map_err(cerr("loss"))?, loss))
    })
}

/// [`super::CausalLm::train_grads_rows`] of a [`Decoder`]: the loss `Σ_r w_r·CE_r` over the rows, with
/// the weights `weigh` gives for this forward's row values. Each row's cross-entropy runs as its
/// own head op (the same chunked kernel; a row's gradient depends on that row alone), so no
/// kernel needs per-row weights.
pub fn train_grads_rows<M: Decoder>(
    m: &M,
    s: Tokens<'_>,
    weigh: RowWeights<'_>,
) -> Result<(RowLosses, HashMap<String, Tensor>)> {
    train_with(m, s, &mut |m, x, tg, b, t| {
        let heads = row_heads(m, x, tg, b, t)?;
        let values = row_values(&heads)?;
        let w = weigh(&values)?;
        let mut total: Option<Tensor> = None;
        for (h, &w) in heads.iter().zip(&w) {
            let Some((s, _)) = h else { continue };
            let term = s.affine(w, 0.0).map_err(cerr("loss"))?;
            total = Some(match total {
                None => term,
                Some(t) => (t + term).map_err(cerr("loss"))?,
            });
        }
        let total =
            total.ok_or_else(|| Error::Invalid("no target tokens: every label is -100".into()))?;
        Ok((values, total))
    })
}

/// The training step under any [`Head`]: with checkpointing, only each layer's input is kept
/// through the forward; the backward recomputes one layer at a time (same dropout masks) and the
/// logits are made and freed chunk by chunk. On the CPU a batch of two sequences or more may run
/// as two streams, apart from the head (see [`streams`]).
fn train_with<M: Decoder, R>(
    m: &M,
    s: Tokens<'_>,
    head: Head<'_, M, R>,
) -> Result<(R, HashMap<String, Tensor>)> {
    let (ids, mask) = (s.ids, s.mask);
    // the other workers poll for jobs until the step returns, at small hidden sizes (nn::awake:
    // their wake-ups were a third of the second worker's time on the measuring VM)
    let _awake = crate::nn::awake::Awake::start(m.hidden_size());
    let key = Some(m.next_step_key());
    let (b, t, v) = check_batch(ids)?;
    let (tg, th) = head_targets(m, s.labels, b, t)?;
    if let Some(&l) = tg.iter().find(|&&l| l >= m.vocab_size() as i64) {
        return Err(Error::Invalid(format!(
            "label {l} is outside the vocabulary of {}",
            m.vocab_size()
        )));
    }
    let parts = streams(m, b, ids.device().is_cpu());
    let batch = StepBatch {
        v: &v,
        t,
        mask,
        key,
    };
    // Checkpointed: the forward keeps no graph, only each layer's input (detached). On a GPU
    // those inputs wait in host memory (as Unsloth offloads its checkpoints): B·T·C values per
    // layer cross the bus twice, against a layer's worth of GEMMs, and device memory keeps only
    // the one being recomputed.
    let keep = match m.checkpoint() {
        true => Keep::Checkpoints,
        false => Keep::Graph,
    };
    let (mut st, xs): (Vec<_>, Vec<_>) = on_streams(parts.len(), |si| {
        stream_forward(m, &batch, parts[si], si, keep)
    })?
    .into_iter()
    .unzip();
    let x = cat_rows(xs)?;
    if !m.checkpoint() {
        let x = head_rows(m, x, t)?;
        let (r, loss) = head(m, &x, &tg, b, th)?;
        let grads = fused::backward_collecting(&loss).map_err(cerr("backward"))?;
        let mut out = HashMap::new();
        collect(m, &grads, None, &mut out)?;
        let dtypes = var_dtypes(m);
        for (name, g) in out.iter_mut() {
            *g = rounded(g, dtypes.get(name)).map_err(cerr("grads"))?;
        }
        drop((grads, loss, x, st));
        end_step(parts.len() > 1);
        return Ok((r, out));
    }
    // The forward's transients (each layer's graph, freed as the next runs) are free heap now,
    // but resident: glibc reuses them for small tensors only, and the head's logits chunk (rows
    // × vocab f32, 31 MiB at the 100M shape) goes on top of them. Handing them back here took
    // that shape's peak from +13 % over the plan to +3.4 % (bf16; f32 +13.6 % to +4.5 %, where
    // the layers' backward is the peak now): one more `malloc_trim` a step.
    release_free_heap("forward");
    // Head: the fused cross-entropy makes each chunk's logits in turn and keeps one logsumexp per
    // token, so its backward needs no logits either; the same op as the uncheckpointed loss, so
    // both modes give the same gradient bit for bit.
    // Walked by us where the head ran fused ops alone (the mean cross-entropy on the CPU; a
    // row objective's per-row heads and sums are candle's).
    let xl = Var::from_tensor(&head_rows(m, x.clone(), t)?).map_err(cerr("head"))?;
    let recorded = match own_backward() {
        true => fused::tape::record(|| head(m, xl.as_tensor(), &tg, b, th))
            .map(|(r, tape)| (r, Some(tape))),
        false => head(m, xl.as_tensor(), &tg, b, th).map(|r| (r, None)),
    };
    let ((loss, loss_t), tape) = recorded?;
    let walked = match tape {
        Some(tape) => loss_t
            .ones_like()
            .and_then(|one| fused::backward_tape(tape, &loss_t, one))
            .map_err(cerr("head backward"))?,
        None => None,
    };
    let grads = match walked {
        Some(grads) => {
            OWN_WALKS.fetch_add(1, Ordering::Relaxed);
            grads
        }
        None => loss_t.backward().map_err(cerr("head backward"))?,
    };
    let mut g = grads
        .get(xl.as_tensor())
        .map(|g| g.detach())
        .ok_or_else(|| Error::Invalid("head backward: no gradient for the hidden state".into()))?;
    drop(loss_t);
    // The head's phase ends here: its logits chunk (rows × vocab in f32, 31 MiB at a 32,000
    // vocabulary) is free but glibc keeps its pages, and the plan counts the layers' backward
    // without it (`MemoryPlan::step_activations` takes the larger phase, not the sum).
    release_free_heap("head");
    if m.prompt_len() > 1 {
        // The head reads the last prompt row and the tokens': zeros before them.
        let z = x
            .narrow(1, 0, m.prompt_len() - 1)
            .and_then(|p| p.zeros_like())
            .and_then(|z| Tensor::cat(&[&z, &g], 1))
            .map_err(cerr("prompt rows"))?;
        g = z;
    }
    drop(x);
    let pipelined = pipelined(g.device().is_cpu());
    let (g, mut out) = backward_streams(m, &mut st, g, pipelined)?;
    if m.prompt_len() > 0 {
        // Prompt rows: the embedding step again, with its graph, backpropagating layer 0's input
        // gradient into the sequence-level tensors.
        let x0 = m.embed(&v, b, t)?;
        let gs = (|| {
            let s = nn::mul_const(&x0.to_dtype(DType::F32)?, &g.to_dtype(DType::F32)?)?;
            s.sum_all()?.backward()
        })()
        .map_err(cerr("prompt rows"))?;
        collect(m, &gs, Some(usize::MAX), &mut out)?;
    }
    drop((g, st));
    end_step(pipelined || parts.len() > 1);
    Ok((loss, out))
}

/// What every stream of a step reads: the token ids (B·T), T, the padding mask and the step's
/// dropout key.
struct StepBatch<'a> {
    v: &'a [u32],
    t: usize,
    mask: Option<&'a Tensor>,
    key: Option<u64>,
}

/// One stream of a training step: its batch rows `(first, count)`, per-call constants and
/// dropout key, and the layers' saved inputs (checkpointed).
struct Stream<C> {
    rows: (usize, usize),
    ctx: C,
    key: Option<u64>,
    saved: Vec<Tensor>,
}

/// The batch rows `(first, count)` of each stream of a training step. On the CPU a batch of two
/// sequences or more through sequential blocks (Llama's; see [`Decoder::split_batch`]) runs as
/// two halves side by side on the pool: each through the whole forward on its own, and (from its
/// rows of the head's gradient) through the backward a layer at a time, the two meeting at each
/// layer's end ([`backward_streams`]). Why: at the ~100M shape one op's parallel loop over a
/// few hundred rows left the second worker idle ~40 % of the step (session 20, perf by thread);
/// two streams keep both busy, and each stream's loops still split where a worker is free.
/// Always two, whatever the thread count, so that the sums (a LoRA weight's gradient is the two
/// halves' added) do not depend on it; the uncheckpointed step splits the same way, so both
/// modes agree bit for bit. `QTUNE_STREAMS=0` (or [`BATCH_STREAMS`] cleared) runs the batch as
/// one. One sequence is not split in two (session 21: its halves, a layer apart because the
/// second reads the first's keys and values, gained nothing at the ~100M shape).
fn streams<M: Decoder>(m: &M, b: usize, cpu: bool) -> Vec<(usize, usize)> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("QTUNE_STREAMS").is_ok_and(|v| v == "0"));
    if cpu && b >= 2 && m.split_batch() && !off && BATCH_STREAMS.load(Ordering::Relaxed) {
        let h = b.div_ceil(2);
        vec![(0, h), (h, b - h)]
    } else {
        vec![(0, b)]
    }
}

/// How many streams a batch of `b` sequences runs as through `m` on the CPU (`cpu`) or a GPU,
/// now (see [`streams`]): what `qtune bench` records.
pub fn batch_streams<M: Decoder>(m: &M, b: usize, cpu: bool) -> usize {
    streams(m, b, cpu).len()
}

/// Cleared (tests, comparisons), a training step runs its batch as one stream (see [`streams`]).
pub static BATCH_STREAMS: AtomicBool = AtomicBool::new(true);

/// `f(0)`, ..., `f(n - 1)` for one or two streams, two side by side on the pool.
fn on_streams<R: Send>(n: usize, f: impl Fn(usize) -> Result<R> + Sync) -> Result<Vec<R>> {
    match n {
        1 => Ok(vec![f(0)?]),
        _ => {
            let (a, b) = rayon::join(|| f(0), || f(1));
            Ok(vec![a?, b?])
        }
    }
}

/// The streams' tensors `(b_i, ..)` as one batch `(Σ b_i, ..)`.
fn cat_rows(mut xs: Vec<Tensor>) -> Result<Tensor> {
    match xs.len() {
        1 => Ok(xs.pop().expect("one stream")),
        _ => Tensor::cat(&xs, 0).map_err(cerr("streams")),
    }
}

/// What a stream's forward keeps of its layers.
#[derive(Clone, Copy, PartialEq)]
enum Keep {
    /// The whole graph (an uncheckpointed step).
    Graph,
    /// Each layer's input, detached: no graph survives a layer (a checkpointed step).
    Checkpoints,
    /// Nothing but the final hidden states, without a graph (evaluation).
    Nothing,
}

/// Stream `si`'s forward over its `rows` of the batch: embedding and every layer, keeping what
/// `keep` says; gives the stream and its final hidden states (with their graph for
/// [`Keep::Graph`]). The dropout key of stream `si` is the step's plus `si·2²⁴`, within the step's
/// range of 2³² keys (a layer's linears add `li·P + pi`).
fn stream_forward<M: Decoder>(
    m: &M,
    s: &StepBatch<'_>,
    rows: (usize, usize),
    si: usize,
    keep: Keep,
) -> Result<(Stream<M::Ctx>, Tensor)> {
    let ((r0, n), t) = (rows, s.t);
    let mask = s
        .mask
        .map(|mk| mk.narrow(0, r0, n))
        .transpose()
        .map_err(cerr("mask"))?;
    let ctx = m.ctx(n, t, mask.as_ref())?;
    let key = s.key.map(|k| k.wrapping_add((si as u64) << 24));
    let mut saved = Vec::new();
    let mut x = m.embed(&s.v[r0 * t..(r0 + n) * t], n, t)?;
    for li in 0..m.num_layers() {
        let y = m.layer(li, &x, &ctx, key).map_err(cerr("forward"))?;
        if keep == Keep::Checkpoints {
            saved.push(x.to_device(&Device::Cpu).map_err(cerr("checkpoint"))?);
        }
        x = match keep {
            Keep::Graph => y,
            _ => y.detach(),
        };
    }
    let st = Stream {
        rows,
        ctx,
        key,
        saved,
    };
    Ok((st, x))
}

#[path = "step_backward.rs"]
mod backward;
use backward::{backward_streams, rounded, var_dtypes, OWN_WALKS};
pub(crate) use backward::{own_backward, pipelined};
pub use backward::{own_backward_walks, OWN_BACKWARD, PIPELINED_RECOMPUTE};

/// The end of a training step: the thread's product buffer freed (a step's products grow it
/// again, so it is part of the step's memory, as the plan's step part counts it), then the heap.
/// `others`: other workers ran whole ops too (a pipelined recompute, a second stream), whose
/// buffers go as well.
fn end_step(others: bool) {
    if others {
        // the other workers ran whole forward ops with their own buffers
        rayon::broadcast(|_| crate::lora::qlinear::release_product_buffer());
    } else {
        crate::lora::qlinear::release_product_buffer();
    }
    release_free_heap("step");
}

/// Gives the pages of freed heap memory back to the system (glibc `malloc_trim`; a no-op
/// elsewhere). Why: the step's activations are dead once the layers' backward ends, but glibc
/// keeps the memory they were freed into (holes below live chunks, which no trim threshold
/// reaches), and the optimizer step then pages in its moments on top of it. Measured
/// (tests/llama_rss.rs, bf16, `bench::tune_allocator`'s settings, `mallinfo2`): at the end of
/// step 1 the heap held 27.2 MiB free beside 39.6 MiB in use, and the peak came after the step
/// (+172.9 MiB against a 165.8 MiB plan) rather than inside it; with the mmap threshold pinned,
/// where freed tensors go back at once, the same point was 25 MiB lower. The next step faults
/// those pages in again: one zeroed page per 4 KiB of activations, against the GEMMs of a step.
fn release_free_heap(phase: &str) {
    use crate::nn::device::{heap_probe, trim_heap};
    heap_probe(phase, "before trim");
    trim_heap();
    heap_probe(phase, "after trim");
}
