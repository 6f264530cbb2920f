//! Checksums of a checkpoint or adapter directory, so that a truncated or corrupted file (a flipped
//! byte in the optimizer state) is refused on `--resume` / load instead of being trained on.
//!
//! The manifest is `checksums.sha256` in the directory, in `sha256sum`'s format (`<hex>  <path>`,
//! paths relative with `/`), so `sha256sum -c checksums.sha256` checks it by hand too.
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The manifest's file name.
pub const MANIFEST_FILE: &str = "checksums.sha256";

/// Files under `dir` (recursively, sorted), relative, without the manifest itself.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for e in std::fs::read_dir(&abs).map_err(|e| Error::io(&abs, e))? {
            let e = e.map_err(|e| Error::io(&abs, e))?;
            let ty = e.file_type().map_err(|err| Error::io(e.path(), err))?;
            let r = rel.join(e.file_name());
            if ty.is_dir() {
                stack.push(r);
            } else if r != Path::new(MANIFEST_FILE) {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// SHA-256 of a file, read in 1 MiB pieces (optimizer states can be hundreds of MB).
fn sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn slash_path(rel: &Path) -> String {
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

/// Writes `dir/checksums.sha256` over every other file under `dir` (synced to disk). Call it last,
/// on the temporary directory, before the rename that publishes it.
pub fn write_manifest(dir: &Path) -> Result<()> {
    let mut text = String::new();
    for rel in files(dir)? {
        text += &format!("{}  {}\n", sha256(&dir.join(&rel))?, slash_path(&rel));
    }
    let path = dir.join(MANIFEST_FILE);
    let mut f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(&path, e))?;
    f.sync_all().map_err(|e| Error::io(&path, e))
}

/// Checks every file `dir/checksums.sha256` lists: present, and with the same SHA-256. Errors name
/// the file and say what to do; a directory without a manifest is refused (it is incomplete, or
/// was not written by qtune).
pub fn verify_manifest(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST_FILE);
    if !path.is_file() {
        return Err(Error::Invalid(format!(
            "{}: no {MANIFEST_FILE}; this checkpoint is incomplete or was not written by this \
             version of qtune, so it cannot be checked: start a new run without --resume, or \
             resume from another checkpoint",
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let bad = |line: usize, msg: &str| Error::Data {
        path: path.clone(),
        line,
        msg: msg.into(),
    };
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((hex, name)) = line.split_once("  ") else {
            return Err(bad(i + 1, "not '<sha256>  <path>'"));
        };
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(i + 1, "the checksum is not 64 hex digits"));
        }
        let rel = Path::new(name);
        if name.is_empty()
            || !rel
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(bad(i + 1, "the path is not a plain relative path"));
        }
        let file = dir.join(rel);
        if !file.is_file() {
            return Err(Error::Invalid(format!(
                "{}: missing, but listed in {MANIFEST_FILE}: the checkpoint is incomplete; resume \
                 from another checkpoint or start a new run",
                file.display()
            )));
        }
        if sha256(&file)? != hex.to_ascii_lowercase() {
            return Err(Error::Invalid(format!(
                "{}: does not match its checksum in {MANIFEST_FILE}: the file is damaged \
                 (truncated or modified since it was saved); resume from another checkpoint or \
                 start a new run",
                file.display()
            )));
        }
        n += 1;
    }
    if n == 0 {
        return Err(bad(1, "lists no files"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("adapter")).unwrap();
        std::fs::write(d.path().join("trainer_state.json"), b"{\"step\": 3}").unwrap();
        std::fs::write(
            d.path().join("adapter/adapter_model.safetensors"),
            [7u8; 1000],
        )
        .unwrap();
        write_manifest(d.path()).unwrap();
        d
    }

    fn err(d: &Path) -> String {
        verify_manifest(d).unwrap_err().to_string()
    }

    #[test]
    fn an_intact_directory_passes_and_lists_every_file() {
        let d = checkpoint();
        verify_manifest(d.path()).unwrap();
        let m = std::fs::read_to_string(d.path().join(MANIFEST_FILE)).unwrap();
        let names: Vec<&str> = m.lines().map(|l| l.split_once("  ").unwrap().1).collect();
        assert_eq!(
            names,
            ["adapter/adapter_model.safetensors", "trainer_state.json"]
        );
        // sha256sum's digest of "{\"step\": 3}".
        assert!(m.contains("  trainer_state.json"));
        // Writing it again is stable (the manifest does not list itself).
        write_manifest(d.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join(MANIFEST_FILE)).unwrap(),
            m
        );
    }

    #[test]
    fn a_flipped_byte_or_truncation_is_refused_naming_the_file() {
        let d = checkpoint();
        let f = d.path().join("adapter/adapter_model.safetensors");
        let mut b = std::fs::read(&f).unwrap();
        b[500] ^= 1;
        std::fs::write(&f, &b).unwrap();
        let e = err(d.path());
        assert!(
            e.contains("adapter_model.safetensors") && e.contains("damaged"),
            "{e}"
        );
        std::fs::write(&f, &b[..999]).unwrap();
        assert!(err(d.path()).contains("damaged"));
        std::fs::remove_file(&f).unwrap();
        assert!(err(d.path()).contains("missing"));
    }

    #[test]
    fn a_missing_or_bad_manifest_is_refused() {
        let d = checkpoint();
        let m = d.path().join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&m).unwrap();
        for bad in [
            "".to_string(),
            "nonsense\n".to_string(),
            text.replace("  trainer_state.json", "  ../trainer_state.json"),
            text.replace("  trainer_state.json", "  /etc/passwd"),
            format!("{}  x\n", "g".repeat(64)),
        ] {
            std::fs::write(&m, &bad).unwrap();
            let e = err(d.path());
            assert!(e.contains(MANIFEST_FILE), "{bad:?}: {e}");
        }
        std::fs::remove_file(&m).unwrap();
        assert!(err(d.path()).contains("no checksums.sha256"));
    }
}
