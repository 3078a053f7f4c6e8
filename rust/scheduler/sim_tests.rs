//! The router's choices under simulation: no I/O, thousands of requests,
//! nodes joining, dying, restarting and evicting. Each test replays a seeded
//! workload through [`Router`] as the dispatcher drives it (route, dispatched,
//! finished, adverts) and checks where requests went.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::prefix::chain;
use super::{policy_by_name, NodeState, Router};

const MODEL: &str = "m";

fn node(id: &str) -> NodeState {
    NodeState {
        id: id.into(),
        alive: true,
        advert_at_ms: 0,
        models: vec![MODEL.into()],
        loaded: vec![MODEL.into()],
        max_queue: 1_000,
        ..NodeState::default()
    }
}

fn cluster(n: usize, policy: &str) -> Router {
    let mut r = Router::new("n0", u64::MAX);
    r.set_policy(policy_by_name(policy).unwrap());
    for i in 0..n {
        r.update(node(&format!("n{i}")));
    }
    r
}

/// Tenant `t`'s system prompt (~1,000 tokens) and a question.
fn prompt(t: usize, q: usize) -> String {
    format!(
        "<|system|>{}<|user|>question {q}: what is {q} times {t}?",
        format!("Tenant {t} rules, section {t}. ").repeat(130)
    )
}

/// Zipf(s) over `n` tenants, by inverse CDF.
fn zipf(rng: &mut StdRng, n: usize, s: f64) -> usize {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut x = rng.gen::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    n - 1
}

/// Route one request for tenant `t` and send it to the first choice.
fn send(r: &mut Router, t: usize, q: usize, now: u64) -> String {
    let order = r.route_prompt(MODEL, &prompt(t, q), now).unwrap();
    r.dispatched(&order[0]);
    order[0].clone()
}

#[test]
fn sequential_tenants_stick_to_one_node_each_and_spread_over_nodes() {
    let mut r = cluster(3, "prefix_aware");
    let mut rng = StdRng::seed_from_u64(7);
    let mut home: Vec<Option<String>> = vec![None; 12];
    for q in 0..3_000 {
        let t = zipf(&mut rng, 12, 1.1);
        let got = send(&mut r, t, q, q as u64);
        r.finished(&got);
        match &home[t] {
            None => home[t] = Some(got),
            Some(h) => assert_eq!(h, &got, "tenant {t} moved at request {q}"),
        }
    }
    // 12 tenants over 3 idle nodes: the least-cached rule gives each node some
    let mut per_node = std::collections::HashMap::new();
    for h in home.iter().flatten() {
        *per_node.entry(h.clone()).or_insert(0) += 1;
    }
    assert_eq!(per_node.len(), 3, "{per_node:?}");
    let d = r.decisions();
    assert_eq!(d.spread, 0);
    assert!(d.prefix_hit >= 3_000 - 12, "{d:?}");
}

#[test]
fn a_template_head_shared_by_every_tenant_does_not_pull_new_tenants_together() {
    let mut r = cluster(3, "prefix_aware");
    // two blocks of chat template and default instructions, then the tenant's own text
    let head =
        "<|im_start|>system\nYou are a helpful assistant. Answer briefly and cite the rules. ";
    let head = head.repeat(2);
    let text = |t: usize| format!("{head}{}", format!("tenant {t} rule. ").repeat(60));
    assert_eq!(chain(MODEL, &head).len(), 2);
    let mut homes = Vec::new();
    for t in 0..3 {
        let order = r.route_prompt(MODEL, &text(t), t as u64).unwrap();
        r.dispatched(&order[0]);
        r.finished(&order[0]);
        homes.push(order[0].clone());
    }
    homes.sort();
    homes.dedup();
    assert_eq!(
        homes.len(),
        3,
        "three new tenants, three idle nodes: {homes:?}"
    );
    let d = r.decisions();
    assert_eq!((d.prefix_hit, d.load), (0, 3), "{d:?}");
    // a tenant's second request still finds its node
    let order = r.route_prompt(MODEL, &text(1), 9).unwrap();
    r.dispatched(&order[0]);
    assert_eq!(r.decisions().prefix_hit, 1);
}

#[test]
fn a_saturated_hot_prefix_spreads_to_a_second_node_and_is_counted() {
    let mut r = cluster(3, "prefix_aware");
    let first = send(&mut r, 0, 0, 0); // still running
    let second = send(&mut r, 0, 1, 1);
    assert_ne!(first, second, "the warm node is busy and two are idle");
    assert_eq!(r.decisions().spread, 1);
    r.finished(&first);
    r.finished(&second);
    // both have it warm now: the next two concurrent requests take one each
    let a = send(&mut r, 0, 2, 2);
    let b = send(&mut r, 0, 3, 3);
    let mut got = vec![a, b];
    got.sort();
    let mut want = vec![first, second];
    want.sort();
    assert_eq!(got, want);
}

/// A closed loop of `concurrency` clients over `nodes` nodes: each step one
/// random running request ends and a new one starts. Returns (hit rate
/// against the oracle, the busiest node's mean in flight over all nodes'
/// mean, as the benchmark measures it).
fn closed_loop(policy: &str, nodes: usize, concurrency: usize, hot_half: bool) -> (f64, f64) {
    let mut r = cluster(nodes, policy);
    // each node's index stands for its engine's cache here: room for about
    // five tenants' prompts, so a policy that sends every tenant everywhere
    // thrashes as a real prompt cache would
    r.set_prefix_capacity(330);
    let mut rng = StdRng::seed_from_u64(11);
    let mut running: Vec<String> = Vec::new();
    let mut seen = [false; 12];
    let (mut hits, mut oracle) = (0u64, 0u64);
    let mut sum_loads = vec![0.0f64; nodes];
    for q in 0..4_000 {
        if running.len() == concurrency {
            let k = rng.gen_range(0..running.len());
            let id = running.swap_remove(k);
            r.finished(&id);
        }
        let t = if hot_half && rng.gen_bool(0.5) {
            0
        } else {
            zipf(&mut rng, 12, 1.1)
        };
        let c = chain(MODEL, &prompt(t, q));
        let order = r.route_prompt(MODEL, &prompt(t, q), q as u64).unwrap();
        let id = order[0].clone();
        // a hit: the node already had the tenant's whole system prompt
        if r.prefix_matched(&id, &c) as usize >= c.len() - 2 {
            hits += 1;
        }
        if seen[t] {
            oracle += 1;
        }
        seen[t] = true;
        r.dispatched(&id);
        running.push(id);
        if q > 100 {
            for (i, s) in sum_loads.iter_mut().enumerate() {
                *s += running.iter().filter(|x| **x == format!("n{i}")).count() as f64;
            }
        }
    }
    let mean = sum_loads.iter().sum::<f64>() / nodes as f64;
    let max = sum_loads.iter().cloned().fold(0.0, f64::max);
    (hits as f64 / oracle as f64, max / mean)
}

#[test]
fn under_load_prefix_aware_hits_near_the_oracle_within_the_load_bound() {
    for concurrency in [3, 6] {
        let (hit, ratio) = closed_loop("prefix_aware", 3, concurrency, false);
        assert!(hit >= 0.9, "hit rate {hit} at {concurrency}");
        assert!(ratio <= 1.25, "max/mean {ratio} at {concurrency}");
        for other in ["round_robin", "least_loaded"] {
            let (h, _) = closed_loop(other, 3, concurrency, false);
            assert!(h < hit - 0.15, "{other} {h} vs prefix_aware {hit}");
        }
    }
}

#[test]
fn one_tenant_sending_half_the_traffic_keeps_max_over_mean_in_bound() {
    let (hit, ratio) = closed_loop("prefix_aware", 3, 12, true);
    assert!(ratio <= 1.25, "max/mean {ratio}");
    assert!(hit >= 0.9, "hit rate {hit}");
}

#[test]
fn a_dead_node_tenants_move_and_stick_to_their_new_node() {
    let mut r = cluster(3, "prefix_aware");
    let mut home = Vec::new();
    for t in 0..12 {
        let id = send(&mut r, t, 0, 0);
        r.finished(&id);
        home.push(id);
    }
    r.set_alive("n1", false);
    r.update(NodeState {
        alive: false,
        ..node("n1")
    });
    let mut moved = Vec::new();
    for (t, h) in home.iter().enumerate() {
        let id = send(&mut r, t, 1, 1);
        r.finished(&id);
        assert_ne!(id, "n1");
        if h != "n1" {
            assert_eq!(&id, h, "tenant {t} on a live node stays");
        }
        moved.push(id);
    }
    for (t, m) in moved.iter().enumerate() {
        let id = send(&mut r, t, 2, 2);
        r.finished(&id);
        assert_eq!(&id, m, "tenant {t} sticks to where it moved");
    }
    // n1 leaves for good; a new node joins and takes new tenants first
    r.remove("n1");
    assert_eq!(r.prefix_len("n1"), 0);
    r.update(node("n9"));
    let id = send(&mut r, 99, 0, 3);
    assert_eq!(id, "n9", "the empty newcomer takes the new tenant");
}

#[test]
fn a_restarted_node_advert_clears_the_guess_and_another_entry_learns_from_adverts() {
    let mut r = cluster(3, "prefix_aware");
    let id = send(&mut r, 5, 0, 100);
    r.finished(&id);
    // the node restarts: its advert (taken after the route) says nothing is warm
    r.set_warm(&id, &[], 200);
    assert_eq!(r.prefix_len(&id), 0);
    // a second entry node never routed tenant 5, but the holder's advert tells it
    let mut other = cluster(3, "prefix_aware");
    let warm = chain(MODEL, &prompt(5, 0));
    other.set_warm("n2", &warm, 0);
    let got = send(&mut other, 5, 1, 10);
    assert_eq!(got, "n2");
    assert_eq!(other.decisions().prefix_hit, 1);
}

#[test]
fn eviction_bounds_the_index_and_forgotten_tenants_route_by_load() {
    let mut r = cluster(3, "prefix_aware");
    r.set_prefix_capacity(200); // about three tenants' prompts per node
    let mut rng = StdRng::seed_from_u64(3);
    for q in 0..5_000 {
        let t = rng.gen_range(0..200);
        let id = send(&mut r, t, q, q as u64);
        r.finished(&id);
        for i in 0..3 {
            assert!(r.prefix_len(&format!("n{i}")) <= 200);
        }
    }
    // every node serves: evicted tenants land by load and cache size
    let d = r.decisions();
    assert!(d.load > 0, "{d:?}");
}

#[test]
fn nodes_joining_and_dying_under_random_churn_never_route_to_a_dead_node() {
    let mut r = cluster(5, "prefix_aware");
    let mut rng = StdRng::seed_from_u64(42);
    let mut alive = [true, true, true, true, true, false, false, false];
    let mut running: Vec<String> = Vec::new();
    for q in 0..5_000 {
        if q % 50 == 0 {
            let i = rng.gen_range(1..8); // n0 is the entry node and stays
            alive[i] = !alive[i];
            if alive[i] {
                r.update(node(&format!("n{i}")));
            } else {
                r.remove(&format!("n{i}"));
                running.retain(|x| *x != format!("n{i}"));
            }
        }
        if running.len() >= 8 {
            let id = running.swap_remove(rng.gen_range(0..running.len()));
            r.finished(&id);
        }
        let t = zipf(&mut rng, 30, 1.1);
        let id = send(&mut r, t, q, q as u64);
        let i: usize = id[1..].parse().unwrap();
        assert!(alive[i], "routed to dead n{i}");
        running.push(id);
    }
    let d = r.decisions();
    assert_eq!(d.prefix_hit + d.load + d.spread, 5_000);
    assert!(d.prefix_hit > d.load, "{d:?}");
}

#[test]
fn other_policies_ignore_the_prefix() {
    let mut r = cluster(3, "round_robin");
    let got: Vec<String> = (0..6)
        .map(|q| {
            let id = send(&mut r, 0, q, q as u64);
            r.finished(&id);
            id
        })
        .collect();
    assert_eq!(got, ["n0", "n1", "n2", "n0", "n1", "n2"]);
    let mut r = cluster(3, "least_loaded");
    let a = send(&mut r, 0, 0, 0);
    let b = send(&mut r, 1, 0, 0);
    r.finished(&a);
    // least loaded: tenant 0 goes to the idle node, whatever is warm
    assert_eq!(send(&mut r, 0, 1, 1), a);
    let _ = b;
    assert!(policy_by_name("fastest").is_none());
}
