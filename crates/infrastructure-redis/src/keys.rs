//! The Redis keys of a bucket, written straight into a command's buffer.

use std::io::Write as _;

use ratelimit_domain::BucketKey;
use redis::{RedisWrite, ToRedisArgs};

use crate::KeyLayout;

/// One Redis key of a bucket: `<key><suffix>`, or `{<key>}<suffix>` with a hash tag. Keys
/// never contain a literal `{` or `}` (they are escaped), so the tag is the key's only one.
///
/// Written straight into the command's buffer: no string is built per check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyArg<'a> {
    base: &'a str,
    hash_tag: bool,
    suffix: &'static str,
}

impl KeyArg<'_> {
    fn len(&self) -> usize {
        self.base.len() + self.suffix.len() + if self.hash_tag { 2 } else { 0 }
    }
}

impl ToRedisArgs for KeyArg<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut writer = out.writer_for_next_arg();
        let parts: [&[u8]; 4] = if self.hash_tag {
            [b"{", self.base.as_bytes(), b"}", self.suffix.as_bytes()]
        } else {
            [b"", self.base.as_bytes(), b"", self.suffix.as_bytes()]
        };
        for part in parts {
            // Writing into the command's Vec cannot fail.
            let _ = writer.write_all(part);
        }
    }
}

/// The keys of one bucket: `<key>:tokens` and `<key>:time` in the two-key layout
/// ([`KeyLayout::TwoKeys`]), `<key>:tb` in the compact layout ([`KeyLayout::Compact`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BucketKeys<'a> {
    pub(crate) first: KeyArg<'a>,
    pub(crate) second: Option<KeyArg<'a>>,
}

impl<'a> BucketKeys<'a> {
    /// The keys of `key`'s bucket in `layout`, hash-tagged on a Redis Cluster so that they
    /// share a slot.
    pub(crate) fn of(key: &'a BucketKey, hash_tag: bool, layout: KeyLayout) -> Self {
        let with = |suffix| KeyArg {
            base: key.as_str(),
            hash_tag,
            suffix,
        };
        match layout {
            KeyLayout::Compact => Self {
                first: with(":tb"),
                second: None,
            },
            KeyLayout::TwoKeys => Self {
                first: with(":tokens"),
                second: Some(with(":time")),
            },
        }
    }

    /// How many keys: 2 or 1.
    pub(crate) fn count(&self) -> usize {
        if self.second.is_some() { 2 } else { 1 }
    }

    /// Bytes of the keys.
    pub(crate) fn len(&self) -> usize {
        self.first.len() + self.second.map_or(0, |second| second.len())
    }
}
