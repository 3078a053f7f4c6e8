//! Joining, rejoining, addresses, quorum, voters and learners, removal.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_rejoins_with_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let follower = nodes
        .iter()
        .position(|n| n.status().role != "leader")
        .unwrap();
    let id = nodes[follower].node_id().to_owned();
    let cert_before = std::fs::read(dir.path().join(&id).join("tls/node.pem")).unwrap();
    nodes[follower].stop().await;
    // restart with no join list and no token: the data dir is enough; on a
    // new port, so peers must learn the new address
    let again = Cluster::start(cfg(&id, dir.path(), vec![], None))
        .await
        .unwrap();
    let a2 = again.clone();
    wait_for(
        "restarted node sees everyone",
        Duration::from_secs(10),
        || {
            let v = a2.nodes();
            v.len() == 3 && v.iter().all(|x| x.alive) && a2.status().leader_id.is_some()
        },
    )
    .await;
    assert_eq!(
        std::fs::read(dir.path().join(&id).join("tls/node.pem")).unwrap(),
        cert_before
    );
    assert_eq!(again.status().voters.len(), 3);
    again.stop().await;
    for (i, n) in nodes.iter().enumerate() {
        if i != follower {
            n.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_0_0_0_0_advertise_the_address_peers_reach_them_at() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = cfg("a", dir.path(), vec![], None);
    ca.host = "0.0.0.0".into();
    let a = Cluster::start(ca).await.unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let port = a.local_addr().unwrap().port();
    let mut cb = cfg(
        "b",
        dir.path(),
        vec![format!("127.0.0.1:{port}")],
        Some(a.join_token()),
    );
    cb.host = "0.0.0.0".into();
    let b = Cluster::start(cb).await.unwrap();
    let (a2, b2) = (a.clone(), b.clone());
    wait_for(
        "concrete addresses everywhere",
        Duration::from_secs(10),
        || {
            [&a2, &b2].iter().all(|n| {
                let v = n.nodes();
                v.len() == 2
                    && v.iter()
                        .all(|x| x.alive && x.p2p_address.starts_with("127.0.0.1:"))
            })
        },
    )
    .await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_dials_a_seed_on_0_0_0_0_at_once() {
    // "a" < "z": the joiner is the side that dials. The seed's recorded
    // address is 0.0.0.0 until it learns its IP; the joiner must not wait for
    // the seed's fallback dial to be connected.
    let dir = tempfile::tempdir().unwrap();
    let mut cz = cfg("z", dir.path(), vec![], None);
    cz.host = "0.0.0.0".into();
    let z = Cluster::start(cz).await.unwrap();
    wait_for("z to lead", Duration::from_secs(5), || {
        z.status().role == "leader"
    })
    .await;
    let port = z.local_addr().unwrap().port();
    let a = Cluster::start(cfg(
        "a",
        dir.path(),
        vec![format!("127.0.0.1:{port}")],
        Some(z.join_token()),
    ))
    .await
    .unwrap();
    let a2 = a.clone();
    wait_for(
        "a connected to z before z's own fallback dial",
        FALLBACK_DIAL_AFTER - Duration::from_millis(500),
        || a2.status().peers_connected == 1,
    )
    .await;
    a.stop().await;
    z.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_reports_degraded_and_accepts_no_change() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let li = nodes
        .iter()
        .position(|n| n.status().role == "leader")
        .unwrap();
    for (i, n) in nodes.iter().enumerate() {
        if i != li {
            n.stop().await;
        }
    }
    let leader = nodes[li].clone();
    let l2 = leader.clone();
    wait_for(
        "the lone leader reports degraded",
        Duration::from_secs(5),
        || l2.status().degraded,
    )
    .await;
    let newcomer = NodeMeta {
        name: "zz".into(),
        p2p_address: "127.0.0.1:9".into(),
        api_address: String::new(),
    };
    let res = tokio::time::timeout(Duration::from_secs(3), leader.add_member(newcomer)).await;
    assert!(
        !matches!(res, Ok(Ok(()))),
        "a minority accepted a membership change"
    );
    assert!(leader.nodes().iter().all(|n| n.id != "zz"));
    assert_eq!(leader.store.nodes().len(), 3);
    leader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_five_voters_the_rest_learn() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("n0", dir.path(), vec![], None))
        .await
        .unwrap();
    wait_for("n0 to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let token = Some(a.join_token());
    let mut nodes = vec![a];
    for i in 1..7 {
        let seed = seed(&nodes[i - 1]);
        let n = Cluster::start(cfg(&format!("n{i}"), dir.path(), seed, token.clone()))
            .await
            .unwrap();
        nodes.push(n);
    }
    let all = nodes.clone();
    wait_for(
        "7 members, 5 voters, 2 learners, seen by all",
        Duration::from_secs(20),
        || {
            all.iter().all(|n| {
                let s = n.status();
                s.voters.len() == 5
                    && s.learners.len() == 2
                    && n.nodes().iter().filter(|v| v.alive).count() == 7
            })
        },
    )
    .await;
    let roles: Vec<&str> = nodes.iter().map(|n| n.status().role).collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "leader").count(),
        1,
        "{roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| **r == "learner").count(),
        2,
        "{roles:?}"
    );
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_after_log_compaction_installs_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    // a metadata change so the snapshot holds more than the membership
    a.raft
        .client_write(Command::SetNode(NodeMeta {
            name: "a".into(),
            p2p_address: a.local_addr().unwrap().to_string(),
            api_address: "http://changed".into(),
        }))
        .await
        .unwrap();
    a.raft.trigger().snapshot().await.unwrap();
    let a2 = a.clone();
    wait_for("a snapshot", Duration::from_secs(5), || {
        a2.raft.metrics().borrow().snapshot.is_some()
    })
    .await;
    let upto = a.raft.metrics().borrow().snapshot.unwrap().index;
    a.raft.trigger().purge_log(upto).await.unwrap();
    wait_for("the log purged", Duration::from_secs(5), || {
        a2.raft
            .metrics()
            .borrow()
            .purged
            .is_some_and(|p| p.index == upto)
    })
    .await;

    let b = Cluster::start(cfg("b", dir.path(), seed(&a), Some(a.join_token())))
        .await
        .unwrap();
    let b2 = b.clone();
    wait_for(
        "b learns the state from the snapshot",
        Duration::from_secs(10),
        || {
            let v = b2.nodes();
            b2.raft.metrics().borrow().snapshot.is_some()
                && v.len() == 2
                && v.iter()
                    .any(|n| n.id == "a" && n.api_address == "http://changed")
                && b2.status().voters.len() == 2
        },
    )
    .await;
    // and it survives a restart of b from disk
    b.stop().await;
    let b = Cluster::start(cfg("b", dir.path(), vec![], None))
        .await
        .unwrap();
    assert!(b
        .nodes()
        .iter()
        .any(|n| n.id == "a" && n.api_address == "http://changed"));
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_voter_is_removed_and_no_longer_counts() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let li = nodes
        .iter()
        .position(|n| n.status().role == "leader")
        .unwrap();
    let (fi, gone) = {
        let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
        (others[0], others[1])
    };
    let follower = nodes[fi].clone();
    let gone_id = nodes[gone].node_id().to_owned();
    // refused while it is up, for itself and for a stranger
    assert!(follower.remove_member(&gone_id).await.is_err());
    assert!(follower.remove_member(follower.node_id()).await.is_err());
    assert!(follower.remove_member("stranger").await.is_err());
    nodes[gone].stop().await;
    let f2 = follower.clone();
    let g2 = gone_id.clone();
    wait_for("the node seen down", Duration::from_secs(10), || {
        f2.nodes().iter().any(|n| n.id == g2 && !n.alive)
    })
    .await;
    follower.remove_member(&gone_id).await.unwrap();
    let alive = [nodes[li].clone(), follower.clone()];
    let g3 = gone_id.clone();
    wait_for("two voters everywhere", Duration::from_secs(5), || {
        alive.iter().all(|n| {
            let s = n.status();
            s.voters.len() == 2 && !s.members.contains(&g3) && n.nodes().iter().all(|x| x.id != g3)
        })
    })
    .await;
    // the two left are a quorum of two: a change still commits
    assert!(follower.put_tombstone("after:latest", 1).await.is_ok());

    // === the removed node's certificate is denied and its token is dead
    let old_token = nodes[gone].join_token();
    let leader = nodes[li].clone();
    let (l2, f3, g4) = (leader.clone(), follower.clone(), gone_id.clone());
    wait_for(
        "the certificate denied and the secret rotated everywhere",
        Duration::from_secs(5),
        || {
            [&l2, &f3]
                .iter()
                .all(|n| n.denied().values().any(|v| *v == g4) && n.join_token() != old_token)
        },
    )
    .await;
    let back = Cluster::start(cfg(&gone_id, dir.path(), vec![], None))
        .await
        .unwrap();
    let l3 = leader.clone();
    wait_for(
        "its old certificate refused on accept",
        Duration::from_secs(10),
        || l3.counters.refusals(Refusal::Denied) >= 1,
    )
    .await;
    assert!(back.mesh.connected().is_empty());
    assert!(leader.nodes().iter().all(|x| x.id != gone_id));
    back.stop().await;
    // the old token no longer joins, through the leader or the follower
    for via in [&leader, &follower] {
        let err = Cluster::start(cfg("again", dir.path(), seed(via), Some(old_token.clone())))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClusterError::JoinRefused(_)), "{err}");
    }
    // a rotation by hand, from the follower, takes effect on the leader too
    let before = leader.join_token();
    let rotated = follower.rotate_join_secret().await.unwrap();
    assert_ne!(rotated, before);
    let (l4, r2) = (leader.clone(), rotated.clone());
    wait_for("the leader answers with it", Duration::from_secs(5), || {
        l4.join_token() == r2
    })
    .await;
    let err = Cluster::start(cfg("late", dir.path(), seed(&leader), Some(before)))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClusterError::JoinRefused(_)), "{err}");
    let secret_on_disk =
        std::fs::read_to_string(dir.path().join(follower.node_id()).join("tls/join-secret"))
            .unwrap();
    assert!(
        rotated.ends_with(&secret_on_disk),
        "{rotated} {secret_on_disk}"
    );
    for n in alive {
        n.stop().await;
    }
}
