//! The last-known-good snapshot file: the raw objects a process has applied,
//! with their revision, written atomically after changes and read at start
//! when the store cannot be reached.
//!
//! The file carries a SHA-256 checksum of its contents and the `scope` of the
//! process that wrote it, so a truncated, edited or foreign file is refused
//! with a clear reason instead of being half-used.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::key::Key;
use crate::store::Entry;

const FORMAT: &str = "meshgate-snapshot/1";

/// Why a snapshot file was not used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no snapshot file")]
    Missing,
    #[error("cannot read snapshot file: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt snapshot file: {0}")]
    Corrupt(String),
    #[error("snapshot file belongs to {found:?}, not {expected:?}")]
    Foreign { expected: String, found: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileEntry {
    key: String,
    mod_revision: i64,
    /// The object's JSON, as stored.
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

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    checksum: String,
    body: Body,
}

/// A snapshot read back from disk.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub revision: i64,
    pub written_at_ms: u64,
    pub entries: Vec<Entry>,
}

fn checksum(body: &Body) -> String {
    let bytes = serde_json::to_vec(body).expect("snapshot body encodes");
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the snapshot atomically.
pub fn write(
    path: &Path,
    scope: &str,
    revision: i64,
    entries: impl IntoIterator<Item = Entry>,
) -> std::io::Result<()> {
    let body = Body {
        format: FORMAT.to_string(),
        scope: scope.to_string(),
        revision,
        written_at_ms: crate::model::now_ms(),
        entries: entries
            .into_iter()
            .map(|e| FileEntry {
                key: e.key.to_string(),
                mod_revision: e.mod_revision,
                value: String::from_utf8_lossy(&e.value).into_owned(),
            })
            .collect(),
    };
    let file = File {
        checksum: checksum(&body),
        body,
    };
    let bytes = serde_json::to_vec(&file).map_err(std::io::Error::other)?;
    write_atomically(path, &bytes)
}

/// Reads and verifies the snapshot written by `scope`.
pub fn read(path: &Path, scope: &str) -> Result<Snapshot, SnapshotError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(SnapshotError::Missing),
        Err(e) => return Err(e.into()),
    };
    parse(&bytes, scope)
}

/// Verifies and decodes a snapshot file's contents, written by `scope`
/// (what [`read`] does once the file is read).
pub fn parse(bytes: &[u8], scope: &str) -> Result<Snapshot, SnapshotError> {
    let file: File =
        serde_json::from_slice(bytes).map_err(|e| SnapshotError::Corrupt(e.to_string()))?;
    if file.body.format != FORMAT {
        return Err(SnapshotError::Corrupt(format!(
            "unknown format {:?}",
            file.body.format
        )));
    }
    if checksum(&file.body) != file.checksum {
        return Err(SnapshotError::Corrupt("checksum mismatch".into()));
    }
    if file.body.scope != scope {
        return Err(SnapshotError::Foreign {
            expected: scope.to_string(),
            found: file.body.scope,
        });
    }
    let mut entries = Vec::with_capacity(file.body.entries.len());
    for e in file.body.entries {
        let key = Key::parse(&e.key)
            .ok_or_else(|| SnapshotError::Corrupt(format!("bad key {:?}", e.key)))?;
        entries.push(Entry {
            key,
            value: e.value.into_bytes(),
            mod_revision: e.mod_revision,
        });
    }
    Ok(Snapshot {
        revision: file.body.revision,
        written_at_ms: file.body.written_at_ms,
        entries,
    })
}

/// Writes `bytes` to a temp file beside `path`, syncs it, and renames it
/// over `path`, so readers see the old or the new file, never a torn one.
/// The file is readable by its owner only (mode 0600): config files and
/// snapshots may hold TLS private keys.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Kind;

    fn entries() -> Vec<Entry> {
        vec![
            Entry {
                key: Key::new(Kind::Services, "orders"),
                value: br#"{"endpoints":[{"address":"127.0.0.1:8080"}]}"#.to_vec(),
                mod_revision: 7,
            },
            Entry {
                key: Key::new(Kind::Routes, "r1"),
                value: br#"{"backends":[{"service":"orders"}]}"#.to_vec(),
                mod_revision: 9,
            },
        ]
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gw.snapshot.json");
        write(&p, "gateway:gw-1", 9, entries()).unwrap();
        let s = read(&p, "gateway:gw-1").unwrap();
        assert_eq!(s.revision, 9);
        assert_eq!(s.entries, entries());
    }

    #[test]
    fn refuses_corrupt_foreign_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gw.snapshot.json");
        assert!(matches!(read(&p, "x"), Err(SnapshotError::Missing)));
        write(&p, "gateway:gw-1", 9, entries()).unwrap();
        assert!(matches!(
            read(&p, "gateway:gw-2"),
            Err(SnapshotError::Foreign { .. })
        ));
        // Change one value without fixing the checksum.
        let text = std::fs::read_to_string(&p).unwrap().replace("8080", "8081");
        std::fs::write(&p, text).unwrap();
        let e = read(&p, "gateway:gw-1").unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        // Truncation.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            read(&p, "gateway:gw-1"),
            Err(SnapshotError::Corrupt(_))
        ));
    }

    /// A snapshot file written by release 0.1.0's gateway (kept in
    /// `config/fixtures/`, see its README) still loads, and every object in
    /// it still decodes: a process upgraded during a store outage starts
    /// from the file its previous version left.
    #[test]
    fn a_file_written_by_the_previous_release_loads() {
        let bytes = include_bytes!("../fixtures/snapshot-0.1.0-gateway.json");
        let s = parse(bytes, "gateway:gw-fixture").unwrap();
        assert_eq!(s.revision, 5);
        let keys: Vec<String> = s.entries.iter().map(|e| e.key.to_string()).collect();
        assert_eq!(keys, ["services/orders", "routes/orders", "groups/shop"]);
        for e in &s.entries {
            crate::Object::decode(&e.key, &e.value).unwrap();
        }
    }
}
