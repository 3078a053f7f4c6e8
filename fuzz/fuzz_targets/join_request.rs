//! Feed arbitrary bytes to the join request parser, the only thing a peer
//! without a certificate reaches: it must accept or refuse, never panic, and
//! whatever it accepts is within the size bound and has a valid id.
#![no_main]

use _core::cluster::{JoinRequest, MAX_JOIN_REQUEST};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = JoinRequest::parse(data) {
        assert!(data.len() <= MAX_JOIN_REQUEST);
        assert!(!req.node_id.is_empty() && req.node_id.len() <= 128);
        assert!(req.p2p_address.parse::<std::net::SocketAddr>().is_ok());
        // what it accepts re-serialises and parses back to the same request
        let again = serde_json::to_vec(&req).expect("serialisable");
        let back = JoinRequest::parse(&again).expect("round trip");
        assert_eq!(back.node_id, req.node_id);
        assert_eq!(back.secret, req.secret);
    }
});
