//! The config parser and validator from bytes: `tokend::config::parse_str`.
//!
//! Input bytes are decoded lossily (invalid UTF-8 becomes U+FFFD), so that every input
//! reaches the parser and multi-byte characters exercise the line:column arithmetic;
//! the daemon itself only ever hands it valid UTF-8 (it reads with `read_to_string`).
//! Invariants: no panic; every error renders (`Display`) and names a line and column
//! within the text; a config that parses renders with `Debug` (secrets redacted).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match tokend::config::parse_str(&text, Path::new("/etc/tokend/config.toml")) {
        Ok(config) => {
            let _ = format!("{config:?}");
        }
        Err(errors) => {
            let _ = errors.to_string();
            let lines = text.lines().count().max(1);
            for e in &errors.0 {
                let _ = e.to_string();
                assert!(
                    e.line <= lines + 1,
                    "error at line {} of a {lines}-line text: {e}",
                    e.line
                );
            }
        }
    }
});
