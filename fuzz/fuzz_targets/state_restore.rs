//! A state file of any content is restored without panicking (a corrupt
//! one never stops the start), and no restored rest is longer than a month.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use tokenpool::config::Config;
use tokenpool::pool::Pool;
use tokenpool::state::StateStore;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("tokenpool-fuzz-state-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("state.json");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let config = Config::parse(
        "[[tokens]]\nname = \"a\"\ntier = \"personal\"\ntoken = \"rt-a\"\n",
        None,
        &|_| None,
    )
    .unwrap();
    let pool = Pool::new(&config.pool, &config.tokens, true, None);
    StateStore::new(&path).restore(&pool);
    let snapshot = pool.get("a").unwrap().snapshot();
    if let Some(back) = snapshot.cooldown_until {
        let rest = back.duration_since(SystemTime::now()).unwrap_or_default();
        assert!(rest <= Duration::from_secs(31 * 24 * 3600 + 1), "{rest:?}");
    }
});
