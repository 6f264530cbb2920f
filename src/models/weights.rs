//! Decoder-layer weights as the shared model loads them: row orders undone and quantisation at
//! load, one tensor at a time.
use crate::quant::{dispatch, nf4, QType};
use crate::store::{Bytes, Nf4Stats, StoredTensor, WeightStore};
use crate::{Error, Result};

/// A decoder-layer weight ready for [`QLinear`]: the stored view, or an owned copy when its rows
/// must be put back in Hugging Face order (`hf_of_gguf[g]`: the HF row GGUF row g holds) or it is
/// quantised at load (float types only, with `quant`).
pub(crate) fn load_linear(
    store: &WeightStore,
    t: &StoredTensor,
    hf_of_gguf: Option<&[usize]>,
    quant: Option<QType>,
) -> Result<StoredTensor> {
    let bad = |msg: String| Error::Shape {
        path: store.path.clone(),
        tensor: t.name.clone(),
        msg,
    };
    let (rows, cols) = match t.shape.as_slice() {
        [r, c] => (*r, *c),
        s => return Err(bad(format!("shape {s:?} is not 2-D (out, in)"))),
    };
    let mut t = t.clone();
    if let Some(order) = hf_of_gguf {
        if t.qtype == QType::NF4 || order.len() != rows {
            return Err(bad(format!(
                "cannot undo llama.cpp's row order on {} [{rows}, {cols}] ({} rows expected)",
                t.qtype.name(),
                order.len()
            )));
        }
        let rb = t.qtype.bytes_for(cols).ok_or_else(|| {
            bad(format!(
                "rows of {cols} are not whole {} blocks",
                t.qtype.name()
            ))
        })?;
        if t.data.len() != rb * rows {
            return Err(bad(format!(
                "{} bytes stored, {} expected",
                t.data.len(),
                rb * rows
            )));
        }
        let src = t.data.as_slice();
        let mut v = vec![0u8; rb * rows];
        for (g, &r) in order.iter().enumerate() {
            v[r * rb..(r + 1) * rb].copy_from_slice(&src[g * rb..(g + 1) * rb]);
        }
        // The mapped rows were read once; the owned copy replaces them.
        t.data.release_pages();
        t.data = Bytes::from_vec(v);
    }
    let Some(q) = quant else { return Ok(t) };
    if !matches!(t.qtype, QType::F32 | QType::F16 | QType::BF16) {
        return Ok(t);
    }
    let n = rows * cols;
    let mut f = vec![0f32; n];
    t.matrix().dequant_tile(0, rows, 0, cols, &mut f);
    // The float source is read once: drop its file pages so loading streams one tensor at a time.
    t.data.release_pages();
    let wrap = |e: Error| bad(format!("quantising to {} at load: {e}", q.name()));
    if q == QType::NF4 {
        let o = nf4::quantize_nf4(&f).map_err(wrap)?;
        t.qtype = QType::NF4;
        t.data = Bytes::from_vec(o.packed);
        t.nf4 = Some(Nf4Stats {
            absmax_q: Bytes::from_vec(o.absmax_q),
            nested_absmax: o.nested_absmax,
            nested_code: o.nested_code,
            code: o.code,
            offset: o.offset,
        });
    } else {
        let nb = q.bytes_for(cols).ok_or_else(|| {
            bad(format!(
                "rows of {cols} are not whole {} blocks; pick another --quant type",
                q.name()
            ))
        })? * rows;
        let mut d = vec![0u8; nb];
        dispatch::quantize(q, &f, &mut d).map_err(wrap)?;
        t.qtype = q;
        t.data = Bytes::from_vec(d);
    }
    Ok(t)
}
