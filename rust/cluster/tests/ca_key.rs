//! Only voters hold the CA key: joiners get none, learners pass joins on to a
//! voter, a promoted learner fetches the key, a learner deletes an old one.

use super::*;

fn capped(
    id: &str,
    dir: &std::path::Path,
    join: Vec<String>,
    token: Option<String>,
    max: usize,
) -> ClusterConfig {
    ClusterConfig {
        max_voters: max,
        ..cfg(id, dir, join, token)
    }
}

fn key_file(dir: &std::path::Path, id: &str) -> std::path::PathBuf {
    TlsMaterial::ca_key_path(&dir.join(id).join("tls"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learners_hold_no_ca_key_and_pass_joins_to_a_voter() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // one voter: every other node stays a learner
    let a = Cluster::start(capped("a", d, vec![], None, 1))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    assert!(a.holds_ca_key() && key_file(d, "a").is_file());
    let token = Some(a.join_token());
    let b = Cluster::start(capped("b", d, seed(&a), token.clone(), 1))
        .await
        .unwrap();
    let b2 = b.clone();
    wait_for(
        "b a learner connected to a",
        Duration::from_secs(10),
        || b2.status().learners == ["b"] && b2.mesh.connection("a").is_some(),
    )
    .await;
    assert!(!b.holds_ca_key() && !key_file(d, "b").exists());

    // c joins through the learner b: b has a sign it
    let c = Cluster::start(capped("c", d, seed(&b), token.clone(), 1))
        .await
        .unwrap();
    assert_eq!(b.counters.joins_forwarded.load(Ordering::Relaxed), 1);
    assert_eq!(b.counters.joins_accepted.load(Ordering::Relaxed), 1);
    assert_eq!(a.counters.joins_accepted.load(Ordering::Relaxed), 1);
    assert!(!c.holds_ca_key() && !key_file(d, "c").exists());
    let all = [a.clone(), b.clone(), c.clone()];
    wait_for("c a member everywhere", Duration::from_secs(10), || {
        all.iter().all(|n| {
            let s = n.status();
            s.voters == ["a"] && s.learners.len() == 2 && s.peers_connected == 2
        })
    })
    .await;

    // a learner is refused the key over its authenticated connection
    let conn = b.mesh.connection("a").unwrap();
    let refused = call_for::<String>(&conn, Kind::CaKey, b"").await;
    assert!(
        matches!(&refused, Err(ClusterError::Raft(m)) if m.contains("not a voter")),
        "{refused:?}"
    );
    // and cannot sign a certificate itself
    assert!(b.signer().is_none());

    // a certificate for a member that is up is not signed for anyone
    let err = Cluster::start(capped("b", &d.join("imposter"), seed(&c), token.clone(), 1))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("belongs to a member that is up"),
        "{err}"
    );
    assert_eq!(a.status().members.len(), 3);

    // the learner's data dir alone, restarted, still holds no key
    c.stop().await;
    let c = Cluster::start(capped("c", d, vec![], None, 1))
        .await
        .unwrap();
    let c2 = c.clone();
    wait_for("c back", Duration::from_secs(10), || {
        c2.mesh.connection("a").is_some()
    })
    .await;
    assert!(!c.holds_ca_key() && !key_file(d, "c").exists());
    for n in [a, b, c] {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_learner_gets_the_key_and_an_old_learner_key_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // three voters, so one may die and be removed; d stays a learner
    let a = Cluster::start(capped("a", d, vec![], None, 3))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let token = Some(a.join_token());
    let mut nodes = vec![a.clone()];
    for id in ["b", "c", "d"] {
        let via = nodes.last().unwrap().clone();
        nodes.push(
            Cluster::start(capped(id, d, seed(&via), token.clone(), 3))
                .await
                .unwrap(),
        );
        let all = nodes.clone();
        let n = all.len();
        wait_for(
            "the joiner settled everywhere",
            Duration::from_secs(10),
            || {
                all.iter().all(|x| {
                    let s = x.status();
                    s.voters.len() == n.min(3) && s.members.len() == n && s.peers_connected == n - 1
                })
            },
        )
        .await;
    }
    let all = nodes.clone();
    wait_for("the voters hold the key", Duration::from_secs(10), || {
        all[..3].iter().all(|n| n.holds_ca_key())
    })
    .await;
    for id in ["a", "b", "c"] {
        assert!(key_file(d, id).is_file(), "{id}");
    }
    let learner = nodes.pop().unwrap();
    assert_eq!(learner.status().learners, ["d"]);
    assert!(!learner.holds_ca_key() && !key_file(d, "d").exists());

    // === a learner with the key from an older release deletes it on start
    learner.stop().await;
    std::fs::copy(key_file(d, "a"), key_file(d, "d")).unwrap();
    let learner = Cluster::start(capped("d", d, vec![], None, 3))
        .await
        .unwrap();
    let l2 = learner.clone();
    wait_for("d deletes the old key", Duration::from_secs(10), || {
        !l2.holds_ca_key() && !key_file(d, "d").exists()
    })
    .await;

    // === b is gone for good: d takes its place as a voter, and the key
    let a2 = a.clone();
    wait_for("d caught up at the leader", Duration::from_secs(10), || {
        let m = a2.raft.metrics().borrow().clone();
        let matched = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&raft_id("d")).cloned().flatten());
        matched.is_some_and(|x| Some(x.index) >= m.last_log_index)
            && a2.nodes().iter().any(|n| n.id == "d" && n.alive)
    })
    .await;
    nodes[1].stop().await;
    wait_for("b seen down", Duration::from_secs(10), || {
        a2.nodes().iter().any(|n| n.id == "b" && !n.alive)
    })
    .await;
    a.remove_member("b").await.unwrap();
    let l3 = learner.clone();
    wait_for("d a voter with the key", Duration::from_secs(10), || {
        l3.status().voters.contains(&"d".to_owned()) && l3.holds_ca_key()
    })
    .await;
    assert!(key_file(d, "d").is_file());
    // and d now signs joins itself, with the token the removal rotated
    let (a3, l4) = (a.clone(), learner.clone());
    wait_for("d has the rotated secret", Duration::from_secs(5), || {
        l4.join_token() == a3.join_token()
    })
    .await;
    let e = Cluster::start(capped("e", d, seed(&learner), Some(a.join_token()), 3))
        .await
        .unwrap();
    assert_eq!(learner.counters.joins_forwarded.load(Ordering::Relaxed), 0);
    assert_eq!(learner.counters.joins_accepted.load(Ordering::Relaxed), 1);
    assert!(!e.holds_ca_key());
    for n in [a, nodes[2].clone(), learner, e] {
        n.stop().await;
    }
}
