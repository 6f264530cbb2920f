//! The tensor types qtune reads, with ggml's type ids and block geometry (ggml's `ggml_type_traits`).

/// A stored tensor element type: plain floats, ggml block quants, or bitsandbytes NF4.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    /// bitsandbytes NormalFloat-4, blocks of 64 (statistics stored beside the packed data).
    NF4,
}

/// Elements in a K-quant super-block.
pub const QK_K: usize = 256;

impl QType {
    /// Every type, in ggml id order (NF4 last).
    pub const ALL: [QType; 14] = [
        QType::F32,
        QType::F16,
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q2_K,
        QType::Q3_K,
        QType::Q4_K,
        QType::Q5_K,
        QType::Q6_K,
        QType::BF16,
        QType::NF4,
    ];

    /// ggml's numeric type id (`enum ggml_type`); NF4 has none.
    pub fn ggml_id(self) -> Option<u32> {
        Some(match self {
            QType::F32 => 0,
            QType::F16 => 1,
            QType::Q4_0 => 2,
            QType::Q4_1 => 3,
            QType::Q5_0 => 6,
            QType::Q5_1 => 7,
            QType::Q8_0 => 8,
            QType::Q2_K => 10,
            QType::Q3_K => 11,
            QType::Q4_K => 12,
            QType::Q5_K => 13,
            QType::Q6_K => 14,
            QType::BF16 => 30,
            QType::NF4 => return None,
        })
    }

    /// The type with ggml id `id`, if qtune supports it.
    pub fn from_ggml_id(id: u32) -> Option<QType> {
        QType::ALL.into_iter().find(|t| t.ggml_id() == Some(id))
    }

    /// ggml's name of a type id, also for ids we do not support (for error messages).
    pub fn ggml_name_of_id(id: u32) -> String {
        const NAMES: [&str; 40] = [
            "F32",
            "F16",
            "Q4_0",
            "Q4_1",
            "Q4_2",
            "Q4_3",
            "Q5_0",
            "Q5_1",
            "Q8_0",
            "Q8_1",
            "Q2_K",
            "Q3_K",
            "Q4_K",
            "Q5_K",
            "Q6_K",
            "Q8_K",
            "IQ2_XXS",
            "IQ2_XS",
            "IQ3_XXS",
            "IQ1_S",
            "IQ4_NL",
            "IQ3_S",
            "IQ2_S",
            "IQ4_XS",
            "I8",
            "I16",
            "I32",
            "I64",
            "F64",
            "IQ1_M",
            "BF16",
            "Q4_0_4_4",
            "Q4_0_4_8",
            "Q4_0_8_8",
            "TQ1_0",
            "TQ2_0",
            "IQ4_NL_4_4",
            "IQ4_NL_4_8",
            "IQ4_NL_8_8",
            "MXFP4",
        ];
        match NAMES.get(id as usize) {
            Some(n) => format!("{n} (ggml type id {id})"),
            None => format!("ggml type id {id}"),
        }
    }

    /// Short name as llama.cpp and `qtune inspect` print it.
    pub fn name(self) -> &'static str {
        match self {
            QType::F32 => "F32",
            QType::F16 => "F16",
            QType::BF16 => "BF16",
            QType::Q4_0 => "Q4_0",
            QType::Q4_1 => "Q4_1",
            QType::Q5_0 => "Q5_0",
            QType::Q5_1 => "Q5_1",
            QType::Q8_0 => "Q8_0",
            QType::Q2_K => "Q2_K",
            QType::Q3_K => "Q3_K",
            QType::Q4_K => "Q4_K",
            QType::Q5_K => "Q5_K",
            QType::Q6_K => "Q6_K",
            QType::NF4 => "NF4",
        }
    }

    /// Parses a name as the CLI accepts it (case-insensitive: `q4_0`, `q4_k`, `nf4`, `bf16`, ...).
    pub fn parse(s: &str) -> Option<QType> {
        let u = s.to_ascii_uppercase();
        QType::ALL.into_iter().find(|t| t.name() == u)
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            QType::F32 | QType::F16 | QType::BF16 => 1,
            QType::Q4_0 | QType::Q4_1 | QType::Q5_0 | QType::Q5_1 | QType::Q8_0 => 32,
            QType::Q2_K | QType::Q3_K | QType::Q4_K | QType::Q5_K | QType::Q6_K => QK_K,
            QType::NF4 => 64,
        }
    }

    /// Bytes per block (for NF4: the packed nibbles only; statistics are separate tensors).
    pub fn type_size(self) -> usize {
        match self {
            QType::F32 => 4,
            QType::F16 | QType::BF16 => 2,
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::Q2_K => 84,
            QType::Q3_K => 110,
            QType::Q4_K => 144,
            QType::Q5_K => 176,
            QType::Q6_K => 210,
            QType::NF4 => 32,
        }
    }

    /// Bytes of `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let bs = self.block_size();
        n.is_multiple_of(bs).then(|| n / bs * self.type_size())
    }

    /// Storage bits per weight (NF4 with double quant: 4 + 8/64 + 32/(64*256)).
    pub fn bits_per_weight(self) -> f64 {
        match self {
            QType::NF4 => 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0),
            t => t.type_size() as f64 * 8.0 / t.block_size() as f64,
        }
    }

    /// True for block-quantised types (not plain floats).
    pub fn is_quantized(self) -> bool {
        !matches!(self, QType::F32 | QType::F16 | QType::BF16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for t in QType::ALL {
            if let Some(id) = t.ggml_id() {
                assert_eq!(QType::from_ggml_id(id), Some(t));
            }
            assert_eq!(QType::parse(&t.name().to_lowercase()), Some(t));
        }
        assert_eq!(QType::from_ggml_id(9), None); // Q8_1: not a storage type
        assert!(QType::ggml_name_of_id(16).starts_with("IQ2_XXS"));
    }

    #[test]
    fn bits_per_weight() {
        assert_eq!(QType::Q4_0.bits_per_weight(), 4.5);
        assert_eq!(QType::Q8_0.bits_per_weight(), 8.5);
        assert_eq!(QType::Q4_K.bits_per_weight(), 4.5);
        assert_eq!(QType::Q6_K.bits_per_weight(), 6.5625);
        assert!((QType::NF4.bits_per_weight() - 4.127).abs() < 1e-3);
    }
}
