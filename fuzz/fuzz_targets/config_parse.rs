//! Any text given to the config parser yields a config or a located error,
//! never a panic, and an error never shows a value that looks like a secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenpool::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Some(std::path::Path::new("fuzz.toml")), &|_| None) {
        Ok(config) => {
            let _ = tokenpool::cli::summary(&config);
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.toml"), "{shown}");
            if let Some((line, col)) = e.position {
                assert!(line >= 1 && col >= 1);
            }
        }
    }
});
