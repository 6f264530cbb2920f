//! What `qtune train` shows at the end: greedy answers to prompts of the eval data (held out of
//! training) from the base alone and from the base with the new adapter, beside the answers the
//! data expects, and how many answers are exactly right before and after.
use anyhow::Result;
use qtune::data::Tokenizer;
use qtune::export::Adapter;
use qtune::models::generate::{generate, Generator, Sampling};
use qtune::store::WeightStore;
use qtune::train::trainer::Sample;

/// Pairs printed in full.
const SHOWN: usize = 3;
/// Every probe is scored when the base is at most this many stored bytes (the embedded default,
/// test models); a larger base scores only the pairs it shows, to keep the tail of a run short.
const SCORE_ALL_BELOW: usize = 64 << 20;

/// One prompt of the data with the answer it expects.
pub struct Probe {
    prompt: Vec<u32>,
    text: String,
    want: String,
}

impl Probe {
    /// The prompt as text.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Prompts (the ids up to the first trained label) and expected answers (the trained tokens,
/// end-of-sequence left out) of `samples`.
pub fn probes(samples: &[Sample], tok: &Tokenizer) -> Vec<Probe> {
    let (bos, eos) = (tok.bos_id(), tok.eos_id());
    samples
        .iter()
        .filter_map(|s| {
            let n = s.labels.iter().take_while(|&&l| l < 0).count();
            if n == 0 || n == s.ids.len() {
                return None;
            }
            let prompt_text_ids: Vec<u32> = s.ids[..n]
                .iter()
                .copied()
                .filter(|&t| Some(t) != bos)
                .collect();
            let ans: Vec<u32> = s.ids[n..]
                .iter()
                .copied()
                .filter(|&t| Some(t) != eos)
                .collect();
            Some(Probe {
                prompt: s.ids[..n].to_vec(),
                text: tok.decode(&prompt_text_ids).ok()?,
                want: tok.decode(&ans).ok()?,
            })
        })
        .collect()
}

/// The answer: generated text up to end-of-sequence or the end of its first line.
fn answer(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    let eos = tok.eos_id();
    let ids: Vec<u32> = ids
        .iter()
        .copied()
        .take_while(|&t| Some(t) != eos)
        .collect();
    let text = tok.decode(&ids)?;
    Ok(text.lines().next().unwrap_or("").trim_end().to_string())
}

/// Prints the before/after pairs and exact-match counts; `held_out` says whether the probes come
/// from the eval data.
pub fn show(
    store: &WeightStore,
    adapter: &Adapter,
    tok: &Tokenizer,
    probes: &[Probe],
    held_out: bool,
) -> Result<()> {
    if probes.is_empty() {
        return Ok(());
    }
    let n = if store.nbytes() <= SCORE_ALL_BELOW {
        probes.len()
    } else {
        SHOWN.min(probes.len())
    };
    let greedy = Sampling::default();
    let eos: Vec<u32> = tok.eos_id().into_iter().collect();
    let mut got: Vec<Vec<String>> = Vec::new();
    for a in [None, Some(adapter)] {
        let g = Generator::new(store, a)?;
        let mut out = Vec::new();
        for p in &probes[..n] {
            let want_len = tok.encode(&p.want, false).map(|v| v.len()).unwrap_or(16);
            let r = generate(&g, &p.prompt, want_len + 8, &greedy, &eos, |_| {})?;
            out.push(answer(tok, &r.tokens)?);
        }
        got.push(out);
    }
    let mark = |a: &str, w: &str| {
        if a.trim() == w.trim() {
            "right"
        } else {
            "wrong"
        }
    };
    let whose = if held_out {
        "held-out prompt (not in the training data)"
    } else {
        "prompt from the training data (no eval data given)"
    };
    for (i, p) in probes[..n].iter().enumerate().take(SHOWN) {
        println!("{whose}: {:?}", p.text);
        println!("  expected:        {:?}", p.want);
        println!(
            "  before training: {:?} ({})",
            got[0][i],
            mark(&got[0][i], &p.want)
        );
        println!(
            "  after training:  {:?} ({})",
            got[1][i],
            mark(&got[1][i], &p.want)
        );
    }
    let right = |v: &[String]| {
        v.iter()
            .zip(probes)
            .filter(|(a, p)| a.trim() == p.want.trim())
            .count()
    };
    println!(
        "{} answers exactly right: {}/{n} before training, {}/{n} after",
        if held_out { "held-out" } else { "training" },
        right(&got[0]),
        right(&got[1])
    );
    Ok(())
}
