//! The last-known-good snapshot file's loader
//! (`meshgate_config::snapshot_file::parse`, what `read` does with the
//! file's bytes).
//!
//! Input: a snapshot file's bytes. They are parsed as they are (must not
//! panic; any refusal is `Corrupt` or `Foreign`, never an I/O error). Most
//! mutations break the checksum, so when the input has a body of the right
//! shape it is also sealed again with a correct checksum (computed here the
//! way `snapshot_file::write` does: SHA-256 of the body's JSON, fields in
//! declaration order) and parsed again: then the outcome is known exactly
//! (unknown format, foreign scope, a bad key, or every entry as written).

#![no_main]

use meshgate_config::snapshot_file::{parse, SnapshotError};
use meshgate_config::Key;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The scope the seeds were written with.
const SCOPE: &str = "gateway:gw-1";
const FORMAT: &str = "meshgate-snapshot/1";

// The file's layout, as `snapshot_file` declares it (same fields, same
// order, same serde attributes), so the checksum comes out the same.
#[derive(Serialize, Deserialize)]
struct FileEntry {
    key: String,
    mod_revision: i64,
    value: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    format: String,
    scope: String,
    revision: i64,
    written_at_ms: u64,
    entries: Vec<FileEntry>,
}

#[derive(Serialize)]
struct File<'a> {
    checksum: String,
    body: &'a Body,
}

/// The input's body with a correct checksum, when it has one of the right
/// shape.
fn reseal(data: &[u8]) -> Option<(Body, Vec<u8>)> {
    let mut file: serde_json::Value = serde_json::from_slice(data).ok()?;
    let body: Body = serde_json::from_value(file.get_mut("body")?.take()).ok()?;
    let digest = Sha256::digest(serde_json::to_vec(&body).ok()?);
    let checksum = digest.iter().map(|b| format!("{b:02x}")).collect();
    let bytes = serde_json::to_vec(&File {
        checksum,
        body: &body,
    })
    .ok()?;
    Some((body, bytes))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match parse(data, SCOPE) {
        Ok(snap) => {
            for e in &snap.entries {
                assert_eq!(Key::parse(&e.key.to_string()).as_ref(), Some(&e.key));
            }
        }
        Err(SnapshotError::Corrupt(_)) => {}
        Err(SnapshotError::Foreign { expected, found }) => {
            assert_eq!(expected, SCOPE);
            assert_ne!(found, SCOPE);
        }
        Err(e) => panic!("parsing bytes gave {e:?}"),
    }
    let Some((body, sealed)) = reseal(data) else {
        return;
    };
    let got = parse(&sealed, SCOPE);
    let bad_key = body.entries.iter().find(|e| Key::parse(&e.key).is_none());
    match got {
        Err(SnapshotError::Corrupt(why)) if body.format != FORMAT => {
            assert!(why.starts_with("unknown format"), "{why}")
        }
        Err(SnapshotError::Foreign { found, .. }) if body.format == FORMAT => {
            assert_eq!(found, body.scope);
            assert_ne!(body.scope, SCOPE);
        }
        Err(SnapshotError::Corrupt(why)) if body.format == FORMAT && body.scope == SCOPE => {
            let e = bad_key.unwrap_or_else(|| panic!("a sealed file refused: {why}"));
            assert_eq!(why, format!("bad key {:?}", e.key));
        }
        Ok(snap) => {
            assert!(body.format == FORMAT && body.scope == SCOPE && bad_key.is_none());
            assert_eq!(snap.revision, body.revision);
            assert_eq!(snap.written_at_ms, body.written_at_ms);
            assert_eq!(snap.entries.len(), body.entries.len());
            for (got, want) in snap.entries.iter().zip(&body.entries) {
                assert_eq!(got.key.to_string(), want.key);
                assert_eq!(got.mod_revision, want.mod_revision);
                assert_eq!(got.value, want.value.as_bytes());
            }
        }
        other => panic!(
            "a sealed file (format {:?}, scope {:?}) gave {other:?}",
            body.format, body.scope
        ),
    }
});
