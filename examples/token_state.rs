//! Live heap bytes per token, counted by a counting allocator: the parsed
//! config, the pool, the static access tokens, and the per-token metric
//! series after a scrape, for pools of 1 000 and 100 000 tokens — with
//! 40-byte API keys (the bytes of the secret itself are the user's, and
//! appear twice: in the config and as the `Bearer` header).
//!
//!   cargo run --release --example token_state
//!
//! RSS (examples/memory.rs) also holds what the allocator keeps after the
//! config text and TOML tree are freed; this counts only what stays alive.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokenpool::config::Config;
use tokenpool::generation::Generations;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; only a
// byte count is kept beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn config_text(tokens: usize) -> String {
    let mut text = String::from(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [upstream]\nurl = \"http://127.0.0.1:9\"\n[refresh]\nprovider = \"static\"\n",
    );
    for i in 0..tokens {
        let tier = ["personal", "shared", "anonymous"][i % 3];
        text.push_str(&format!(
            "[[tokens]]\nname = \"t{i}\"\ntier = \"{tier}\"\ntoken = \"sk-{i:0>37}\"\n"
        ));
    }
    text
}

/// Live bytes of an app serving `tokens` tokens, after one scrape.
fn live_bytes(tokens: usize) -> usize {
    let text = config_text(tokens);
    let before = LIVE.load(Ordering::Relaxed);
    let config = Config::parse(&text, None, &|_| None).expect("valid config");
    drop(text);
    let app = Generations::new(config, std::sync::Arc::new(|_: &str| None))
        .expect("the first generation builds");
    let scrape = app.metrics.render(&app.current().pool);
    drop(scrape);
    let live = LIVE.load(Ordering::Relaxed) - before;
    drop(app);
    live
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let base = live_bytes(10);
    for n in [1_000usize, 100_000] {
        let live = live_bytes(n);
        println!(
            "{n:>6} tokens: {live} bytes live; {:.0} bytes per token",
            (live - base) as f64 / (n - 10) as f64
        );
    }
}
