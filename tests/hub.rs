//! `--model org/name` against a local server on 127.0.0.1 that answers in the Hub's URL layout
//! (`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`,
//! `ETag`/`X-Linked-Etag`, a 302 to a content server for large files, and byte ranges), started and
//! stopped by each test. No network and no Python.
use qtune::store::hub::{resolve_with, HubOptions};
use qtune::store::WeightStore;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_secret";

fn fx(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A repository: file name -> bytes; `private` ones need the bearer token.
struct HubRepo {
    files: Vec<(String, Vec<u8>)>,
    private: bool,
}

fn repos() -> HashMap<String, HubRepo> {
    let read = |p: &str| std::fs::read(fx(p)).unwrap();
    let mut st: Vec<(String, Vec<u8>)> = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|f| {
        (
            f.to_string(),
            read(&format!("tests/fixtures/llama/model/{f}")),
        )
    })
    .collect();
    // files a model does not need: never fetched
    st.push(("README.md".into(), b"# tiny".to_vec()));
    st.push(("pytorch_model.bin".into(), vec![0u8; 4096]));
    let gguf = read("tests/fixtures/gguf/tiny-llama-q8_0.gguf");
    let mut m = HashMap::new();
    m.insert(
        "qtune-test/tiny".to_string(),
        HubRepo {
            files: st.clone(),
            private: false,
        },
    );
    m.insert(
        "qtune-test/private".to_string(),
        HubRepo {
            files: st,
            private: true,
        },
    );
    m.insert(
        "qtune-test/tiny-GGUF".to_string(),
        HubRepo {
            files: vec![
                ("README.md".into(), b"# gguf".to_vec()),
                ("tiny.Q8_0.gguf".into(), gguf.clone()),
                // a second quantisation (same bytes: only the name is looked at)
                ("tiny.Q4_K_M.gguf".into(), gguf),
            ],
            private: false,
        },
    );
    m
}

/// ETags as the Hub gives them: a content hash (FNV-1a here; the client only compares them).
fn etag(b: &[u8]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &x in b {
        h = (h ^ x as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}{:08x}", b.len())
}

/// Every request path with its Range header.
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// The local Hub: serves until dropped; `log` holds every request.
struct Server {
    url: String,
    log: Log,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Server {
    fn start() -> Server {
        let srv = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let url = format!("http://{}", srv.server_addr().to_ip().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s, base) = (log.clone(), stop.clone(), url.clone());
        let thread = std::thread::spawn(move || {
            let repos = repos();
            while !s.load(Ordering::SeqCst) {
                let Ok(Some(req)) = srv.recv_timeout(std::time::Duration::from_millis(20)) else {
                    continue;
                };
                let hdr = |name: &'static str| {
                    req.headers()
                        .iter()
                        .find(|h| h.field.equiv(name))
                        .map(|h| h.value.to_string())
                };
                let range = hdr("Range");
                let auth = hdr("Authorization");
                l.lock()
                    .unwrap()
                    .push((req.url().to_string(), range.clone()));
                let resp = answer(&repos, &base, req.url(), range, auth);
                let _ = req.respond(resp);
            }
        });
        Server {
            url,
            log,
            stop,
            thread: Some(thread),
        }
    }

    /// Requests for file contents (resolve and content-server paths) so far.
    fn file_requests(&self) -> Vec<(String, Option<String>)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| !p.starts_with("/api/"))
            .cloned()
            .collect()
    }
}

type Resp = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

fn header(k: &str, v: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()).unwrap()
}

fn error(code: u16, kind: &str) -> Resp {
    tiny_http::Response::from_data(format!("{{\"error\": \"{kind}\"}}").into_bytes())
        .with_status_code(code)
        .with_header(header("X-Error-Code", kind))
}

/// Bytes of `data` for a `Range: bytes=a-[b]` request (206), or all of it (200).
fn ranged(data: &[u8], range: Option<String>) -> Resp {
    let n = data.len();
    if let Some(r) = range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
        let (a, b) = r.split_once('-').unwrap();
        let a: usize = a.parse().unwrap();
        let b: usize = if b.is_empty() {
            n - 1
        } else {
            b.parse().unwrap()
        };
        let b = b.min(n - 1);
        return tiny_http::Response::from_data(data[a..=b].to_vec())
            .with_status_code(206)
            .with_header(header("Content-Range", &format!("bytes {a}-{b}/{n}")));
    }
    tiny_http::Response::from_data(data.to_vec())
}

fn answer(
    repos: &HashMap<String, HubRepo>,
    base: &str,
    url: &str,
    range: Option<String>,
    auth: Option<String>,
) -> Resp {
    let authorised =
        |r: &HubRepo| !r.private || auth.as_deref() == Some(&format!("Bearer {TOKEN}"));
    if let Some(tag) = url.strip_prefix("/cdn/") {
        for r in repos.values() {
            if let Some((_, d)) = r.files.iter().find(|(_, d)| etag(d) == tag) {
                return ranged(d, range);
            }
        }
        return error(404, "NotFound");
    }
    if let Some(rest) = url.strip_prefix("/api/models/") {
        let (repo, rev) = rest.split_once("/revision/").unwrap();
        let Some(r) = repos.get(repo).filter(|r| authorised(r)) else {
            return error(401, "RepoNotFound");
        };
        if rev != "main" && rev != COMMIT {
            return error(404, "RevisionNotFound");
        }
        let siblings: Vec<String> = r
            .files
            .iter()
            .map(|(f, _)| format!("{{\"rfilename\": \"{f}\"}}"))
            .collect();
        let body = format!(
            "{{\"id\": \"{repo}\", \"sha\": \"{COMMIT}\", \"siblings\": [{}]}}",
            siblings.join(",")
        );
        return tiny_http::Response::from_data(body.into_bytes())
            .with_header(header("Content-Type", "application/json"));
    }
    // /{org}/{name}/resolve/{rev}/{file}
    let parts: Vec<&str> = url.trim_start_matches('/').splitn(5, '/').collect();
    if parts.len() != 5 || parts[2] != "resolve" {
        return error(404, "NotFound");
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let Some(r) = repos.get(&repo).filter(|r| authorised(r)) else {
        return error(401, "RepoNotFound");
    };
    if parts[3] != "main" && parts[3] != COMMIT {
        return error(404, "RevisionNotFound");
    }
    let Some((f, d)) = r.files.iter().find(|(f, _)| f == parts[4]) else {
        return error(404, "EntryNotFound");
    };
    let tag = etag(d);
    if f.ends_with(".safetensors") || f.ends_with(".gguf") || f.ends_with(".bin") {
        // large (LFS) files: a redirect to the content server, as the Hub does
        return tiny_http::Response::from_data(Vec::new())
            .with_status_code(302)
            .with_header(header("Location", &format!("{base}/cdn/{tag}")))
            .with_header(header("X-Repo-Commit", COMMIT))
            .with_header(header("X-Linked-Etag", &format!("\"{tag}\"")))
            .with_header(header("X-Linked-Size", &d.len().to_string()))
            .with_header(header("ETag", "\"git-pointer\""));
    }
    ranged(d, range)
        .with_header(header("X-Repo-Commit", COMMIT))
        .with_header(header("ETag", &format!("\"{tag}\"")))
}

fn opts(srv: &Server, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: srv.url.clone(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: false,
    }
}

fn resolve(spec: &str, gguf: Option<&str>, o: &HubOptions) -> qtune::Result<PathBuf> {
    resolve_with(Path::new(spec), gguf, o)
}

#[test]
fn a_safetensors_repo_downloads_needed_files_once_into_the_python_cache_layout() {
    let srv = Server::start();
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&srv, cache.path());
    let dir = resolve("qtune-test/tiny", None, &o).unwrap();
    let repo = cache.path().join("models--qtune-test--tiny");
    assert_eq!(dir, repo.join("snapshots").join(COMMIT));
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    // snapshot entries are links into blobs/, named by ETag (sha256 for LFS files on the Hub)
    let st = dir.join("model.safetensors");
    assert!(std::fs::symlink_metadata(&st)
        .unwrap()
        .file_type()
        .is_symlink());
    let want = std::fs::read(fx("tests/fixtures/llama/model/model.safetensors")).unwrap();
    assert_eq!(std::fs::read(&st).unwrap(), want);
    assert!(repo.join("blobs").join(etag(&want)).is_file());
    // the model opens from there, tokenizer included
    let store = WeightStore::open(&dir).unwrap();
    assert!(!store.tensors.is_empty());
    assert!(dir.join("tokenizer.json").is_file());
    // what a model does not need is never fetched
    let got = srv.file_requests();
    assert!(
        got.iter()
            .all(|(p, _)| !p.contains("README") && !p.contains(".bin")),
        "{got:?}"
    );
    assert!(got.iter().any(|(p, _)| p.ends_with("/config.json")));
    // a second resolve fetches nothing
    let n = got.len();
    assert_eq!(resolve("qtune-test/tiny", None, &o).unwrap(), dir);
    assert_eq!(
        srv.file_requests().len(),
        n,
        "cached files were fetched again"
    );
    // and offline, the cache alone answers (a revision given as the commit works too)
    let off = HubOptions {
        offline: true,
        endpoint: "http://127.0.0.1:9".into(),
        ..o.clone()
    };
    assert_eq!(resolve("qtune-test/tiny", None, &off).unwrap(), dir);
    assert_eq!(
        resolve(&format!("qtune-test/tiny@{COMMIT}"), None, &off).unwrap(),
        dir
    );
}

#[test]
fn gguf_repos_take_one_file_by_quant_tag_or_name() {
    let srv = Server::start();
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&srv, cache.path());
    let p = resolve("qtune-test/tiny-GGUF:Q8_0", None, &o).unwrap();
    assert!(p.ends_with("tiny.Q8_0.gguf"), "{}", p.display());
    let store = WeightStore::open(&p).unwrap();
    assert!(!store.tensors.is_empty());
    let got = srv.file_requests();
    assert!(got.iter().all(|(p, _)| !p.contains("Q4_K_M")), "{got:?}");
    // no tag: llama.cpp's default Q4_K_M; --gguf-file names the file
    let p = resolve("qtune-test/tiny-GGUF", None, &o).unwrap();
    assert!(p.ends_with("tiny.Q4_K_M.gguf"));
    let p = resolve("qtune-test/tiny-GGUF", Some("tiny.Q8_0.gguf"), &o).unwrap();
    assert!(p.ends_with("tiny.Q8_0.gguf"));
    let e = resolve("qtune-test/tiny-GGUF:Q5_K_S", None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no GGUF file for quantisation Q5_K_S") && e.contains("tiny.Q8_0.gguf"),
        "{e}"
    );
}

#[test]
fn a_partial_download_resumes_from_its_part_file() {
    let srv = Server::start();
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&srv, cache.path());
    let full = std::fs::read(fx("tests/fixtures/gguf/tiny-llama-q8_0.gguf")).unwrap();
    let blobs = cache.path().join("models--qtune-test--tiny-GGUF/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let k = full.len() / 3;
    std::fs::write(blobs.join(format!("{}.part", etag(&full))), &full[..k]).unwrap();
    let p = resolve("qtune-test/tiny-GGUF:Q8_0", None, &o).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), full);
    let cdn: Vec<_> = srv
        .file_requests()
        .into_iter()
        .filter(|(p, r)| p.starts_with("/cdn/") && r.as_deref() != Some("bytes=0-0"))
        .collect();
    assert_eq!(cdn.len(), 1, "{cdn:?}");
    assert_eq!(cdn[0].1.as_deref(), Some(format!("bytes={k}-").as_str()));
}

#[test]
fn failures_say_what_is_wrong() {
    let srv = Server::start();
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&srv, cache.path());
    let msg = |spec: &str, gguf: Option<&str>, o: &HubOptions| {
        resolve(spec, gguf, o).unwrap_err().to_string()
    };
    // unknown repository
    let e = msg("qtune-test/nope", None, &o);
    assert!(e.contains("repository qtune-test/nope not found"), "{e}");
    assert!(e.contains("HF_TOKEN"), "{e}");
    // a file the repository does not have
    let e = msg("qtune-test/tiny-GGUF", Some("other.gguf"), &o);
    assert!(e.contains("has no file other.gguf"), "{e}");
    // an unknown revision
    let e = msg("qtune-test/tiny@v9", None, &o);
    assert!(e.contains("no revision 'v9'"), "{e}");
    // a private repository: refused without the token, served with it
    let e = msg("qtune-test/private", None, &o);
    assert!(e.contains("not found"), "{e}");
    let with_token = HubOptions {
        token: Some(TOKEN.into()),
        ..o.clone()
    };
    assert!(resolve("qtune-test/private", None, &with_token)
        .unwrap()
        .is_dir());
    // a network error (nothing listens on the port), nothing cached
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let down = HubOptions {
        endpoint: format!("http://127.0.0.1:{closed}"),
        ..o.clone()
    };
    let e = msg("qtune-test/tiny", None, &down);
    assert!(
        e.contains("cannot reach") && e.contains("cache cannot stand in"),
        "{e}"
    );
    // offline with an empty cache
    let empty = tempfile::tempdir().unwrap();
    let off = HubOptions {
        offline: true,
        cache_dir: empty.path().to_path_buf(),
        ..o.clone()
    };
    let e = msg("qtune-test/tiny", None, &off);
    assert!(
        e.contains("HF_HUB_OFFLINE") && e.contains("not cached"),
        "{e}"
    );
    // a path that is neither a file nor an id
    let e = msg("no/such/file.gguf", None, &o);
    assert!(e.contains("does not exist"), "{e}");
    // the network gone, the cache stands in
    resolve("qtune-test/tiny", None, &o).unwrap();
    assert!(resolve("qtune-test/tiny", None, &down).unwrap().is_dir());
}

#[test]
fn a_local_path_that_exists_wins_over_a_hub_id() {
    // "target/qtune-hub-local" is shaped like org/name; it exists, so it is used as is
    let dir = fx("target/qtune-hub-local");
    std::fs::create_dir_all(&dir).unwrap();
    let o = HubOptions {
        endpoint: "http://127.0.0.1:9".into(),
        cache_dir: dir.join("cache"),
        token: None,
        offline: false,
        progress: false,
    };
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(cwd, fx(""));
    let got = resolve("target/qtune-hub-local", None, &o).unwrap();
    assert_eq!(got, Path::new("target/qtune-hub-local"));
}

#[test]
fn the_cli_reads_the_hub_environment() {
    let srv = Server::start();
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str], token: Option<&str>| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_qtune"));
        c.args(args)
            .env("HF_ENDPOINT", &srv.url)
            .env("HF_HOME", home.path())
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HF_TOKEN");
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        c.output().unwrap()
    };
    let out = run(&["inspect", "qtune-test/private"], Some(TOKEN));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("llama"), "{text}");
    assert!(home
        .path()
        .join("hub/models--qtune-test--private/refs/main")
        .is_file());
    let out = run(&["inspect", "qtune-test/nope"], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("repository qtune-test/nope not found"),
        "{err}"
    );
    let out = run(&["inspect", "qtune-test/tiny-GGUF:Q8_0"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
