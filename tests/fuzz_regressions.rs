//! Every input a fuzzer ever crashed (or a known-bad file found by hand) re-run on stable through
//! the same harness the fuzz targets use (fuzz/src/harness.rs): each must give `Ok` or a named
//! error, within seconds. Inputs live in fuzz/regressions/<target>/; see docs/SECURITY.md.
#[path = "../fuzz/src/harness.rs"]
mod harness;

use std::path::PathBuf;
use std::time::{Duration, Instant};

#[test]
fn every_regression_input_is_harmless() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut n = 0;
    for target in std::fs::read_dir(&root).unwrap() {
        let target = target.unwrap().path();
        let name = target.file_name().unwrap().to_str().unwrap().to_string();
        let mut inputs: Vec<_> = std::fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().is_some_and(|n| n != "README.md"))
            .collect();
        inputs.sort();
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let t0 = Instant::now();
            assert!(
                harness::run(&name, &data),
                "unknown target directory {name}"
            );
            let took = t0.elapsed();
            // The fuzzers' hang limit is 10 s on a loaded debug-assertion build; a release test
            // gets a fraction of it.
            assert!(
                took < Duration::from_secs(5),
                "{}: took {took:?}",
                input.display()
            );
            n += 1;
        }
    }
    assert!(n > 0, "no regression inputs found under {}", root.display());
}

#[test]
fn sections_split_multi_file_inputs() {
    let s = harness::SEP;
    let data = [b"a".as_slice(), s, b"b", s, b"c"].concat();
    assert_eq!(
        harness::sections(&data, 2),
        vec![&b"a"[..], &[b"b".as_slice(), s, b"c"].concat()[..]]
    );
    assert_eq!(
        harness::sections(&data, 4),
        vec![&b"a"[..], b"b", b"c", b""]
    );
    assert_eq!(harness::sections(b"x", 1), vec![&b"x"[..]]);
}
