//! Weight gradients of the fused LoRA ops handed to the gradient store directly.
//!
//! Why: candle's backward accumulates every gradient it is given onto a zero tensor of the
//! argument's dtype (`zeros + g`), and its CPU bf16 add runs ~28 ns an element (a 16 × 2048
//! factor: 0.9 ms, against 7 µs in f32; measured with candle-core 0.11.1 on the Intel AMX
//! machine). A bf16 adapter's A and B took ~80 ms of the ~100M shape's ~1 s step that way. Inside
//! [`backward_collecting`] the ops' dA and dB go aside instead and are put into the store after
//! candle's backward, added to whatever candle accumulated for the same variable (one add, as
//! candle's own would be); everywhere else the ops return them to candle as before.
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use std::cell::RefCell;

std::thread_local! {
    /// The gradients held aside by the running [`backward_collecting`] (candle runs a backward,
    /// and so the ops' `bwd`, on the calling thread); `None` outside one.
    static HELD: RefCell<Option<Vec<(TensorId, Tensor)>>> = const { RefCell::new(None) };
}

/// `loss.backward()`, with the fused LoRA ops' weight gradients put into the store directly (see
/// the module docs); the same gradients, bit for bit.
pub fn backward_collecting(loss: &Tensor) -> Result<GradStore> {
    let outer = HELD.with(|h| h.borrow_mut().replace(Vec::new()));
    let grads = loss.backward();
    let held = HELD.with(|h| std::mem::replace(&mut *h.borrow_mut(), outer));
    let mut grads = grads?;
    for (id, g) in held.unwrap_or_default() {
        let g = match grads.get_id(id) {
            Some(prev) => prev.add(&g)?,
            None => g,
        };
        grads.insert_id(id, g);
    }
    Ok(grads)
}

/// The gradient `g` of an op's weight argument `w`, for the op to return to candle: `None` when it
/// was held aside (`w` is a variable, inside [`backward_collecting`]).
pub(super) fn weight_grad(w: &Tensor, g: Tensor) -> Option<Tensor> {
    if !w.is_variable() {
        return Some(g);
    }
    HELD.with(|h| match h.borrow_mut().as_mut() {
        Some(held) => {
            held.push((w.id(), g));
            None
        }
        None => Some(g),
    })
}
