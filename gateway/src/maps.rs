//! The map type of the compiled config tables.

/// A persistent hash map (structural sharing across snapshots) hashed with
/// foldhash. Its keys come from the config; requests only look them up, so
/// a fast per-process-seeded hash serves better than SipHash here (three
/// lookups per request: host, path, service).
pub(crate) type FastMap<K, V> =
    imbl::GenericHashMap<K, V, foldhash::fast::RandomState, imbl::shared_ptr::DefaultSharedPtr>;
