//! Weight gradients of the fused LoRA ops handed to the gradient store directly.
//!
//! Why: candle's backward accumulates every gradient it is given onto a zero tensor of the
//! argument's dtype (`zeros + g`), and its CPU bf16 add runs ~28 ns an element (a 16 × 2048
//! factor: 0.9 ms, against 7 µs in f32; measured with candle-core 0.11.1 on the Intel AMX
//! machine). A bf16 adapter's A and B took ~80 ms of the ~100M shape's ~1 s step that way. Inside
//! [`backward_collecting`] the ops' dA and dB go aside instead and are put into the store after
//! candle's backward, added to whatever candle accumulated for the same variable (one add, as
//! candle's own would be); everywhere else the ops return them to candle as before. Held aside,
//! they stay f32: a weight's gradient may be the sum of two parts (a batch's two streams, see
//! `models::step`), and rounding each part to bf16 before the sum cost up to 1.4 % of the largest
//! value where the parts cancel; the caller rounds the sum once ([`super::round_grad`]).
use super::super::tape::{suspended, Tape};
use super::super::tensor_of;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, TensorId};
use std::cell::RefCell;

std::thread_local! {
    /// The gradients held aside (f32) by the running [`backward_collecting`] (candle runs a
    /// backward, and so the ops' `bwd`, on the calling thread); `None` outside one.
    static HELD: RefCell<Option<Vec<(TensorId, Tensor)>>> = const { RefCell::new(None) };
}

/// `loss.backward()`, with the fused LoRA ops' weight gradients put into the store directly (see
/// the module docs), **in f32**: summed in f32 where a weight served more than one op, and with
/// whatever candle accumulated for it; the caller rounds each to its weight's dtype once
/// ([`super::round_grad`]), which gives the ops' own rounding bit for bit where there is one part.
pub fn backward_collecting(loss: &Tensor) -> Result<GradStore> {
    let grads = collecting(|| loss.backward().map(Some))?;
    Ok(grads.expect("candle's backward gives a store"))
}

/// [`backward_collecting`] by our own walk over a layer's recorded ops from `dy`, the gradient of
/// its output `root` ([`Tape::backward`]): `None` when the tape is not the whole graph, and
/// nothing ran.
pub fn backward_tape(tape: Tape, root: &Tensor, dy: Tensor) -> Result<Option<GradStore>> {
    collecting(|| tape.backward(root, dy))
}

/// The store of `backward()` (candle's or ours; `None`: none ran) with the weight gradients the
/// ops held aside meanwhile added in. Nothing is recorded on a tape meanwhile.
fn collecting(backward: impl FnOnce() -> Result<Option<GradStore>>) -> Result<Option<GradStore>> {
    let outer = HELD.with(|h| h.borrow_mut().replace(Vec::new()));
    let grads = suspended(backward);
    let held = HELD.with(|h| std::mem::replace(&mut *h.borrow_mut(), outer));
    let Some(mut grads) = grads? else {
        return Ok(None);
    };
    for (id, g) in held.unwrap_or_default() {
        let g = match grads.get_id(id) {
            Some(prev) => prev.to_dtype(DType::F32)?.add(&g)?,
            None => g,
        };
        grads.insert_id(id, g);
    }
    Ok(Some(grads))
}

/// The gradient `g` (f32 values) of an op's weight argument `w`, for the op to return to candle
/// in `w`'s dtype: `None` when it was held aside in f32 (`w` is a variable, inside
/// [`backward_collecting`]).
pub(super) fn weight_grad(w: &Tensor, g: Vec<f32>) -> Result<Option<Tensor>> {
    HELD.with(|h| match h.borrow_mut().as_mut() {
        Some(held) if w.is_variable() => {
            held.push((w.id(), Tensor::from_vec(g, w.dims(), &Device::Cpu)?));
            Ok(None)
        }
        _ => tensor_of(g, w.dims(), w.dtype()).map(Some),
    })
}
