//! Tests of `SlotPool`: admission, hand-over, and fairness by tokens.
use super::*;

fn ask(tenant: &str, tokens: u64) -> Ask<'_> {
    Ask {
        tenant,
        tokens,
        ..Ask::default()
    }
}

fn batch(tenant: &str, tokens: u64) -> Ask<'_> {
    Ask {
        tenant,
        tokens,
        class: Class::Batch,
        ..Ask::default()
    }
}

#[test]
fn runs_until_slots_are_busy_then_queues_then_refuses() {
    let mut pool = SlotPool::new(2, 1);
    pool.configure_fairness(1.0, DEFAULT_PROMOTE_AFTER);
    assert_eq!(pool.admit("m", 1, 0, Ask::default()), Admit::Run(0));
    assert_eq!(pool.admit("m", 2, 0, Ask::default()), Admit::Run(1));
    assert_eq!(pool.admit("m", 3, 0, Ask::default()), Admit::Queued);
    assert_eq!(pool.admit("m", 4, 0, Ask::default()), Admit::Full);
    assert_eq!(pool.admit("m", 5, 0, ask("other", 1)), Admit::Full);
    assert_eq!(pool.queue_depth(), 1);
    assert_eq!(pool.total_in_flight(), 2);
}

#[test]
fn release_hands_the_slot_to_the_oldest_waiter_of_one_tenant() {
    let mut pool = SlotPool::new(1, 8);
    assert_eq!(pool.admit("m", 1, 0, Ask::default()), Admit::Run(0));
    assert_eq!(pool.admit("m", 2, 0, Ask::default()), Admit::Queued);
    assert_eq!(pool.admit("m", 3, 0, Ask::default()), Admit::Queued);
    assert_eq!(pool.release("m", 0, 1, None), Some((2, 0)));
    assert_eq!(pool.release("m", 0, 2, None), Some((3, 0)));
    assert_eq!(pool.release("m", 0, 3, None), None);
    assert_eq!(pool.in_flight("m"), 0);
    assert_eq!(pool.queue_depth(), 0);
}

#[test]
fn cancel_removes_a_waiter_and_frees_queue_room() {
    let mut pool = SlotPool::new(1, 1);
    pool.configure_fairness(1.0, DEFAULT_PROMOTE_AFTER);
    pool.admit("m", 1, 0, Ask::default());
    assert_eq!(pool.admit("m", 2, 0, Ask::default()), Admit::Queued);
    assert!(pool.cancel("m", 2));
    assert!(!pool.cancel("m", 2));
    assert_eq!(pool.tenant_queued(""), 0);
    assert_eq!(pool.admit("m", 3, 0, Ask::default()), Admit::Queued);
    assert_eq!(pool.release("m", 0, 1, None), Some((3, 0)));
}

#[test]
fn double_release_is_ignored() {
    let mut pool = SlotPool::new(1, 1);
    pool.admit("m", 1, 0, Ask::default());
    assert_eq!(pool.release("m", 0, 1, None), None);
    assert_eq!(pool.release("m", 0, 1, None), None);
    assert_eq!(pool.release("m", 7, 1, None), None);
    assert_eq!(pool.release("other", 0, 1, None), None);
    assert_eq!(pool.admit("m", 2, 2, Ask::default()), Admit::Run(0));
}

#[test]
fn models_have_separate_slots() {
    let mut pool = SlotPool::new(1, 0);
    assert_eq!(pool.admit("a", 1, 0, Ask::default()), Admit::Run(0));
    assert_eq!(pool.admit("b", 2, 0, Ask::default()), Admit::Run(0));
    assert_eq!(pool.admit("a", 3, 0, ask("x", 1)), Admit::Full);
}

#[test]
fn evicts_the_least_recently_used_idle_model() {
    let mut pool = SlotPool::new(1, 4);
    pool.admit("a", 1, 10, Ask::default());
    pool.release("a", 0, 10, None);
    pool.admit("b", 2, 20, Ask::default());
    pool.release("b", 0, 20, None);
    pool.admit("c", 3, 30, Ask::default()); // busy
    let loaded: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    assert_eq!(pool.evict_candidate(&loaded, 3), Some("a".into()));
    assert_eq!(pool.evict_candidate(&loaded, 4), None);
    pool.admit("a", 4, 40, Ask::default()); // now busy
    pool.admit("b", 5, 40, Ask::default());
    assert_eq!(pool.evict_candidate(&loaded, 3), None);
}

#[test]
fn shrinking_num_parallel_drains_extra_slots() {
    let mut pool = SlotPool::new(2, 4);
    assert_eq!(pool.admit("m", 1, 0, Ask::default()), Admit::Run(0));
    assert_eq!(pool.admit("m", 2, 0, Ask::default()), Admit::Run(1));
    pool.configure(1, 4);
    assert_eq!(pool.admit("m", 3, 0, Ask::default()), Admit::Queued);
    // slot 1 is outside the new limit: it is freed, not handed on
    assert_eq!(pool.release("m", 1, 1, None), None);
    assert_eq!(pool.release("m", 0, 1, None), Some((3, 0)));
}

/// One slot, every tenant kept backlogged with `depth` requests of its own
/// size; returns the tokens each tenant was served over `rounds` releases.
fn backlogged(
    pool: &mut SlotPool,
    tenants: &[(&str, u64, f64)],
    depth: usize,
    rounds: usize,
) -> HashMap<String, u64> {
    let mut ticket = 0u64;
    let mut owner: HashMap<u64, (String, u64)> = HashMap::new();
    let mut now = 0;
    let mut running: Option<u64> = None;
    for _ in 0..depth {
        for &(t, tokens, weight) in tenants {
            ticket += 1;
            owner.insert(ticket, (t.to_owned(), tokens));
            let a = Ask {
                tenant: t,
                weight,
                tokens,
                class: Class::Interactive,
            };
            match pool.admit("m", ticket, now, a) {
                Admit::Run(_) => running = Some(ticket),
                Admit::Queued => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let mut served: HashMap<String, u64> = HashMap::new();
    for _ in 0..rounds {
        now += 1;
        let done = running.expect("a request runs");
        let (t, tokens) = owner[&done].clone();
        *served.entry(t.clone()).or_default() += tokens;
        let next = pool.release("m", 0, now, Some(tokens));
        running = next.map(|(tk, _)| tk);
        // the tenant whose request ended sends another: still backlogged
        let &(tn, tok, weight) = tenants.iter().find(|x| x.0 == t).unwrap();
        ticket += 1;
        owner.insert(ticket, (tn.to_owned(), tok));
        let a = Ask {
            tenant: tn,
            weight,
            tokens: tok,
            class: Class::Interactive,
        };
        match pool.admit("m", ticket, now, a) {
            Admit::Run(_) => running = Some(ticket),
            Admit::Queued => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    served
}

#[test]
fn backlogged_tenants_get_equal_tokens_not_equal_requests() {
    let mut pool = SlotPool::new(1, 1000);
    // "big" sends 10x longer requests than "small"
    let served = backlogged(
        &mut pool,
        &[("big", 1000, 1.0), ("small", 100, 1.0)],
        20,
        2000,
    );
    let (big, small) = (served["big"] as f64, served["small"] as f64);
    assert!(
        (big - small).abs() <= 1000.0,
        "tokens served: big {big}, small {small}"
    );
    // by requests, small got about ten times as many
    assert!(small / 100.0 > 8.0 * big / 1000.0);
}

#[test]
fn weights_split_tokens_in_proportion() {
    let mut pool = SlotPool::new(1, 1000);
    let served = backlogged(
        &mut pool,
        &[("gold", 100, 3.0), ("free", 100, 1.0)],
        10,
        4000,
    );
    let ratio = served["gold"] as f64 / served["free"] as f64;
    assert!((ratio - 3.0).abs() < 0.1, "gold/free = {ratio}");
}

#[test]
fn many_tenants_one_heavy_each_gets_its_share() {
    let mut pool = SlotPool::new(1, 1000);
    let served = backlogged(
        &mut pool,
        &[
            ("heavy", 500, 1.0),
            ("a", 50, 1.0),
            ("b", 80, 1.0),
            ("c", 200, 1.0),
        ],
        30,
        3000,
    );
    let v: Vec<f64> = served.values().map(|x| *x as f64).collect();
    let (sum, sq) = (v.iter().sum::<f64>(), v.iter().map(|x| x * x).sum::<f64>());
    let jain = sum * sum / (v.len() as f64 * sq);
    assert!(jain > 0.99, "Jain's index {jain}: {served:?}");
}

#[test]
fn the_estimate_is_corrected_on_release() {
    let mut pool = SlotPool::new(1, 100);
    assert_eq!(pool.admit("m", 1, 0, ask("a", 10)), Admit::Run(0));
    // a guessed 10 tokens, took 5000: a's counter says 5000 once released
    assert_eq!(pool.admit("m", 2, 0, ask("a", 10)), Admit::Queued);
    assert_eq!(pool.admit("m", 3, 0, ask("b", 10)), Admit::Queued);
    let counter = |p: &SlotPool, t: &str| p.tenants().iter().find(|v| v.name == t).unwrap().counter;
    assert_eq!(counter(&pool, "a"), 10.0);
    assert_eq!(
        pool.release("m", 0, 1, Some(5000)),
        Some((3, 0)),
        "b goes before a's second"
    );
    assert_eq!(counter(&pool, "a"), 5000.0);
}

#[test]
fn an_idle_tenant_does_not_bank_credit() {
    let mut pool = SlotPool::new(1, 100);
    let served = backlogged(&mut pool, &[("a", 100, 1.0), ("b", 100, 1.0)], 5, 200);
    assert!(served["a"] > 0);
    // "late" arrives after 20,000 tokens were served: it starts at the
    // backlogged tenants' level, so it takes turns with them instead of
    // running 100 requests in a row
    let mut next = 10_000;
    assert_eq!(pool.admit("m", next, 1000, ask("late", 100)), Admit::Queued);
    let mut lates_in_a_row = 0;
    for i in 0..6 {
        let (t, _) = pool.release("m", 0, 1001 + i, Some(100)).unwrap();
        if t >= 10_000 {
            lates_in_a_row += 1;
            next += 1;
            assert_eq!(
                pool.admit("m", next, 1001 + i, ask("late", 100)),
                Admit::Queued
            );
        }
    }
    assert!(lates_in_a_row <= 3, "late ran {lates_in_a_row} of 6 turns");
    assert!(lates_in_a_row >= 1);
}

#[test]
fn batch_waits_while_interactive_work_queues() {
    let mut pool = SlotPool::new(1, 100);
    assert_eq!(pool.admit("m", 1, 0, ask("u", 10)), Admit::Run(0));
    assert_eq!(pool.admit("m", 2, 0, batch("webui", 1000)), Admit::Queued);
    assert_eq!(pool.admit("m", 3, 1, ask("u", 10)), Admit::Queued);
    assert_eq!(pool.admit("m", 4, 2, ask("u", 10)), Admit::Queued);
    // the batch request is older, and its tenant's counter is lower
    assert_eq!(pool.position("m", 3, 2), Some(1));
    assert_eq!(pool.position("m", 2, 2), Some(3));
    assert_eq!(pool.release("m", 0, 3, None), Some((3, 0)));
    assert_eq!(pool.release("m", 0, 4, None), Some((4, 0)));
    assert_eq!(pool.release("m", 0, 5, None), Some((2, 0)));
}

#[test]
fn old_batch_work_is_promoted() {
    let mut pool = SlotPool::new(1, 100);
    pool.configure_fairness(0.5, 1000);
    assert_eq!(pool.admit("m", 1, 0, ask("u", 10)), Admit::Run(0));
    assert_eq!(pool.admit("m", 2, 0, batch("bg", 10)), Admit::Queued);
    assert_eq!(pool.admit("m", 3, 500, ask("u", 10)), Admit::Queued);
    assert_eq!(pool.position("m", 2, 999), Some(2));
    // at 1000 ms the batch request competes as interactive, and bg's counter
    // is below u's
    assert_eq!(pool.position("m", 2, 1000), Some(1));
    assert_eq!(pool.release("m", 0, 1000, None), Some((2, 0)));
}

#[test]
fn batch_is_never_starved_by_a_stream_of_interactive_work() {
    let mut pool = SlotPool::new(1, 1000);
    pool.configure_fairness(0.5, 100);
    assert_eq!(pool.admit("m", 1, 0, ask("u0", 50)), Admit::Run(0));
    assert_eq!(pool.admit("m", 2, 0, batch("bg", 50)), Admit::Queued);
    let mut ticket = 2;
    let mut served_at = None;
    for now in 1..1000u64 {
        // three interactive tenants keep the queue full
        for t in ["u0", "u1", "u2"] {
            ticket += 1;
            pool.admit("m", ticket, now, ask(t, 50));
        }
        let (got, _) = pool.release("m", 0, now, Some(50)).unwrap();
        if got == 2 {
            served_at = Some(now);
            break;
        }
    }
    let at = served_at.expect("the batch request was starved");
    assert!((100..110).contains(&at), "served at {at}");
}

#[test]
fn a_tenant_over_its_share_gets_429_while_others_are_admitted() {
    let mut pool = SlotPool::new(1, 10);
    assert_eq!(pool.tenant_cap(1.0), 5);
    assert_eq!(pool.tenant_cap(4.0), 10);
    assert_eq!(pool.admit("m", 1, 0, ask("heavy", 10)), Admit::Run(0));
    for t in 2..7 {
        assert_eq!(pool.admit("m", t, 0, ask("heavy", 10)), Admit::Queued);
    }
    assert_eq!(pool.admit("m", 7, 0, ask("heavy", 10)), Admit::TenantFull);
    for t in 8..13 {
        assert_eq!(
            pool.admit("m", t, 0, ask(&format!("light{t}"), 10)),
            Admit::Queued
        );
    }
    assert_eq!(pool.queue_depth(), 10);
    assert_eq!(pool.admit("m", 13, 0, ask("light", 10)), Admit::Full);
    // the light tenants arrived while heavy was backlogged: lifted to its
    // counter, they tie with it and, waiting with fewer requests, go first
    for t in 8..13 {
        assert_eq!(pool.release("m", 0, 1, None).map(|x| x.0), Some(t));
    }
    assert_eq!(pool.release("m", 0, 1, None).map(|x| x.0), Some(2));
}

#[test]
fn entries_list_running_then_queued_in_serving_order() {
    let mut pool = SlotPool::new(1, 10);
    pool.admit("m", 1, 0, ask("a", 100));
    pool.admit("m", 2, 1, ask("a", 100));
    pool.admit("m", 3, 2, batch("b", 100));
    pool.admit("m", 4, 3, ask("c", 100));
    let e = pool.entries(10);
    let got: Vec<(u64, bool, u32, u64)> = e
        .iter()
        .map(|x| (x.ticket, x.running, x.slot_or_position, x.age))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, true, 0, 10),
            (2, false, 1, 9),
            (4, false, 2, 7),
            (3, false, 3, 8)
        ]
    );
    // b and c were lifted to a's counter on arrival: a tie, and each
    // tenant waits with one request, so a's older one goes first, then
    // c's; b's batch request goes last
    assert_eq!(e[3].class, Class::Batch);
    assert_eq!(e[2].tenant, "c");
    let t = pool.tenants();
    assert_eq!(
        t.iter()
            .map(|v| (v.name.as_str(), v.queued, v.running))
            .collect::<Vec<_>>(),
        vec![("a", 1, 1), ("b", 1, 0), ("c", 1, 0)]
    );
}

#[test]
fn idle_tenants_are_forgotten() {
    let mut pool = SlotPool::new(1, 10);
    for i in 0..100u64 {
        let name = format!("10.0.0.{i}");
        assert_eq!(pool.admit("m", i, i, ask(&name, 10)), Admit::Run(0));
        pool.release("m", 0, i, Some(10));
    }
    assert!(pool.tenants().len() <= 1, "{:?}", pool.tenants());
}

#[test]
fn a_heavy_tenant_leaves_slots_free_for_recent_idle_tenants() {
    let mut pool = SlotPool::new(4, 64);
    // three light tenants were seen lately, each done by now
    for (k, t) in ["victim", "b", "c"].iter().enumerate() {
        let tk = 100 + k as u64;
        assert_eq!(pool.admit("m", tk, 0, ask(t, 10)), Admit::Run(0));
        assert!(pool.release("m", 0, 1, None).is_none());
    }
    // heavy floods: it gets two of the four slots, two stay free for the others
    let mut got = Vec::new();
    for tk in 1..=6 {
        got.push(pool.admit("m", tk, 2, ask("heavy", 10)));
    }
    let ran = got.iter().filter(|a| matches!(a, Admit::Run(_))).count();
    assert_eq!(ran, 2, "{got:?}");
    assert_eq!(pool.queue_depth(), 4);
    // the victim's request starts at once, as does b's
    assert!(matches!(
        pool.admit("m", 7, 3, ask("victim", 10)),
        Admit::Run(_)
    ));
    assert!(matches!(pool.admit("m", 8, 3, ask("b", 10)), Admit::Run(_)));
    // a heavy request ends: its slot stays free for c, the only recent
    // tenant with nothing running or queued (heavy still runs one)
    let heavy_slot = match got[0] {
        Admit::Run(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!(pool.release("m", heavy_slot, 4, None), None);
    assert_eq!(pool.in_flight("m"), 3);
    assert!(matches!(pool.admit("m", 9, 5, ask("c", 10)), Admit::Run(_)));
    // when the victim's request ends, heavy runs its share (one of four
    // tenants: one slot), so the slot is kept for the victim's next request
    let victim_slot = pool
        .entries(6)
        .iter()
        .find(|e| e.running && e.tenant == "victim")
        .map(|e| e.slot_or_position)
        .unwrap();
    assert_eq!(pool.release("m", victim_slot, 6, None), None);
    assert_eq!(pool.in_flight("m"), 3);
    assert!(matches!(
        pool.admit("m", 10, 7, ask("victim", 10)),
        Admit::Run(_)
    ));
}

#[test]
fn the_reserve_lapses_when_the_others_are_gone_or_backlogged() {
    let mut pool = SlotPool::new(4, 64);
    assert_eq!(pool.admit("m", 100, 0, ask("light", 10)), Admit::Run(0));
    assert!(pool.release("m", 0, 1, None).is_none());
    // within RECENT_MS of light's request: heavy keeps one slot free for it
    for tk in 1..=4 {
        pool.admit("m", tk, 2, ask("heavy", 10));
    }
    assert_eq!(pool.in_flight("m"), 3);
    // later, light is no longer recent: a release hands over, and every slot fills
    let later = 2 + RECENT_MS;
    assert!(pool.release("m", 0, later, None).is_some());
    assert!(matches!(
        pool.admit("m", 5, later, ask("heavy", 10)),
        Admit::Run(_)
    ));
    assert_eq!(pool.in_flight("m"), 4);
    let mut pool = SlotPool::new(2, 64);
    // two tenants backlogged: nothing is held back, both slots run
    for tk in 1..=3 {
        pool.admit("m", tk, 0, ask("x", 10));
        pool.admit("m", 10 + tk, 0, ask("y", 10));
    }
    assert_eq!(pool.in_flight("m"), 2);
}
