//! Fuzz target: sessions driven by a script of client frames, garbage, sleeps and
//! backend actions (see the script format in `src/lib.rs`). Every session must end
//! without a panic, leave nothing in the registry and write only whole frames.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quicpush_fuzz::{run_script, Script};

fuzz_target!(|data: &[u8]| {
    run_script(&Script::parse(data));
});
