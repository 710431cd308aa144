//! Fuzz target: arbitrary text as a configuration file. What parses is valid, and
//! writes out as TOML that parses back to an equal configuration.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quicpush::Config;

fuzz_target!(|text: &str| {
    if let Ok(config) = Config::parse(text) {
        config.validate().unwrap();
        let written = toml::to_string(&config).unwrap();
        let again = Config::parse(&written).unwrap_or_else(|e| panic!("{e}\n{written}"));
        assert_eq!(again, config, "{written}");
    }
});
