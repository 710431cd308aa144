//! The dependency tree: no crate with an advisory against it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// Crates that must not be in the tree, with the advisory that says why.
const REFUSED: &[(&str, &str)] = &[("rustls-pemfile", "RUSTSEC-2025-0134: unmaintained")];

#[test]
fn no_crate_with_an_advisory_is_locked() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock"))
        .expect("Cargo.lock is committed");
    for (name, why) in REFUSED {
        assert!(
            !lock.contains(&format!("name = \"{name}\"\n")),
            "{name} is in Cargo.lock ({why})"
        );
    }
}

/// The load tool's crates, which a library user without the `bench` feature must
/// not get.
const BENCH_ONLY: &[&str] = &[
    "clap",
    "indicatif",
    "hdrhistogram",
    "tempfile",
    "rlimit",
    "anyhow",
    "tracing-subscriber",
];

#[test]
fn the_library_without_default_features_has_the_servers_dependencies_only() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "--no-default-features",
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--package",
            "quicpush",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    let names: std::collections::BTreeSet<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.contains("quinn"),
        "the tree lists the server's crates"
    );
    let leaked: Vec<_> = BENCH_ONLY.iter().filter(|c| names.contains(**c)).collect();
    assert!(leaked.is_empty(), "the library depends on {leaked:?}");
}
