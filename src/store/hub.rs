//! Hugging Face Hub model ids for `--model`: `org/name[@revision]` (a safetensors or bnb-4bit
//! repository) and `org/name[@revision]:QUANT` or `--gguf-file NAME` (one file of a GGUF
//! repository, llama.cpp's `-hf` convention). [`resolve_model`] turns a spec into a local path,
//! the one place every command calls.
//!
//! Downloads go through the `hf-hub` crate into the cache layout Python's `huggingface_hub` uses
//! (`blobs/` named by ETag, `snapshots/<commit>/` links, `refs/<revision>`), so a model fetched by
//! either is found by the other. Environment, as in Python: `HF_HUB_CACHE` (or `HF_HOME`/hub,
//! default `~/.cache/huggingface/hub`), `HF_ENDPOINT`, `HF_TOKEN` (or the token file under
//! `HF_HOME`), `HF_HUB_OFFLINE=1` (cache only). Only the files a model needs are fetched: config,
//! tokenizer files and the weight shards, or the one GGUF file. A partial download resumes from its
//! `.part` file; a cached file is never fetched again.
use crate::{Error, Result};
use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};

/// Files of a safetensors repository besides the weights, fetched when the repository has them.
const SIDE_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "adapter_config.json",
];

/// The quantisation llama.cpp picks in a GGUF repository when `:QUANT` is not given.
const DEFAULT_QUANT: &str = "Q4_K_M";

/// A parsed Hub model id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSpec {
    /// `org/name`.
    pub repo: String,
    /// Branch, tag or commit (default `main`).
    pub revision: String,
    /// What to take from a GGUF repository: a quantisation tag or a file name.
    pub gguf: Option<GgufPick>,
}

/// Which GGUF file of a repository to fetch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GgufPick {
    /// The file whose name carries this tag (`Q4_K_M`), case-insensitive.
    Quant(String),
    /// This exact file name.
    File(String),
}

/// Where and how the Hub is reached; [`HubOptions::from_env`] reads what Python reads.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Base URL (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// The hub cache directory holding `models--org--name/`.
    pub cache_dir: PathBuf,
    /// Bearer token for private or gated repositories.
    pub token: Option<String>,
    /// Never touch the network; a cache miss is an error.
    pub offline: bool,
    /// Draw a progress bar per file on stderr.
    pub progress: bool,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubOptions {
    /// The settings `huggingface_hub` would use in this environment.
    pub fn from_env() -> HubOptions {
        let home_dir = || {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default()
        };
        let hf_home = env("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
            env("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| home_dir().join(".cache"))
                .join("huggingface")
        });
        let cache_dir = env("HF_HUB_CACHE")
            .or_else(|| env("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = env("HF_TOKEN").or_else(|| {
            let p = env("HF_TOKEN_PATH")
                .map(PathBuf::from)
                .unwrap_or_else(|| hf_home.join("token"));
            std::fs::read_to_string(p)
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        HubOptions {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            cache_dir,
            token,
            offline: env("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            progress: env("HF_HUB_DISABLE_PROGRESS_BARS").is_none_or(|v| !truthy(&v)),
        }
    }
}

fn valid_part(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Parses `org/name[@revision][:QUANT]`; `None` when `spec` is not shaped like a Hub id (then it
/// is a local path). `gguf_file` (`--gguf-file`) names the GGUF file and excludes `:QUANT`.
pub fn parse_spec(spec: &str, gguf_file: Option<&str>) -> Result<Option<HubSpec>> {
    let (rest, quant) = match spec.rsplit_once(':') {
        Some((r, q)) if !q.contains('/') => (r, Some(q)),
        _ => (spec, None),
    };
    let (id, rev) = match rest.split_once('@') {
        Some((i, r)) => (i, Some(r)),
        None => (rest, None),
    };
    let Some((org, name)) = id.split_once('/') else {
        return Ok(None);
    };
    if !valid_part(org) || !valid_part(name) || name.ends_with(".gguf") {
        return Ok(None);
    }
    let bad = |what: &str| Error::Invalid(format!("--model {spec}: {what}"));
    let revision = match rev {
        Some("") => return Err(bad("empty revision after '@'")),
        Some(r) => r.to_string(),
        None => "main".into(),
    };
    let gguf = match (quant, gguf_file) {
        (Some(_), Some(_)) => {
            return Err(bad(
                "give the quantisation as ':QUANT' or --gguf-file, not both",
            ))
        }
        (Some(""), None) => return Err(bad("empty quantisation after ':'")),
        (Some(q), None) => Some(GgufPick::Quant(q.to_string())),
        (None, Some(f)) => Some(GgufPick::File(f.to_string())),
        (None, None) => None,
    };
    Ok(Some(HubSpec {
        repo: id.to_string(),
        revision,
        gguf,
    }))
}

/// A local path as given, or the cached files of a Hub model id (downloaded first if needed).
/// A local path that exists always wins over a Hub id.
pub fn resolve_model(spec: &Path, gguf_file: Option<&str>) -> Result<PathBuf> {
    resolve_with(spec, gguf_file, &HubOptions::from_env())
}

/// [`resolve_model`] with explicit settings (tests point it at a local server).
pub fn resolve_with(spec: &Path, gguf_file: Option<&str>, opts: &HubOptions) -> Result<PathBuf> {
    if spec.exists() {
        if gguf_file.is_some() && spec.is_file() {
            return Err(Error::Invalid(format!(
                "--gguf-file picks a file of a Hub repository; {} is already a local file",
                spec.display()
            )));
        }
        return Ok(spec.to_path_buf());
    }
    let s = spec.to_string_lossy();
    let Some(hub) = parse_spec(&s, gguf_file)? else {
        return Err(Error::Io {
            path: spec.to_path_buf(),
            err: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "does not exist (nor is it a Hugging Face id such as org/name)",
            ),
        });
    };
    if opts.offline {
        return from_cache(&hub, opts, None);
    }
    match download(&hub, opts) {
        Err(HubFail::Network(msg)) => {
            // as Python does: with no network, what the cache holds is still usable
            from_cache(&hub, opts, Some(&msg))
        }
        Err(HubFail::Other(e)) => Err(e),
        Ok(p) => Ok(p),
    }
}

enum HubFail {
    Network(String),
    Other(Error),
}

impl From<Error> for HubFail {
    fn from(e: Error) -> Self {
        HubFail::Other(e)
    }
}

/// A clear message for an `hf-hub` error while fetching `what` of `hub`.
fn fail(hub: &HubSpec, opts: &HubOptions, what: Option<&str>, e: ApiError) -> HubFail {
    let at = format!("{}@{}", hub.repo, hub.revision);
    if let ApiError::RequestError(re) = &e {
        match &**re {
            ureq::Error::Status(code, resp) => {
                let code_hdr = resp.header("x-error-code").unwrap_or("").to_string();
                let msg = match (what, *code) {
                    (Some(f), 404)
                        if code_hdr != "RepoNotFound" && code_hdr != "RevisionNotFound" =>
                    {
                        format!("{at} has no file {f} on {}", opts.endpoint)
                    }
                    (_, 404) if code_hdr == "RevisionNotFound" => format!(
                        "{}: no revision '{}' on {} (check the branch, tag or commit after '@')",
                        hub.repo, hub.revision, opts.endpoint
                    ),
                    (_, 401 | 403 | 404) => format!(
                        "repository {} not found on {} (HTTP {code}); check the id, or set \
                         HF_TOKEN if it is private or gated",
                        hub.repo, opts.endpoint
                    ),
                    (_, c) => format!(
                        "{}: HTTP {c} from {}{}",
                        at,
                        opts.endpoint,
                        what.map(|f| format!(" fetching {f}")).unwrap_or_default()
                    ),
                };
                return HubFail::Other(Error::Invalid(msg));
            }
            ureq::Error::Transport(t) => {
                return HubFail::Network(format!("cannot reach {} for {at}: {t}", opts.endpoint))
            }
        }
    }
    HubFail::Other(Error::Invalid(format!(
        "{at}{}: {e}",
        what.map(|f| format!(" ({f})")).unwrap_or_default()
    )))
}

/// Lists the repository, then fetches the files the model needs (cached ones are not fetched).
fn download(hub: &HubSpec, opts: &HubOptions) -> std::result::Result<PathBuf, HubFail> {
    let api = ApiBuilder::new()
        .with_endpoint(opts.endpoint.clone())
        .with_cache_dir(opts.cache_dir.clone())
        .with_token(opts.token.clone())
        .with_progress(opts.progress)
        .with_retries(2)
        .build()
        .map_err(|e| fail(hub, opts, None, e))?;
    let repo: ApiRepo = api.repo(Repo::with_revision(
        hub.repo.clone(),
        RepoType::Model,
        hub.revision.clone(),
    ));
    let info = repo.info().map_err(|e| fail(hub, opts, None, e))?;
    let names: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let get = |f: &str| repo.get(f).map_err(|e| fail(hub, opts, Some(f), e));
    let files = pick_files(hub, &names, |f| {
        let p = get(f).map_err(|e| match e {
            HubFail::Other(e) => e,
            HubFail::Network(m) => Error::Invalid(m),
        })?;
        std::fs::read_to_string(&p).map_err(|e| Error::io(p, e))
    })?;
    let mut last = None;
    for f in &files {
        last = Some(get(f)?);
    }
    let path = last.ok_or_else(|| HubFail::Other(Error::Invalid("no files picked".into())))?;
    Ok(model_path(hub, &path, &files))
}

/// The directory of a safetensors model, or the GGUF file itself.
fn model_path(hub: &HubSpec, last: &Path, files: &[String]) -> PathBuf {
    let is_gguf = hub.gguf.is_some() || files.iter().all(|f| f.ends_with(".gguf"));
    if is_gguf {
        return last.to_path_buf();
    }
    // snapshots/<commit>/<file>: the directory is the snapshot (files may sit in subfolders)
    let depth = files.last().map(|f| f.split('/').count()).unwrap_or(1);
    let mut dir = last.to_path_buf();
    for _ in 0..depth {
        dir.pop();
    }
    dir
}

/// The files to fetch from a repository listing `names`: the picked GGUF file, or the side files
/// and weights of a safetensors model (shards read from the index through `read`).
fn pick_files(
    hub: &HubSpec,
    names: &[String],
    mut read: impl FnMut(&str) -> Result<String>,
) -> Result<Vec<String>> {
    let at = format!("{}@{}", hub.repo, hub.revision);
    let ggufs: Vec<&String> = names.iter().filter(|n| n.ends_with(".gguf")).collect();
    let has = |f: &str| names.iter().any(|n| n == f);
    let gguf_choice = |pick: &GgufPick| -> Result<Vec<String>> {
        match pick {
            GgufPick::File(f) if has(f) => Ok(vec![f.clone()]),
            GgufPick::File(f) => Err(Error::Invalid(format!(
                "{at} has no file {f}; its GGUF files: {}",
                list(&ggufs)
            ))),
            GgufPick::Quant(q) => pick_quant(&at, q, &ggufs).map(|f| vec![f]),
        }
    };
    if let Some(p) = &hub.gguf {
        return gguf_choice(p);
    }
    let weights_single = has("model.safetensors");
    let index = "model.safetensors.index.json";
    if has("config.json") && (weights_single || has(index)) {
        let mut files: Vec<String> = SIDE_FILES
            .iter()
            .filter(|f| has(f))
            .map(|f| f.to_string())
            .collect();
        if weights_single {
            files.push("model.safetensors".into());
        } else {
            files.push(index.into());
            let text = read(index)?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Invalid(format!("{at}: {index} is not valid JSON: {e}")))?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            if shards.is_empty() {
                return Err(Error::Invalid(format!("{at}: {index} lists no shards")));
            }
            for s in shards {
                if s.contains("..") || s.starts_with('/') || !has(&s) {
                    return Err(Error::Invalid(format!(
                        "{at}: {index} names shard {s:?}, which the repository does not have"
                    )));
                }
                files.push(s);
            }
        }
        return Ok(files);
    }
    if !ggufs.is_empty() {
        // a GGUF repository with no quantisation named: llama.cpp's default, else the only file
        if ggufs.len() == 1 {
            return Ok(vec![ggufs[0].clone()]);
        }
        return pick_quant(&at, DEFAULT_QUANT, &ggufs)
            .map(|f| vec![f])
            .map_err(|_| {
                Error::Invalid(format!(
                    "{at} holds several GGUF files: name one with {}:QUANT or --gguf-file \
                     ({})",
                    hub.repo,
                    list(&ggufs)
                ))
            });
    }
    Err(Error::Invalid(format!(
        "{at} has neither config.json with model.safetensors (or its index) nor a .gguf file; \
         qtune loads safetensors, bitsandbytes 4-bit and GGUF models"
    )))
}

fn list(names: &[&String]) -> String {
    if names.is_empty() {
        return "none".into();
    }
    names
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one GGUF file whose name carries quantisation tag `q` (`Q4_K_M` matches
/// `llama-2-7b.Q4_K_M.gguf`, not `...Q4_K_M_L...`).
fn pick_quant(at: &str, q: &str, ggufs: &[&String]) -> Result<String> {
    let ql = q.to_ascii_lowercase();
    let tagged = |n: &str| {
        let base = n.rsplit('/').next().unwrap_or(n).to_ascii_lowercase();
        let stem = base.strip_suffix(".gguf").unwrap_or(&base).to_string();
        let sep = |c: Option<char>| c.is_none_or(|c| c == '.' || c == '-');
        stem.match_indices(&ql).any(|(i, _)| {
            sep(stem[..i].chars().next_back()) && sep(stem[i + ql.len()..].chars().next())
        })
    };
    let hits: Vec<&String> = ggufs.iter().copied().filter(|n| tagged(n)).collect();
    let split = |n: &str| n.contains("-of-0");
    match hits.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::Invalid(format!(
            "{at} has no GGUF file for quantisation {q}; its GGUF files: {}",
            list(ggufs)
        ))),
        many if many.iter().all(|n| split(n)) => Err(Error::Invalid(format!(
            "{at}: {q} is split over {} files ({}); qtune reads single-file GGUF: merge them \
             with llama.cpp's llama-gguf-split --merge",
            many.len(),
            list(many)
        ))),
        many => Err(Error::Invalid(format!(
            "{at} has several GGUF files for {q}: {}; pick one with --gguf-file",
            list(many)
        ))),
    }
}

/// The model from the cache alone (offline, or the network failed with `net_err`).
fn from_cache(hub: &HubSpec, opts: &HubOptions, net_err: Option<&str>) -> Result<PathBuf> {
    let folder = format!("models--{}", hub.repo.replace('/', "--"));
    let root = opts.cache_dir.join(&folder);
    let why = |missing: String| {
        let head = match net_err {
            Some(m) => format!("{m}; and the cache cannot stand in"),
            None => format!(
                "HF_HUB_OFFLINE is set and {}@{} is not cached",
                hub.repo, hub.revision
            ),
        };
        Error::Invalid(format!(
            "{head}: {missing} (cache: {}). Run once with the network{}",
            opts.cache_dir.display(),
            if net_err.is_none() {
                " (unset HF_HUB_OFFLINE)"
            } else {
                ""
            }
        ))
    };
    let commit = match std::fs::read_to_string(root.join("refs").join(&hub.revision)) {
        Ok(c) => c.trim().to_string(),
        Err(_) if root.join("snapshots").join(&hub.revision).is_dir() => hub.revision.clone(),
        Err(_) => return Err(why(format!("no {folder}/refs/{}", hub.revision))),
    };
    let snap = root.join("snapshots").join(&commit);
    let mut names = Vec::new();
    list_files(&snap, &snap, &mut names);
    if names.is_empty() {
        return Err(why(format!("snapshot {commit} holds no files")));
    }
    let files = pick_files(hub, &names, |f| {
        let p = snap.join(f);
        std::fs::read_to_string(&p).map_err(|e| Error::io(p, e))
    })
    .map_err(|e| why(e.to_string()))?;
    if let Some(m) = files.iter().find(|f| !snap.join(f).is_file()) {
        return Err(why(format!("{m} is missing")));
    }
    let last = snap.join(files.last().expect("pick_files returns files"));
    Ok(model_path(hub, &last, &files))
}

/// Relative paths of the files under `dir` (links to blobs included).
fn list_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            list_files(root, &p, out);
        } else if p.is_file() {
            if let Ok(r) = p.strip_prefix(root) {
                out.push(r.to_string_lossy().into_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> Option<HubSpec> {
        parse_spec(s, None).unwrap()
    }

    #[test]
    fn specs_parse_as_llama_cpp_and_transformers_write_them() {
        let h = spec("TheBloke/Llama-2-7B-GGUF:Q4_K_M").unwrap();
        assert_eq!(h.repo, "TheBloke/Llama-2-7B-GGUF");
        assert_eq!(h.revision, "main");
        assert_eq!(h.gguf, Some(GgufPick::Quant("Q4_K_M".into())));
        let h = spec("unsloth/llama-2-7b-bnb-4bit@v1.0").unwrap();
        assert_eq!(
            (h.repo.as_str(), h.revision.as_str()),
            ("unsloth/llama-2-7b-bnb-4bit", "v1.0")
        );
        assert_eq!(h.gguf, None);
        let h = parse_spec("a/b", Some("b.Q8_0.gguf")).unwrap().unwrap();
        assert_eq!(h.gguf, Some(GgufPick::File("b.Q8_0.gguf".into())));
        // paths are not ids
        for p in [
            "model",
            "./a/b",
            "/abs/path",
            "a/b/c",
            "dir/model.gguf",
            "../x/y",
        ] {
            assert_eq!(spec(p), None, "{p}");
        }
        assert!(parse_spec("a/b:Q4_0", Some("f.gguf")).is_err());
        assert!(parse_spec("a/b@", None).is_err());
    }

    #[test]
    fn quant_tags_match_whole_words_only() {
        let names: Vec<String> = [
            "llama-2-7b.Q4_K_M.gguf",
            "llama-2-7b.Q4_K_S.gguf",
            "llama-2-7b.Q4_0.gguf",
            "llama-2-7b.Q8_0.gguf",
            "big-Q4_K_M-00001-of-00002.gguf",
            "big-Q4_K_M-00002-of-00002.gguf",
        ]
        .map(String::from)
        .into();
        let refs: Vec<&String> = names.iter().take(4).collect();
        assert_eq!(
            pick_quant("r", "q4_k_m", &refs).unwrap(),
            "llama-2-7b.Q4_K_M.gguf"
        );
        assert_eq!(
            pick_quant("r", "Q4_0", &refs).unwrap(),
            "llama-2-7b.Q4_0.gguf"
        );
        let e = pick_quant("r", "Q5_K_M", &refs).unwrap_err().to_string();
        assert!(e.contains("no GGUF file for quantisation Q5_K_M"), "{e}");
        let all: Vec<&String> = names.iter().collect();
        let e = pick_quant("r", "Q4_K_M", &all).unwrap_err().to_string();
        assert!(e.contains("several"), "{e}");
        let split: Vec<&String> = names.iter().skip(4).collect();
        assert!(pick_quant("r", "Q4_K_M", &split)
            .unwrap_err()
            .to_string()
            .contains("split"));
    }

    #[test]
    fn safetensors_repos_fetch_side_files_and_indexed_shards_only() {
        let names: Vec<String> = [
            "README.md",
            "config.json",
            "tokenizer.json",
            "tokenizer.model",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "pytorch_model.bin",
        ]
        .map(String::from)
        .into();
        let h = spec("o/n").unwrap();
        let idx = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                       "b": "model-00002-of-00002.safetensors",
                       "c": "model-00001-of-00002.safetensors"}}"#;
        let files = pick_files(&h, &names, |_| Ok(idx.into())).unwrap();
        assert_eq!(
            files,
            [
                "config.json",
                "tokenizer.json",
                "model.safetensors.index.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"
            ]
        );
        let bad = r#"{"weight_map": {"a": "../../etc/passwd"}}"#;
        assert!(pick_files(&h, &names, |_| Ok(bad.into())).is_err());
    }
}
