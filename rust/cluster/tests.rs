//! Several nodes in one process on 127.0.0.1, each with its own data dir.

use std::time::{Duration, Instant};

use super::*;

pub(super) fn cfg(
    id: &str,
    dir: &std::path::Path,
    join: Vec<String>,
    token: Option<String>,
) -> ClusterConfig {
    ClusterConfig {
        node_id: id.into(),
        data_dir: dir.join(id),
        host: "127.0.0.1".into(),
        port: 0,
        join,
        token,
        api_address: format!("http://127.0.0.1/{id}"),
        failure_timeout: Duration::from_millis(1000),
    }
}

pub(super) async fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

pub(super) fn seed(c: &Cluster) -> Vec<String> {
    vec![c.local_addr().unwrap().to_string()]
}

pub(super) async fn three(dir: &std::path::Path) -> Vec<Arc<Cluster>> {
    let a = Cluster::start(cfg("a", dir, vec![], None)).await.unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let token = Some(a.join_token());
    let b = Cluster::start(cfg("b", dir, seed(&a), token.clone()))
        .await
        .unwrap();
    let c = Cluster::start(cfg("c", dir, seed(&b), token))
        .await
        .unwrap();
    let all = vec![a, b, c];
    let nodes = all.clone();
    wait_for(
        "3 voters seen alive by all",
        Duration::from_secs(10),
        || {
            nodes.iter().all(|n| {
                let v = n.nodes();
                v.len() == 3 && v.iter().all(|x| x.alive && x.voter)
            })
        },
    )
    .await;
    all
}

/// Serve forwarded requests: answer `n` chunks, or an error for "fail".
fn serve(c: Arc<Cluster>, cancelled: Arc<AtomicU64>) {
    tokio::spawn(async move {
        while let Some(i) = c.next_inbound().await {
            let cancelled = cancelled.clone();
            tokio::spawn(async move {
                let req: serde_json::Value = serde_json::from_slice(&i.request).unwrap();
                if req["fail"].as_bool() == Some(true) {
                    i.reply.error(404, "model 'x' not found".into());
                    return;
                }
                let n = req["n"].as_u64().unwrap();
                for k in 0..n {
                    if !i.reply.chunk(Bytes::from(format!("{{\"k\":{k}}}"))) {
                        break;
                    }
                    if req["slow"].as_bool() == Some(true) {
                        tokio::select! {
                            _ = i.reply.cancelled() => { cancelled.fetch_add(1, Ordering::SeqCst); return; }
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                    }
                }
                i.reply.end();
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_forms_forwards_and_survives_its_leader() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let leaders: Vec<_> = nodes
        .iter()
        .filter(|n| n.status().role == "leader")
        .collect();
    assert_eq!(leaders.len(), 1);
    for n in &nodes {
        let s = n.status();
        assert!(!s.degraded, "{s:?}");
        assert_eq!(s.voters.len(), 3);
        assert_eq!(s.peers_connected, 2);
        assert_eq!(s.leader_id.as_deref(), Some(leaders[0].node_id()));
    }
    assert_eq!(nodes[0].counters.joins_accepted.load(Ordering::Relaxed), 1);
    assert_eq!(nodes[1].counters.joins_accepted.load(Ordering::Relaxed), 1);

    // adverts reach every node
    nodes[2].publish_advert(Bytes::from_static(b"{\"in_flight\":3}"));
    let n0 = nodes[0].clone();
    wait_for("c's advert at a", Duration::from_secs(3), || {
        n0.nodes()
            .iter()
            .any(|v| v.id == "c" && v.advert.as_ref().is_some_and(|a| a["in_flight"] == 3))
    })
    .await;

    // forwarding: a → c streams chunks in order
    let cancelled = Arc::new(AtomicU64::new(0));
    serve(nodes[2].clone(), cancelled.clone());
    let conns_before = nodes[0].status().connections_established;
    let mut s = nodes[0].forward("c", br#"{"n":1000}"#).await.unwrap();
    let mut got = Vec::new();
    while s.next_batch(&mut got).await.unwrap() {}
    assert_eq!(got.len(), 1000);
    assert_eq!(&got[999][..], b"{\"k\":999}");
    // many requests, one connection: each request is a stream on it
    for _ in 0..200 {
        let mut s = nodes[0].forward("c", br#"{"n":2}"#).await.unwrap();
        let mut got = Vec::new();
        while s.next_batch(&mut got).await.unwrap() {}
        assert_eq!(got.len(), 2);
    }
    assert_eq!(nodes[0].status().connections_established, conns_before);
    assert_eq!(nodes[0].status().peers_connected, 2);

    // remote errors keep their status
    let mut s = nodes[0].forward("c", br#"{"fail":true}"#).await.unwrap();
    let mut got = Vec::new();
    assert_eq!(
        s.next_batch(&mut got).await,
        Err(ForwardError::Remote {
            status: 404,
            message: "model 'x' not found".into()
        })
    );
    // unknown peers are unavailable, not errors of the request
    assert!(matches!(
        nodes[0].forward("zz", b"{}").await,
        Err(ForwardError::Unavailable(_))
    ));

    // dropping the caller's stream cancels the work at the far side
    let mut s = nodes[0]
        .forward("c", br#"{"n":100000,"slow":true}"#)
        .await
        .unwrap();
    let mut got = Vec::new();
    s.next_batch(&mut got).await.unwrap();
    drop(s);
    let c2 = cancelled.clone();
    let took = wait_for("cancellation at c", Duration::from_secs(3), || {
        c2.load(Ordering::SeqCst) == 1
    })
    .await;
    eprintln!("cancellation reached the far side in {took:?}");

    // stop the leader: a new one within 5 s, the survivors see it down
    let li = nodes
        .iter()
        .position(|n| n.status().role == "leader")
        .unwrap();
    let old = nodes[li].node_id().to_owned();
    nodes[li].stop().await;
    let rest: Vec<_> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, n)| n.clone())
        .collect();
    let r = rest.clone();
    let took = wait_for("new leader", Duration::from_secs(5), || {
        r.iter()
            .any(|n| n.status().role == "leader" && n.status().leader_id.as_deref() != Some(&old))
    })
    .await;
    eprintln!("new leader after {took:?}");
    let r = rest.clone();
    wait_for("old leader marked down", Duration::from_secs(3), || {
        r.iter()
            .all(|n| n.nodes().iter().any(|v| v.id == old && !v.alive))
    })
    .await;
    for n in &rest {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_and_missing_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let mut bad = JoinToken::parse(&a.join_token()).unwrap();
    bad.secret = "0123".into();
    let err = Cluster::start(cfg("x", dir.path(), seed(&a), Some(bad.render())))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClusterError::JoinRefused(_)), "{err}");
    assert_eq!(a.counters.joins_refused.load(Ordering::Relaxed), 1);
    assert!(!dir.path().join("x/tls/node.pem").exists());

    // a token pinning another CA refuses the server before sending the secret
    let other = TlsMaterial::create("o").unwrap().token();
    let err = Cluster::start(cfg("y", dir.path(), seed(&a), Some(other.render())))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClusterError::JoinRefused(_)), "{err}");

    // a connection without a client certificate may not speak Raft or Hello
    let tls = TlsMaterial::load(&dir.path().join("a/tls")).unwrap();
    let client = transport::client_config(
        crate::transport::tls::untrusted_client_config(&tls.ca, None).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(
            client,
            a.local_addr().unwrap(),
            crate::transport::tls::SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let r = transport::call(
        &conn,
        Kind::Hello,
        br#"{"id":"evil"}"#,
        Duration::from_secs(2),
    )
    .await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(
        a.counters.unauthenticated_refused.load(Ordering::Relaxed),
        1
    );
    assert!(a.nodes().iter().all(|n| n.id != "evil"));

    // a client certificate from another CA fails the handshake
    let foreign = TlsMaterial::create("f").unwrap();
    let client = transport::client_config(
        crate::transport::tls::untrusted_client_config(&tls.ca, Some(&foreign)).unwrap(),
        Duration::from_secs(2),
    )
    .unwrap();
    let r = async {
        let conn = ep
            .connect_with(
                client,
                a.local_addr().unwrap(),
                crate::transport::tls::SERVER_NAME,
            )?
            .await?;
        transport::call(
            &conn,
            Kind::Hello,
            br#"{"id":"evil"}"#,
            Duration::from_secs(2),
        )
        .await
    }
    .await;
    assert!(r.is_err(), "{r:?}");
    a.stop().await;
}

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

/// Rust-only forward round trip; `cargo test --release -- --ignored --nocapture rtt`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn rtt() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    serve(nodes[2].clone(), Arc::new(AtomicU64::new(0)));
    let mut times = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let mut s = nodes[0].forward("c", br#"{"n":1}"#).await.unwrap();
        let mut got = Vec::new();
        while s.next_batch(&mut got).await.unwrap() {}
        times.push(t.elapsed().as_micros());
    }
    times.sort();
    eprintln!(
        "rust-only forward round trip: p50 {} us p99 {} us",
        times[1000], times[1980]
    );
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

fn put_blob(root: &std::path::Path, name_hex: &str, data: &[u8]) -> std::path::PathBuf {
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    let p = root.join("blobs").join(format!("sha256-{name_hex}"));
    std::fs::write(&p, data).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_travel_verified_resume_and_refuse_a_wrong_digest() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (ra, rb) = (dir.path().join("store-a"), dir.path().join("store-b"));
    a.configure_blobs(ra.clone(), 0);
    b.configure_blobs(rb.clone(), 0);

    eprintln!("=== a 3 MiB blob from a to b, byte-identical");
    let data: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let hex = hex::encode(sha2::Sha256::digest(&data));
    put_blob(&ra, &hex, &data);
    let got = b.fetch_blob("a", &format!("sha256:{hex}")).await.unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), data);
    assert!(!rb
        .join("tmp")
        .join(format!("p2p-sha256-{hex}.partial"))
        .exists());
    let st = b.transfer_status();
    assert_eq!(st.totals.completed_in, 1);
    assert_eq!(st.totals.bytes_in, data.len() as u64);
    assert!(st.transfers.is_empty());
    assert_eq!(a.transfer_status().totals.bytes_out, data.len() as u64);

    eprintln!("=== resume: a partial of the first MiB is kept, only the rest moves");
    let data2: Vec<u8> = data.iter().map(|x| x ^ 0x5a).collect();
    let hex2 = hex::encode(sha2::Sha256::digest(&data2));
    put_blob(&ra, &hex2, &data2);
    std::fs::write(
        rb.join("tmp").join(format!("p2p-sha256-{hex2}.partial")),
        &data2[..1 << 20],
    )
    .unwrap();
    let got = b.fetch_blob("a", &hex2).await.unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), data2);
    assert_eq!(
        b.transfer_status().totals.bytes_in,
        data.len() as u64 + (data2.len() - (1 << 20)) as u64
    );

    eprintln!("=== a peer whose bytes are not the digest: refused, nothing visible");
    let liar = "b".repeat(64);
    put_blob(&ra, &liar, b"not what the name says");
    let e = b.fetch_blob("a", &liar).await.unwrap_err();
    assert!(matches!(e, BlobError::DigestMismatch { .. }), "{e}");
    assert!(!rb.join("blobs").join(format!("sha256-{liar}")).exists());
    assert!(!rb
        .join("tmp")
        .join(format!("p2p-sha256-{liar}.partial"))
        .exists());
    assert_eq!(b.transfer_status().totals.digest_mismatches, 1);

    eprintln!("=== missing blob, hostile digest and manifest paths: clear errors");
    let e = b.fetch_blob("a", &"c".repeat(64)).await.unwrap_err();
    assert!(matches!(e, BlobError::Remote { status: 404, .. }), "{e}");
    assert!(b.fetch_blob("a", "sha256:../../x").await.is_err());
    let e = b
        .fetch_manifest("a", "../../../etc/passwd", None)
        .await
        .unwrap_err();
    assert!(matches!(e, BlobError::BadPath(_)), "{e}");

    eprintln!("=== a manifest by path, checked against its digest");
    let mdir = ra.join("manifests/registry.ollama.ai/library/m");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(mdir.join("latest"), b"{\"layers\":[]}").unwrap();
    let mhex = hex::encode(sha2::Sha256::digest(b"{\"layers\":[]}"));
    let m = b
        .fetch_manifest("a", "registry.ollama.ai/library/m/latest", Some(&mhex))
        .await
        .unwrap();
    assert_eq!(m, b"{\"layers\":[]}");
    let e = b
        .fetch_manifest("a", "registry.ollama.ai/library/m/latest", Some(&liar))
        .await
        .unwrap_err();
    assert!(matches!(e, BlobError::DigestMismatch { .. }), "{e}");

    eprintln!("=== the bandwidth cap: 3 MiB at 8 MiB/s takes about 0.375 s");
    let c = &nodes[2];
    let rc = dir.path().join("store-c");
    c.configure_blobs(rc, 8 << 20);
    let t0 = Instant::now();
    c.fetch_blob("a", &hex).await.unwrap();
    let e = t0.elapsed();
    assert!(e >= Duration::from_millis(250), "{e:?}");
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_blob_comes_in_ranges_from_every_holder() {
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let roots: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| dir.path().join(format!("store-{n}")))
        .collect();
    for (n, r) in nodes.iter().zip(&roots) {
        n.configure_blobs(r.clone(), 0);
    }
    let data: Vec<u8> = (0..20 * 1024 * 1024u32)
        .map(|i| (i * 13 + i / 509) as u8)
        .collect();
    let hex = hex::encode(sha2::Sha256::digest(&data));
    put_blob(&roots[0], &hex, &data);
    put_blob(&roots[2], &hex, &data);
    let peers = vec!["a".to_string(), "c".to_string()];

    eprintln!("=== 20 MiB from a and c at once: half from each");
    let got = nodes[1].fetch_blob_from(&peers, &hex).await.unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), data);
    let (out_a, out_c) = (
        nodes[0].transfer_status().totals.bytes_out,
        nodes[2].transfer_status().totals.bytes_out,
    );
    assert_eq!(out_a + out_c, data.len() as u64);
    assert!(out_a >= 8 << 20 && out_c >= 8 << 20, "{out_a} {out_c}");
    assert_eq!(
        nodes[1].transfer_status().totals.bytes_in,
        data.len() as u64
    );

    eprintln!("=== a source without the blob: its range comes from the other");
    std::fs::remove_file(got).unwrap();
    std::fs::remove_file(roots[0].join("blobs").join(format!("sha256-{hex}"))).unwrap();
    let got = nodes[1].fetch_blob_from(&peers, &hex).await.unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), data);

    eprintln!("=== c's bytes are wrong: detected, then fetched whole from a alone");
    std::fs::remove_file(&got).unwrap();
    let mut bad = data.clone();
    bad[19 << 20] ^= 1;
    put_blob(&roots[0], &hex, &data);
    put_blob(&roots[2], &hex, &bad);
    let got = nodes[1].fetch_blob_from(&peers, &hex).await.unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), data);
    assert_eq!(nodes[1].transfer_status().totals.digest_mismatches, 1);

    eprintln!("=== only wrong bytes anywhere: refused, nothing visible");
    std::fs::remove_file(&got).unwrap();
    put_blob(&roots[0], &hex, &bad);
    let e = nodes[1].fetch_blob_from(&peers, &hex).await.unwrap_err();
    assert!(matches!(e, BlobError::DigestMismatch { .. }), "{e}");
    assert!(!got.exists());
    assert!(!roots[1]
        .join("tmp")
        .join(format!("p2p-sha256-{hex}.partial"))
        .exists());
    for n in &nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_from_any_node_reaches_every_node_through_raft() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = three(dir.path()).await;
    let follower = nodes
        .iter()
        .find(|n| n.status().role != "leader")
        .unwrap()
        .clone();
    follower.put_tombstone("m:latest", 1000).await.unwrap();
    let all = nodes.clone();
    wait_for("the tombstone everywhere", Duration::from_secs(5), || {
        all.iter()
            .all(|n| n.tombstones().get("m:latest") == Some(&1000))
    })
    .await;
    // an older delete does not move it back; a newer one moves it on
    nodes[0].put_tombstone("m:latest", 500).await.unwrap();
    nodes[1].put_tombstone("m:latest", 2000).await.unwrap();
    let all = nodes.clone();
    wait_for(
        "the later delete everywhere",
        Duration::from_secs(5),
        || {
            all.iter()
                .all(|n| n.tombstones().get("m:latest") == Some(&2000))
        },
    )
    .await;
    assert!(nodes[2].put_tombstone("", 1).await.is_err());

    // The catalogue: compare-and-set from a follower, seen everywhere; a
    // write whose expectation is stale changes nothing and says so.
    let put = |expect: Option<&str>, v: Option<&str>| Command::Catalog {
        expect: vec![("model/m".into(), expect.map(String::from))],
        puts: vec![("model/m".into(), v.map(String::from))],
    };
    assert!(follower.propose(put(None, Some("1"))).await.unwrap());
    assert!(!follower.propose(put(None, Some("2"))).await.unwrap());
    assert!(nodes[0].propose(put(Some("1"), Some("3"))).await.unwrap());
    let all = nodes.clone();
    wait_for("the catalogue everywhere", Duration::from_secs(5), || {
        all.iter()
            .all(|n| n.catalog().get("model/m").map(String::as_str) == Some("3"))
    })
    .await;
    assert!(follower.propose(put(Some("3"), None)).await.unwrap());
    let all = nodes.clone();
    wait_for("the removal everywhere", Duration::from_secs(5), || {
        all.iter().all(|n| n.catalog().is_empty())
    })
    .await;
    let huge = Command::Catalog {
        expect: vec![],
        puts: vec![("k".into(), Some("x".repeat(5 << 20)))],
    };
    assert!(follower.propose(huge).await.is_err());
    for n in &nodes {
        n.stop().await;
    }
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

/// A client endpoint presenting a certificate the cluster CA issued to `id`.
async fn certified_client(ca_dir: &std::path::Path, id: &str, to: SocketAddr) -> quinn::Connection {
    let tls = TlsMaterial::load(ca_dir).unwrap();
    let node = tls.ca.issue(id).unwrap();
    let own = TlsMaterial {
        ca: crate::transport::tls::ClusterCa::from_pem(&tls.ca.cert_pem, &tls.ca.key_pem).unwrap(),
        node,
        secret: String::new(),
    };
    let client =
        transport::client_config(own.client_config().unwrap(), Duration::from_secs(5)).unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.connect_with(client, to, crate::transport::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_may_only_speak_for_the_node_its_certificate_names() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    wait_for("a to lead", Duration::from_secs(5), || {
        a.status().role == "leader"
    })
    .await;
    let ca_dir = dir.path().join("a/tls");
    let to = a.local_addr().unwrap();
    let t = Duration::from_secs(5);

    // === a Hello as another node
    let conn = certified_client(&ca_dir, "x", to).await;
    assert!(transport::call(&conn, Kind::Hello, br#"{"id":"y"}"#, t)
        .await
        .is_err());
    assert_eq!(a.counters.refusals(Refusal::Hello), 1);
    assert!(a.mesh.connection("y").is_none());

    // === its own name is fine
    let conn = certified_client(&ca_dir, "x", to).await;
    let f = transport::call(&conn, Kind::Hello, br#"{"id":"x"}"#, t)
        .await
        .unwrap();
    assert_eq!(f.kind, Kind::Hello);

    // === an advert for another node
    transport::push(&conn, Kind::Advert, Bytes::from_static(b"y\n{}"))
        .await
        .unwrap();
    let a2 = a.clone();
    wait_for("the advert refused", t, || {
        a2.counters.refusals(Refusal::Advert) == 1
    })
    .await;
    assert!(a.nodes().iter().all(|n| n.id != "y"));

    // === a Raft vote on behalf of another node
    let conn = certified_client(&ca_dir, "x", to).await;
    let vote = openraft::raft::VoteRequest::new(openraft::Vote::new(99, raft_id("y")), None);
    let body = serde_json::to_vec(&vote).unwrap();
    assert!(transport::call(&conn, Kind::RaftVote, &body, t)
        .await
        .is_err());
    assert_eq!(a.counters.refusals(Refusal::Raft), 1);
    assert_eq!(a.status().role, "leader");
    assert_eq!(a.status().term, 1);
    let refused = a.status().peers_refused;
    assert_eq!(refused["impersonation_hello"], 1);
    assert_eq!(refused["impersonation_raft"], 1);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_connections_are_few_and_small() {
    let dir = tempfile::tempdir().unwrap();
    let a = Cluster::start(cfg("a", dir.path(), vec![], None))
        .await
        .unwrap();
    let tls = TlsMaterial::load(&dir.path().join("a/tls")).unwrap();
    let client = transport::client_config(
        crate::transport::tls::untrusted_client_config(&tls.ca, None).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let to = a.local_addr().unwrap();
    let connect = || async {
        ep.connect_with(client.clone(), to, crate::transport::tls::SERVER_NAME)
            .unwrap()
            .await
            .unwrap()
    };
    // === idle connections without a certificate, one over the limit
    let mut held = Vec::new();
    for _ in 0..serve::MAX_UNAUTHENTICATED_PER_SOURCE {
        held.push(connect().await);
    }
    let extra = connect().await;
    let why = tokio::time::timeout(Duration::from_secs(5), extra.closed())
        .await
        .unwrap();
    assert!(
        matches!(why, quinn::ConnectionError::ApplicationClosed(ref c) if c.error_code == transport::codes::BUSY),
        "{why:?}"
    );
    assert_eq!(a.counters.refusals(Refusal::UnauthenticatedLimit), 1);
    for c in held.drain(..) {
        c.close(0u32.into(), b"");
    }
    let a2 = a.clone();
    wait_for("the slots given back", Duration::from_secs(5), || {
        a2.unauthenticated.lock().unwrap().is_empty()
    })
    .await;

    // === a join request over the bound is refused unread
    let conn = connect().await;
    let big = serde_json::to_vec(&serde_json::json!({
        "secret": "s".repeat(MAX_JOIN_REQUEST),
        "node_id": "big",
        "p2p_address": "127.0.0.1:1",
        "api_address": "",
    }))
    .unwrap();
    let r = transport::call(&conn, Kind::JoinRequest, &big, Duration::from_secs(5)).await;
    assert!(r.is_err(), "{r:?}");
    assert_eq!(a.counters.refusals(Refusal::UnauthenticatedOversize), 1);
    assert_eq!(a.counters.joins_refused.load(Ordering::Relaxed), 0);
    a.stop().await;
}

#[test]
fn join_requests_are_parsed_bounded_and_checked() {
    let ok = br#"{"secret":"s","node_id":"n","p2p_address":"10.0.0.1:4001","api_address":"http://10.0.0.1:11434"}"#;
    assert_eq!(JoinRequest::parse(ok).unwrap().node_id, "n");
    let big = vec![b' '; MAX_JOIN_REQUEST + 1];
    assert_eq!(
        JoinRequest::parse(&big).err(),
        Some(JoinParseError::TooLarge(MAX_JOIN_REQUEST + 1))
    );
    for (bad, why) in [
        (&b"{"[..], JoinParseError::Malformed),
        (
            br#"{"secret":"s","node_id":"","p2p_address":"10.0.0.1:1","api_address":""}"#,
            JoinParseError::NodeId,
        ),
        (
            br#"{"secret":"s","node_id":"a b","p2p_address":"10.0.0.1:1","api_address":""}"#,
            JoinParseError::NodeId,
        ),
        (
            br#"{"secret":"s","node_id":"n","p2p_address":"host","api_address":""}"#,
            JoinParseError::Address,
        ),
    ] {
        assert_eq!(JoinRequest::parse(bad).err(), Some(why));
    }
}
