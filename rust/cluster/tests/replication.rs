//! Blobs between nodes and tombstones through Raft.

use super::*;

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
