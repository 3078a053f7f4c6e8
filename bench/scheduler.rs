//! Scheduler decision time, as `cargo bench --bench scheduler`. Prints p50/p99
//! of one routing decision; asserts nothing.
//!
//! 1. `Router::route` (no prompt): 100 nodes × 20 models.
//! 2. `Router::route_prompt` + `dispatched` (prefix-aware, a ~1,000-token
//!    prompt): 100 nodes with 10,000 indexed prefixes, and 1,000 nodes with
//!    100,000 (targets p99 ≤ 20 µs and ≤ 200 µs).

use std::hint::black_box;
use std::time::Instant;

use _core::scheduler::{NodeState, Router};

const NODES: usize = 100;
const MODELS_PER_NODE: usize = 20;
/// 40 distinct models, so each is held by about half of the nodes.
const MODEL_POOL: usize = 40;
const CALLS: usize = 200_000;

fn percentiles(mut times: Vec<u64>) -> (f64, f64, f64) {
    times.sort_unstable();
    let p = |q: f64| times[((times.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    (p(0.5), p(0.9), p(0.99))
}

fn models_only() {
    let mut router = Router::new("node-0", 3_000);
    for n in 0..NODES {
        let models: Vec<String> = (0..MODELS_PER_NODE)
            .map(|k| format!("model-{}:7b", (n + k * 2) % MODEL_POOL))
            .collect();
        let loaded: Vec<String> = models.iter().take(2).cloned().collect();
        // a third of the nodes have both loaded models busy: loading another evicts one
        let busy = loaded.iter().take(n % 3).cloned().collect();
        router.update(NodeState {
            id: format!("node-{n}"),
            alive: n % 17 != 5,
            advert_at_ms: 1_000,
            models,
            loaded,
            busy,
            max_loaded: 2,
            in_flight: (n * 7 % 5) as u32,
            queue_depth: (n % 3) as u32,
            max_queue: 8,
        });
    }
    let names: Vec<String> = (0..MODEL_POOL).map(|m| format!("model-{m}:7b")).collect();
    // warm up
    for i in 0..10_000 {
        black_box(router.route(&names[i % MODEL_POOL], 2_000).ok());
    }
    let mut times = Vec::with_capacity(CALLS);
    for i in 0..CALLS {
        let m = &names[i % MODEL_POOL];
        let t = Instant::now();
        let r = router.route(black_box(m), 2_000);
        times.push(t.elapsed().as_nanos() as u64);
        black_box(r.ok());
    }
    let (p50, p90, p99) = percentiles(times);
    let candidates = router.route(&names[0], 2_000).map(|v| v.len()).unwrap_or(0);
    println!(
        "scheduler route(): {NODES} nodes x {MODELS_PER_NODE} models ({candidates} candidates), {CALLS} calls: \
         p50 {p50:.2} us, p90 {p90:.2} us, p99 {p99:.2} us (target p50 <= 5 us)"
    );
}

/// Prefix `p`: a ~4,000-character (~1,000-token) prompt. Prefixes come in
/// families of 10 sharing their first half (a tenant's system prompt), so
/// chains overlap as real traffic does.
fn prompt(p: usize, question: usize) -> String {
    let family = p / 10;
    let system = format!("system prompt of family {family}. ").repeat(60);
    let body = format!("document {p} body. ").repeat(100);
    format!("{system}{body} question {question}")
}

fn with_prefixes(nodes: usize, prefixes: usize, calls: usize, target: f64) {
    let mut router = Router::new("node-0", 3_000);
    for n in 0..nodes {
        router.update(NodeState {
            id: format!("node-{n}"),
            alive: true,
            advert_at_ms: 1_000,
            models: vec!["m".into()],
            loaded: vec!["m".into()],
            max_loaded: 2,
            in_flight: (n * 7 % 3) as u32,
            max_queue: 1_000_000,
            ..NodeState::default()
        });
    }
    // Index `prefixes` prompts over the nodes as routing would (through
    // route_prompt + dispatched), the requests finishing as they go.
    for p in 0..prefixes {
        let order = router.route_prompt("m", &prompt(p, 0), 1_500).unwrap();
        router.dispatched(&order[0]);
        router.finished(&order[0]);
    }
    let blocks = router.prefix_total();
    let queries: Vec<String> = (0..1_000)
        .map(|i| prompt((i * 7919) % prefixes, i))
        .collect();
    let mut times = Vec::with_capacity(calls);
    let mut recorded = Vec::with_capacity(calls);
    for i in 0..calls {
        let q = &queries[i % queries.len()];
        let t = Instant::now();
        let order = router.route_prompt("m", black_box(q), 2_000).unwrap();
        times.push(t.elapsed().as_nanos() as u64);
        let t = Instant::now();
        router.dispatched(&order[0]);
        recorded.push(t.elapsed().as_nanos() as u64);
        router.finished(&order[0]);
        black_box(order);
    }
    let (p50, p90, p99) = percentiles(times);
    let (d50, _, d99) = percentiles(recorded);
    let d = router.decisions();
    println!(
        "scheduler route_prompt(): {nodes} nodes, {prefixes} prefixes indexed ({blocks} blocks), \
         ~4,000-char prompts, {calls} calls: p50 {p50:.2} us, p90 {p90:.2} us, p99 {p99:.2} us \
         (target p99 <= {target} us); then dispatched() (indexing the prompt there): p50 {d50:.2} us, \
         p99 {d99:.2} us; decisions: {} prefix hit, {} load, {} spread",
        d.prefix_hit, d.load, d.spread
    );
}

fn main() {
    models_only();
    with_prefixes(100, 10_000, 50_000, 20.0);
    with_prefixes(1_000, 100_000, 20_000, 200.0);
}
