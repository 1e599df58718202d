//! What a Redis store keeps for a bucket, read and written raw: for the tests that seed hostile
//! values and compare what the scripts wrote with the reference, bit for bit.

use ratelimit_domain::BucketKey;
use ratelimit_redis::KeyLayout;

use crate::contract::GarbageValue;

/// The Redis keys of a bucket in `layout` (hash-tagged as on a cluster when `cluster`).
pub fn redis_keys(key: &BucketKey, layout: KeyLayout, cluster: bool) -> Vec<String> {
    let base = if cluster {
        format!("{{{}}}", key.as_str())
    } else {
        key.as_str().to_owned()
    };
    match layout {
        KeyLayout::Compact => vec![format!("{base}:tb")],
        _ => vec![format!("{base}:tokens"), format!("{base}:time")],
    }
}

/// What Redis holds for a bucket: the two keys' values, or the compact key's.
///
/// # Panics
/// When Redis does not answer (a failed test).
pub fn raw(
    conn: &mut redis::Connection,
    key: &BucketKey,
    layout: KeyLayout,
) -> Vec<Option<Vec<u8>>> {
    redis_keys(key, layout, false)
        .iter()
        .map(|name| {
            redis::cmd("GET")
                .arg(name)
                .query(conn)
                .unwrap_or_else(|err| panic!("GET {name}: {err}"))
        })
        .collect()
}

/// The state a script wrote, as the bits of `(tokens, last)` (a NaN-safe comparison).
///
/// # Panics
/// When the bucket is missing or holds something no script writes.
pub fn written(conn: &mut redis::Connection, key: &BucketKey, layout: KeyLayout) -> (u64, u64) {
    let values = raw(conn, key, layout);
    let present = |value: &Option<Vec<u8>>| {
        value
            .clone()
            .unwrap_or_else(|| panic!("{key}: nothing was written"))
    };
    if layout == KeyLayout::Compact {
        let bytes = present(&values[0]);
        assert_eq!(bytes.len(), 20, "{bytes:?}");
        let number = |at: usize| {
            let mut raw = [0_u8; 8];
            raw.copy_from_slice(&bytes[at..at + 8]);
            f64::from_le_bytes(raw)
        };
        (number(0).to_bits(), number(8).to_bits())
    } else {
        let number = |value: &Option<Vec<u8>>| {
            let text = String::from_utf8_lossy(&present(value)).into_owned();
            text.parse::<f64>()
                .unwrap_or_else(|err| panic!("{text:?}: {err}"))
        };
        (number(&values[0]).to_bits(), number(&values[1]).to_bits())
    }
}

/// Writes a hostile or edge-case value at a bucket's key(s), for an hour.
///
/// # Panics
/// When Redis does not answer (a failed test).
pub fn seed(conn: &mut redis::Connection, key: &BucketKey, value: &GarbageValue) {
    let set = |conn: &mut redis::Connection, name: String, value: &[u8]| {
        let _: () = redis::cmd("SET")
            .arg(&name)
            .arg(value)
            .arg("EX")
            .arg(3_600)
            .query(conn)
            .unwrap_or_else(|err| panic!("SET {name}: {err}"));
    };
    match value {
        GarbageValue::TwoKeys(tokens, time) => {
            for (suffix, value) in [(":tokens", tokens), (":time", time)] {
                let name = format!("{}{suffix}", key.as_str());
                let _: () = redis::cmd("DEL")
                    .arg(&name)
                    .query(conn)
                    .unwrap_or_else(|err| panic!("DEL {name}: {err}"));
                if let Some(value) = value {
                    set(conn, name, value.as_bytes());
                }
            }
        }
        GarbageValue::Compact(bytes) => set(conn, format!("{}:tb", key.as_str()), bytes),
    }
}
