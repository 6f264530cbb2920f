//! PEFT adapter directories: the adapters PEFT 0.13.2 saved (tests/reference/gen_llama_fixtures.py)
//! load with the values PEFT held in memory; save -> load round-trips; every bad input is a named
//! error.
use candle_core::{DType, Device, Tensor};
use qtune::lora::adapter::{
    check_compatible, load_peft, parse_peft_name, save_peft, strip_adapter_name, AdapterConfig,
    LoraPart, TargetModules, CONFIG_FILE, WEIGHTS_FILE,
};
use qtune::lora::LoraConfig;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn peft_saved_adapters_load_with_peft_values() {
    for tag in ["f32", "q8_0", "nf4"] {
        let (cfg, tensors) = load_peft(&fixtures().join(tag).join("adapter")).unwrap();
        assert_eq!(cfg.r, 4);
        assert_eq!(cfg.lora_alpha, 8.0);
        assert_eq!(cfg.scale(), 2.0);
        assert!(!cfg.use_rslora);
        let TargetModules::List(t) = &cfg.target_modules else {
            panic!("list expected")
        };
        assert_eq!(t.len(), 7);
        // 2 layers x 7 projections x (A, B)
        assert_eq!(tensors.len(), 28);
        // adapter_init holds PEFT's in-memory parameters (names with the adapter name "default").
        let init = candle_core::safetensors::load(
            fixtures().join(tag).join("adapter_init.safetensors"),
            &Device::Cpu,
        )
        .unwrap();
        let init: HashMap<String, Tensor> = init
            .into_iter()
            .map(|(n, t)| (strip_adapter_name(&n), t))
            .collect();
        assert_eq!(init.len(), tensors.len());
        for (name, t) in &tensors {
            let want = init
                .get(name)
                .unwrap_or_else(|| panic!("{name} not in adapter_init"));
            assert_eq!(t.dtype(), DType::F32);
            assert_eq!(t.dims(), want.dims(), "{name}");
            assert_eq!(bits(t), bits(want), "{tag} {name}");
            let (module, part) = parse_peft_name(name).unwrap();
            let d = t.dims();
            match part {
                LoraPart::A => assert_eq!(d[0], 4, "{module}"),
                LoraPart::B => assert_eq!(d[1], 4, "{module}"),
            }
        }
    }
}

#[test]
fn config_json_round_trips_peft_file() {
    let path = fixtures().join("f32/adapter").join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).unwrap();
    let cfg = AdapterConfig::from_json(&path, &text).unwrap();
    let ours: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
    let peft: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        ours, peft,
        "to_json must write back PEFT's config unchanged"
    );
    let again = AdapterConfig::from_json(&path, &cfg.to_json()).unwrap();
    assert_eq!(again, cfg);
}

#[test]
fn new_config_has_peft_keys() {
    let lora = LoraConfig {
        r: 8,
        alpha: 16.0,
        rslora: true,
        dropout: 0.05,
        dtype: DType::BF16,
    };
    let cfg = AdapterConfig::new(&lora, vec!["q_proj".into()], Some("meta/x".into()));
    let v: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
    let peft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("f32/adapter").join(CONFIG_FILE)).unwrap(),
    )
    .unwrap();
    // Every key PEFT 0.13.2 writes (auto_mapping is PEFT's own bookkeeping, absent for CAUSAL_LM).
    for k in peft.as_object().unwrap().keys() {
        if k != "auto_mapping" {
            assert!(v.get(k).is_some(), "missing key {k}");
        }
    }
    assert_eq!(v["lora_alpha"], serde_json::json!(16));
    assert_eq!(v["lora_dropout"], serde_json::json!(0.05));
    assert_eq!(v["task_type"], serde_json::json!("CAUSAL_LM"));
    assert_eq!(v["use_rslora"], serde_json::json!(true));
    assert_eq!(cfg.lora_config(DType::BF16), lora);
}

#[test]
fn save_load_round_trip_keeps_dtype_and_values() {
    let (cfg, tensors) = load_peft(&fixtures().join("f32/adapter")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let t: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        let dir = tmp.path().join(format!("out/{dtype:?}"));
        save_peft(&dir, &cfg, &t).unwrap();
        let (cfg2, back) = load_peft(&dir).unwrap();
        assert_eq!(cfg2, cfg);
        assert_eq!(back.len(), t.len());
        for ((n1, a), (n2, b)) in t.iter().zip(&back) {
            assert_eq!(n1, n2);
            assert_eq!(b.dtype(), dtype);
            assert_eq!(bits(a), bits(b), "{n1}");
        }
        // The safetensors metadata PEFT/transformers write.
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }
    // Saving again over an adapter replaces it, leaving no .tmp/.old behind.
    let dir = tmp.path().join("out/F32");
    let halved: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), (t * 0.5).unwrap()))
        .collect();
    save_peft(&dir, &cfg, &halved).unwrap();
    let (_, back) = load_peft(&dir).unwrap();
    assert_eq!(bits(&back[0].1), bits(&halved[0].1));
    let names: Vec<_> = std::fs::read_dir(tmp.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.contains(".tmp") && !n.contains(".old")),
        "{names:?}"
    );
}

#[test]
fn save_refuses_to_replace_a_non_adapter_directory() {
    let (cfg, tensors) = load_peft(&fixtures().join("f32/adapter")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("precious.txt"), "x").unwrap();
    let err = save_peft(tmp.path(), &cfg, &tensors)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a directory qtune wrote"), "{err}");
    assert!(tmp.path().join("precious.txt").exists());
}

#[test]
fn adapter_name_is_stripped() {
    assert_eq!(
        strip_adapter_name(
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    let saved = "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight";
    assert_eq!(strip_adapter_name(saved), saved);
    assert_eq!(
        parse_peft_name(saved),
        Some(("model.layers.0.mlp.up_proj", LoraPart::B))
    );
    assert_eq!(parse_peft_name("model.layers.0.mlp.up_proj.weight"), None);
}

// ---- bad inputs ----

const GOOD_CFG: &str = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
  "bias": "none", "task_type": "CAUSAL_LM"}"#;

fn write_dir(dir: &Path, cfg: &str, tensors: &[(&str, (usize, usize))]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), cfg).unwrap();
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, s)| {
            (
                n.to_string(),
                Tensor::ones(*s, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    candle_core::safetensors::save(&map, dir.join(WEIGHTS_FILE)).unwrap();
}

const QA: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
const QB: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";

fn load_err(cfg: &str, tensors: &[(&str, (usize, usize))]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    write_dir(tmp.path(), cfg, tensors);
    load_peft(tmp.path()).unwrap_err().to_string()
}

#[test]
fn good_minimal_adapter_loads() {
    let tmp = tempfile::tempdir().unwrap();
    write_dir(tmp.path(), GOOD_CFG, &[(QA, (2, 8)), (QB, (6, 2))]);
    let (cfg, t) = load_peft(tmp.path()).unwrap();
    assert_eq!(cfg.r, 2);
    assert_eq!(t.len(), 2);
}

#[test]
fn config_errors_name_file_and_key() {
    let pair = [(QA, (2, 8)), (QB, (6, 2))];
    let cases: &[(&str, &str)] = &[
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (
            r#"{"peft_type": "LORA", "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
            "key 'r' is missing",
        ),
        (
            r#"{"peft_type": "LORA", "r": "four", "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
            "key 'r' is \"four\"",
        ),
        (
            r#"{"peft_type": "LORA", "r": 0, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
            "key 'r' is 0",
        ),
        (
            r#"{"peft_type": "PREFIX_TUNING", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}"#,
            "key 'peft_type'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": "x", "target_modules": ["q_proj"]}"#,
            "key 'lora_alpha'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#,
            "key 'target_modules' is missing",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [1]}"#,
            "key 'target_modules'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_dora": "yes"}"#,
            "key 'use_dora'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "bias": "all"}"#,
            "key 'bias'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "fan_in_fan_out": true}"#,
            "key 'fan_in_fan_out'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "lora_dropout": 1.5}"#,
            "key 'lora_dropout'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 8}}"#,
            "key 'rank_pattern'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}"#,
            "key 'modules_to_save'",
        ),
        (
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_rslora": "yes"}"#,
            "key 'use_rslora'",
        ),
    ];
    for (cfg, want) in cases {
        let err = load_err(cfg, &pair);
        assert!(err.contains(CONFIG_FILE), "{err}");
        assert!(err.contains(want), "{cfg}: {err}");
    }
}

#[test]
fn tensor_errors_are_named() {
    type Tensors<'a> = &'a [(&'a str, (usize, usize))];
    let cases: &[(Tensors, &[&str])] = &[
        // Not a LoRA A/B name (e.g. a full model weight, or the in-memory name with "default").
        (
            &[
                (QA, (2, 8)),
                (QB, (6, 2)),
                ("model.layers.0.self_attn.q_proj.weight", (6, 8)),
            ],
            &[
                "model.layers.0.self_attn.q_proj.weight",
                "not a LoRA weight name",
            ],
        ),
        (
            &[
                (
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
                    (2, 8),
                ),
                (QB, (6, 2)),
            ],
            &["lora_A.default.weight", "not a LoRA weight name"],
        ),
        // A without B and B without A.
        (&[(QA, (2, 8))], &[QB, "not found", "both A and B"]),
        (&[(QB, (6, 2))], &[QA, "not found"]),
        // Rank mismatch with r = 2.
        (
            &[(QA, (4, 8)), (QB, (6, 4))],
            &[QA, "rank mismatch", "r = 2"],
        ),
        (&[(QA, (2, 8)), (QB, (6, 3))], &[QB, "rank mismatch"]),
        // A module target_modules does not name.
        (
            &[
                (
                    "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                    (2, 8),
                ),
                (
                    "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight",
                    (6, 2),
                ),
            ],
            &["mlp.up_proj", "target_modules"],
        ),
    ];
    for (tensors, wants) in cases {
        let err = load_err(GOOD_CFG, tensors);
        assert!(err.contains(WEIGHTS_FILE), "{err}");
        for w in *wants {
            assert!(err.contains(w), "want '{w}' in: {err}");
        }
    }
}

#[test]
fn missing_and_corrupt_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_peft(tmp.path()).unwrap_err().to_string();
    assert!(err.contains(CONFIG_FILE), "{err}");
    std::fs::write(tmp.path().join(CONFIG_FILE), GOOD_CFG).unwrap();
    let err = load_peft(tmp.path()).unwrap_err().to_string();
    assert!(err.contains(WEIGHTS_FILE), "{err}");
    std::fs::write(tmp.path().join(WEIGHTS_FILE), [1u8, 2, 3]).unwrap();
    let err = load_peft(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains(WEIGHTS_FILE) && err.contains("safetensors"),
        "{err}"
    );
    // No tensors at all.
    let none: HashMap<String, Tensor> = HashMap::new();
    candle_core::safetensors::save(&none, tmp.path().join(WEIGHTS_FILE)).unwrap();
    let err = load_peft(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("no LoRA weights"), "{err}");
    // An integer tensor.
    let map: HashMap<String, Tensor> = [(
        QA.to_string(),
        Tensor::zeros((2, 8), DType::U32, &Device::Cpu).unwrap(),
    )]
    .into();
    candle_core::safetensors::save(&map, tmp.path().join(WEIGHTS_FILE)).unwrap();
    let err = load_peft(tmp.path()).unwrap_err().to_string();
    assert!(
        err.contains(QA) && err.contains("unsupported type"),
        "{err}"
    );
}

#[test]
fn save_validates_names() {
    let cfg = AdapterConfig::from_json(Path::new("x"), GOOD_CFG).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let t = Tensor::ones((2, 8), DType::F32, &Device::Cpu).unwrap();
    let err = save_peft(&tmp.path().join("a"), &cfg, &[(QA.to_string(), t)])
        .unwrap_err()
        .to_string();
    assert!(err.contains(QB), "{err}");
    assert!(!tmp.path().join("a").exists() && !tmp.path().join("a.tmp").exists());
}

#[test]
fn adapter_for_another_model_is_refused() {
    let dir = fixtures().join("f32/adapter");
    let (cfg, tensors) = load_peft(&dir).unwrap();
    let expected: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    check_compatible(&dir, &cfg, &tensors, &expected).unwrap();

    // A model with hidden 128 instead of 64: q_proj's A is (4, 128).
    let mut wider = expected.clone();
    let q = wider
        .iter_mut()
        .find(|(n, _)| n.ends_with("layers.0.self_attn.q_proj.lora_A.weight"))
        .unwrap();
    q.1 = vec![4, 128];
    let err = check_compatible(&dir, &cfg, &tensors, &wider)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.0.self_attn.q_proj.lora_A.weight"),
        "{err}"
    );
    assert!(err.contains("[4, 64]") && err.contains("[4, 128]"), "{err}");
    assert!(
        err.contains("another model") || err.contains("does not fit"),
        "{err}"
    );

    // A model with 3 layers: layer 2's factors are missing.
    let mut deeper = expected.clone();
    deeper.push((
        "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight".into(),
        vec![4, 128],
    ));
    let err = check_compatible(&dir, &cfg, &tensors, &deeper)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.2.mlp.down_proj.lora_A.weight") && err.contains("missing"),
        "{err}"
    );

    // A model with 1 layer: layer 1's factors are extra.
    let shallower: Vec<_> = expected
        .iter()
        .filter(|(n, _)| !n.contains("layers.1."))
        .cloned()
        .collect();
    let err = check_compatible(&dir, &cfg, &tensors, &shallower)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.1.") && err.contains("not a LoRA factor of this model"),
        "{err}"
    );
    assert!(
        err.contains("more"),
        "14 extra factors are summarised: {err}"
    );
}

/// Writes adapters for tests/reference/check_peft_adapter.py (PEFT loads them): the f32 fixture's
/// adapter with A * 0.5 and B * -2 (exact), as f32 and as bf16, into `$QTUNE_PEFT_CHECK_DIR/{f32,bf16}`
/// (a temporary directory when unset).
#[test]
fn export_for_peft_check() {
    let (cfg, tensors) = load_peft(&fixtures().join("f32/adapter")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let root =
        std::env::var_os("QTUNE_PEFT_CHECK_DIR").map_or(tmp.path().to_path_buf(), PathBuf::from);
    let changed: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let k = if n.ends_with("lora_A.weight") {
                0.5
            } else {
                -2.0
            };
            (n.clone(), (t * k).unwrap())
        })
        .collect();
    let lora = cfg.lora_config(DType::F32);
    let targets = match &cfg.target_modules {
        TargetModules::List(l) => l.clone(),
        TargetModules::Regex(_) => unreachable!(),
    };
    let fresh = AdapterConfig::new(&lora, targets, None);
    for dtype in [DType::F32, DType::BF16] {
        let t: Vec<(String, Tensor)> = changed
            .iter()
            .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
            .collect();
        let dir = root.join(if dtype == DType::F32 { "f32" } else { "bf16" });
        save_peft(&dir, &fresh, &t).unwrap();
        assert_eq!(load_peft(&dir).unwrap().1.len(), 28);
    }
}

#[test]
fn save_peft_vars_writes_the_vars() {
    let (cfg, tensors) = load_peft(&fixtures().join("f32/adapter")).unwrap();
    let vars: Vec<(String, candle_core::Var)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), candle_core::Var::from_tensor(t).unwrap()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    qtune::lora::adapter::save_peft_vars(&tmp.path().join("a"), &cfg, &vars).unwrap();
    let (_, back) = load_peft(&tmp.path().join("a")).unwrap();
    for ((_, a), (_, b)) in tensors.iter().zip(&back) {
        assert_eq!(bits(a), bits(b));
    }
}
