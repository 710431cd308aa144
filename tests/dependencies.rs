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
