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

/// Asserts that the expiry a compact bucket records in its value (the last 4 bytes, whole
/// seconds since the epoch) is the one Redis keeps for its key, within 2 s. The scripts decide
/// from the recorded expiry when to renew the key, so a wrong one lets an active bucket expire
/// (and come back full) or renews it for nothing.
///
/// # Panics
/// When it is not (a failed test), or when Redis does not answer.
pub fn assert_recorded_expiry(conn: &mut redis::Connection, key: &BucketKey) {
    let name = &redis_keys(key, KeyLayout::Compact, false)[0];
    let value: Vec<u8> = redis::cmd("GET")
        .arg(name)
        .query(conn)
        .unwrap_or_else(|err| panic!("GET {name}: {err}"));
    let Some(field) = value.get(16..20).filter(|_| value.len() == 20) else {
        panic!("{name}: a compact value is 20 bytes, got {value:?}");
    };
    let mut bytes = [0_u8; 4];
    bytes.copy_from_slice(field);
    let recorded = u64::from(u32::from_le_bytes(bytes));
    let left_ms: i64 = redis::cmd("PTTL")
        .arg(name)
        .query(conn)
        .unwrap_or_else(|err| panic!("PTTL {name}: {err}"));
    assert!(left_ms > 0, "{name}: PTTL {left_ms}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let expires = (now + std::time::Duration::from_millis(left_ms.unsigned_abs())).as_secs();
    assert!(
        recorded.abs_diff(expires) <= 2,
        "{name}: records expiry {recorded}, Redis expires it at {expires}"
    );
}
