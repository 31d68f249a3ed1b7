//! Config decoding and validation: `Object::decode` for each kind, from
//! JSON or from YAML the way the standalone file store reads it.
//!
//! Input: one control byte, then the document. The control byte's low
//! seven bits pick the kind (modulo the kinds below), its high bit the
//! format (0: JSON, 1: YAML). Decoding must not panic, and an object it
//! accepts must validate again, encode (`to_json`), and decode back to an
//! equal object whose encoding is the same bytes.

#![no_main]

use std::path::Path;

use meshgate_config::{Key, Kind, Object};

/// Each kind with a valid key name of that kind.
const KINDS: [(Kind, &str); 8] = [
    (Kind::Services, "orders"),
    (Kind::Routes, "orders"),
    (Kind::TcpRoutes, "db"),
    (Kind::Groups, "shop"),
    (Kind::Consumers, "mobile-app"),
    (Kind::Nodes, "gateway/gw-1"),
    (Kind::Instances, "orders/host-1"),
    (Kind::History, "1"),
];

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&ctl, doc)) = data.split_first() else {
        return;
    };
    let (kind, name) = KINDS[usize::from(ctl & 0x7f) % KINDS.len()];
    let key = Key::new(kind, name);
    let json = if ctl & 0x80 == 0 {
        doc.to_vec()
    } else {
        // As the file store reads its document: YAML into JSON values
        // (`node::parse_yaml`), each object then stored as JSON bytes.
        match meshgate_config::node::parse_yaml::<serde_json::Value>(Path::new("fuzz.yaml"), doc) {
            Ok(v) => serde_json::to_vec(&v).expect("a JSON value encodes"),
            Err(_) => return,
        }
    };
    let Ok(obj) = Object::decode(&key, &json) else {
        return;
    };
    if let Err(e) = obj.validate(&key) {
        panic!("{key}: decode accepted what validate refuses: {e}");
    }
    let _ = obj.references();
    let encoded = obj.to_json();
    let back = match Object::decode(&key, &encoded) {
        Ok(back) => back,
        Err(e) => panic!(
            "{key}: its own encoding is refused: {e}\nencoded: {}",
            String::from_utf8_lossy(&encoded)
        ),
    };
    assert_eq!(back, obj, "{key}: the encoding decodes to another object");
    assert_eq!(back.to_json(), encoded, "{key}: encoding is not stable");
});
