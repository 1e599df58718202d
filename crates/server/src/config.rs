//! envoyproxy/ratelimit's YAML configuration: reading it, validating it, and matching request
//! descriptors against it.
//!
//! The format is the reference service's own, unchanged: one `domain` per file with nested
//! `descriptors` (`key`, optional `value`, `rate_limit`, `shadow_mode`, nested `descriptors`).
//! [`RateLimitConfig::load`] reads one file or every `*.yaml` / `*.yml` file of a directory and
//! compiles them into lookup tables; [`RateLimitConfig::find`] resolves one request descriptor
//! to its limit and bucket.
//!
//! Matching follows the reference service: at each level an entry `(key, value)` first matches a
//! descriptor with that exact key and value, then the first descriptor (in file order) of that
//! key whose value is a wildcard pattern matching the value, then the descriptor of that key
//! without a value. A limit applies only when the request's last entry lands on a descriptor
//! with a `rate_limit`; there is no backtracking to a less specific descriptor. Unlike the
//! reference, key and value are compared separately (it compares `key + "_" + value`, so key
//! `a_b` without value and key `a` with value `b` collide there).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ratelimit_domain::{RateLimitRule, RateLimitScope};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys;

/// Why a configuration could not be loaded. The message names the file and, for a bad
/// descriptor, its path in the file (`descriptors[1].descriptors[0].rate_limit.unit`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The path (or a file in the directory) could not be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The file or directory.
        path: String,
        /// The operating system's reason.
        reason: String,
    },
    /// A file is not YAML of the expected shape (unknown field, wrong type).
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// What the parser said, with line and column.
        reason: String,
    },
    /// A file is well-formed but means nothing valid.
    #[error("{path}: {at}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Where in the file: `domain`, `descriptors[0].rate_limit.unit`, …
        at: String,
        /// What is wrong.
        reason: String,
    },
}

/// The unit of a `rate_limit`, as in `envoy.service.ratelimit.v3.RateLimitResponse.RateLimit.Unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum Unit {
    /// One second.
    Second,
    /// 60 seconds.
    Minute,
    /// 3,600 seconds.
    Hour,
    /// 86,400 seconds.
    Day,
    /// 7 days.
    Week,
    /// 30 days, as in the reference service.
    Month,
    /// 365 days, as in the reference service.
    Year,
}

impl Unit {
    /// Every unit, shortest first.
    pub const ALL: [Unit; 7] = [
        Self::Second,
        Self::Minute,
        Self::Hour,
        Self::Day,
        Self::Week,
        Self::Month,
        Self::Year,
    ];

    /// The unit's length in seconds.
    pub const fn seconds(self) -> u64 {
        match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3_600,
            Self::Day => 86_400,
            Self::Week => 7 * 86_400,
            Self::Month => 30 * 86_400,
            Self::Year => 365 * 86_400,
        }
    }

    /// The lower-case name used in configuration files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
            Self::Year => "year",
        }
    }

    /// The protobuf enum number (`SECOND` = 1 … `YEAR` = 6, `WEEK` = 7).
    pub const fn proto_number(self) -> i32 {
        match self {
            Self::Second => 1,
            Self::Minute => 2,
            Self::Hour => 3,
            Self::Day => 4,
            Self::Month => 5,
            Self::Year => 6,
            Self::Week => 7,
        }
    }

    /// The unit of a protobuf enum number, if it names one.
    pub const fn from_proto_number(number: i32) -> Option<Self> {
        Some(match number {
            1 => Self::Second,
            2 => Self::Minute,
            3 => Self::Hour,
            4 => Self::Day,
            5 => Self::Month,
            6 => Self::Year,
            7 => Self::Week,
            _ => return None,
        })
    }

    /// Parses a unit name, ASCII case-insensitively, as the reference service does.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|unit| unit.as_str().eq_ignore_ascii_case(text))
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------------------------------------
// The file format.

/// One configuration file, as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YamlRoot {
    /// The domain every descriptor of the file belongs to.
    #[serde(default)]
    pub domain: String,
    /// The top-level descriptors.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub descriptors: Vec<YamlDescriptor>,
}

/// One descriptor of a file, as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YamlDescriptor {
    /// The entry key it matches.
    #[serde(default)]
    pub key: String,
    /// The entry value it matches: exact, a pattern with `*`, or absent (every value, each
    /// with its own bucket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The limit of a request whose last entry lands here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<YamlRateLimit>,
    /// Count, but never refuse: the answer is OK and the refusal is only reported.
    #[serde(default, skip_serializing_if = "is_false")]
    pub shadow_mode: bool,
    /// The reference's quota mode; not supported (refused when true).
    #[serde(default, skip_serializing_if = "is_false")]
    pub quota_mode: bool,
    /// Metrics detail in the reference service; accepted and ignored here.
    #[serde(default, skip_serializing_if = "is_false")]
    pub detailed_metric: bool,
    /// Metrics detail in the reference service; accepted and ignored here.
    #[serde(default, skip_serializing_if = "is_false")]
    pub value_to_metric: bool,
    /// With a wildcard value: every matching value shares one bucket.
    #[serde(default, skip_serializing_if = "is_false")]
    pub share_threshold: bool,
    /// Dynamic metadata in the reference service; accepted and ignored here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<serde_yaml_ng::Value>,
    /// Nested descriptors, matched by the request's next entry.
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub descriptors: Vec<YamlDescriptor>,
}

/// A `rate_limit` block, as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YamlRateLimit {
    /// `second`, `minute`, `hour`, `day`, `week`, `month` or `year` (absent when unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// How many requests per unit; 0 refuses every request.
    #[serde(default)]
    pub requests_per_unit: u32,
    /// Never limited, never counted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub unlimited: bool,
    /// A name, reported in answers and used by `replaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Limits (by name) that this one replaces when both match one request.
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub replaces: Vec<YamlReplaces>,
}

/// One entry of `replaces`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct YamlReplaces {
    /// The name of the replaced limit.
    #[serde(default)]
    pub name: String,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

// ---------------------------------------------------------------------------------------------
// The compiled configuration.

/// One configured limit, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitSpec {
    /// Requests per unit (0: every request is refused, nothing is counted).
    pub requests_per_unit: u32,
    /// The unit (`None` only for an unlimited limit).
    pub unit: Option<Unit>,
    /// The configured name, or empty.
    pub name: String,
    /// Never limited, never counted.
    pub unlimited: bool,
    /// Names of the limits this one replaces.
    pub replaces: Vec<String>,
    /// Counted, but never refuses.
    pub shadow_mode: bool,
    /// `domain.key_value.key`: the descriptor path in the reference's notation, for metrics
    /// and logs (configured values only, never a request's own value).
    pub path: String,
    /// The token bucket: `requests_per_unit` tokens, refilled over one `unit`. `None` when
    /// unlimited or `requests_per_unit` is 0.
    pub rule: Option<RateLimitRule>,
}

impl LimitSpec {
    /// A limit of `requests_per_unit` per `unit` (the reference's per-descriptor override, or
    /// a configured limit), not unlimited, not shadowed, unnamed.
    ///
    /// # Errors
    /// The domain's reason when the bucket cannot be built.
    pub fn counted(
        requests_per_unit: u32,
        unit: Unit,
        path: String,
    ) -> Result<Self, ratelimit_domain::RuleError> {
        Ok(Self {
            requests_per_unit,
            unit: Some(unit),
            name: String::new(),
            unlimited: false,
            replaces: Vec::new(),
            shadow_mode: false,
            path,
            rule: bucket_rule(requests_per_unit, unit)?,
        })
    }

    /// The limit's name for metrics: its configured name, or its descriptor path.
    pub fn metric_name(&self) -> &str {
        if self.name.is_empty() {
            &self.path
        } else {
            &self.name
        }
    }
}

/// The token bucket of `requests_per_unit` per `unit`: that many tokens, refilled smoothly over
/// one unit (`requests_per_unit / unit-in-minutes` tokens per minute). `None` for 0.
///
/// # Errors
/// The domain's reason when the numbers cannot make a bucket.
pub fn bucket_rule(
    requests_per_unit: u32,
    unit: Unit,
) -> Result<Option<RateLimitRule>, ratelimit_domain::RuleError> {
    if requests_per_unit == 0 {
        return Ok(None);
    }
    let per_minute = f64::from(requests_per_unit) * 60.0 / unit.seconds() as f64;
    RateLimitRule::new(
        RateLimitScope::Global,
        u64::from(requests_per_unit),
        per_minute,
    )
    .map(Some)
}

/// A value pattern with `*` wildcards (each matches any run of characters, possibly empty).
#[derive(Debug, Clone, PartialEq)]
struct Pattern {
    /// The pattern as written.
    text: String,
    /// The pattern split on `*`: at least two parts.
    parts: Vec<String>,
}

impl Pattern {
    fn new(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            parts: text.split('*').map(str::to_owned).collect(),
        }
    }

    fn matches(&self, value: &str) -> bool {
        let (Some(first), Some(last)) = (self.parts.first(), self.parts.last()) else {
            return false;
        };
        let fixed: usize = self.parts.iter().map(String::len).sum();
        if value.len() < fixed || !value.starts_with(first.as_str()) {
            return false;
        }
        if !value.ends_with(last.as_str()) {
            return false;
        }
        let mut rest = &value[first.len()..value.len() - last.len()];
        for part in &self.parts[1..self.parts.len() - 1] {
            match rest.find(part.as_str()) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

/// One compiled descriptor.
#[derive(Debug, Clone, Default, PartialEq)]
struct Node {
    limit: Option<Arc<LimitSpec>>,
    /// With a wildcard value: one bucket for every matching value.
    share_threshold: bool,
    children: Level,
}

/// The descriptors of one level that share a key.
#[derive(Debug, Clone, Default, PartialEq)]
struct KeyLevel {
    exact: HashMap<String, Node>,
    wildcards: Vec<(Pattern, Node)>,
    any: Option<Node>,
}

/// The descriptors of one level, by key.
#[derive(Debug, Clone, Default, PartialEq)]
struct Level {
    keys: HashMap<String, KeyLevel>,
}

/// How one request entry was matched, which decides its part of the bucket key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMatch<'a> {
    /// By the entry's own value (exact, a descriptor without value, or a wildcard without
    /// `share_threshold`): one bucket per value.
    Value(&'a str),
    /// By a wildcard with `share_threshold`: one bucket for the pattern.
    SharedPattern(&'a str),
}

/// The limit a request descriptor resolved to, with its bucket path.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The configured limit.
    pub limit: Arc<LimitSpec>,
    /// The bucket's path (see [`keys::bucket_path`]): distinct for distinct buckets.
    pub bucket: String,
}

/// One loaded file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoadedFile {
    /// Its path.
    pub path: String,
    /// Its content as parsed.
    pub config: YamlRoot,
}

/// A whole configuration: every domain of every file, compiled.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitConfig {
    domains: HashMap<String, Level>,
    files: Vec<LoadedFile>,
    version: String,
}

impl RateLimitConfig {
    /// Reads `path`: one YAML file, or every `*.yaml` / `*.yml` file directly in a directory
    /// (names starting with `.` are skipped, which also skips a Kubernetes ConfigMap's
    /// `..data` bookkeeping; symbolic links are followed), in name order.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, and the descriptor path within it, of the first
    /// problem found.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let files = config_files(path)?;
        let mut texts = Vec::with_capacity(files.len());
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|err| ConfigError::Read {
                path: file.display().to_string(),
                reason: err.to_string(),
            })?;
            texts.push((file.display().to_string(), text));
        }
        Self::from_texts(texts)
    }

    /// Compiles configuration texts, each with the name to report in errors.
    ///
    /// # Errors
    /// [`ConfigError`] for the first problem found.
    pub fn from_texts(
        texts: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        let mut hasher = Sha256::new();
        let mut owner: HashMap<String, String> = HashMap::new();
        for (path, text) in texts {
            hasher.update(path.as_bytes());
            hasher.update([0]);
            hasher.update(text.as_bytes());
            hasher.update([0]);
            let root: YamlRoot =
                serde_yaml_ng::from_str(&text).map_err(|err| ConfigError::Parse {
                    path: path.clone(),
                    reason: err.to_string(),
                })?;
            let invalid = |at: &str, reason: String| ConfigError::Invalid {
                path: path.clone(),
                at: at.to_owned(),
                reason,
            };
            if root.domain.is_empty() {
                return Err(invalid("domain", "must not be empty".to_owned()));
            }
            if let Some(first) = owner.get(&root.domain) {
                return Err(invalid(
                    "domain",
                    format!(
                        "duplicate domain {:?}, already defined in {first}",
                        root.domain
                    ),
                ));
            }
            owner.insert(root.domain.clone(), path.clone());
            let level = compile_level(&root.descriptors, &root.domain, "descriptors", &invalid)?;
            config.domains.insert(root.domain.clone(), level);
            config.files.push(LoadedFile { path, config: root });
        }
        let digest = hasher.finalize();
        config.version = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        Ok(config)
    }

    /// A short hash of every file's name and content: changes whenever the configuration does.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The files loaded, as parsed.
    pub fn files(&self) -> &[LoadedFile] {
        &self.files
    }

    /// Whether `domain` is configured.
    pub fn has_domain(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
    }

    /// How many domains are configured.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// The limit of one request descriptor of `domain`, given as its entries in order, and
    /// the path of its bucket. `None` when nothing matches (an unknown domain, no descriptor
    /// for an entry, or a request deeper or shallower than the limit).
    pub fn find<'e>(
        &self,
        domain: &str,
        entries: impl ExactSizeIterator<Item = (&'e str, &'e str)>,
    ) -> Option<Resolved> {
        let mut level = self.domains.get(domain)?;
        let count = entries.len();
        let mut matched: Vec<(&str, EntryMatch<'_>)> = Vec::with_capacity(count);
        let mut node: Option<&Node> = None;
        for (i, (key, value)) in entries.enumerate() {
            let by_key = level.keys.get(key)?;
            let (next, how) = if let Some(exact) = by_key.exact.get(value) {
                (exact, EntryMatch::Value(value))
            } else if let Some((pattern, wild)) =
                by_key.wildcards.iter().find(|(p, _)| p.matches(value))
            {
                let how = if wild.share_threshold {
                    EntryMatch::SharedPattern(pattern.text.as_str())
                } else {
                    EntryMatch::Value(value)
                };
                (wild, how)
            } else {
                (by_key.any.as_ref()?, EntryMatch::Value(value))
            };
            matched.push((key, how));
            if i + 1 < count {
                level = &next.children;
            }
            node = Some(next);
        }
        let limit = node?.limit.clone()?;
        Some(Resolved {
            bucket: keys::bucket_path(domain, &matched),
            limit,
        })
    }
}

/// The files `path` names.
fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |err: std::io::Error| ConfigError::Read {
        path: path.display().to_string(),
        reason: err.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if !meta.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        let file = entry.path();
        // Follows symbolic links (a ConfigMap's files are links into `..data`).
        if std::fs::metadata(&file).map_err(read_err)?.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

fn compile_level(
    descriptors: &[YamlDescriptor],
    parent: &str,
    at: &str,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Level, ConfigError> {
    let mut level = Level::default();
    for (i, descriptor) in descriptors.iter().enumerate() {
        let here = format!("{at}[{i}]");
        if descriptor.key.is_empty() {
            return Err(invalid(
                &format!("{here}.key"),
                "must not be empty".to_owned(),
            ));
        }
        if descriptor.quota_mode {
            return Err(invalid(
                &format!("{here}.quota_mode"),
                "quota_mode is not supported by this service".to_owned(),
            ));
        }
        // The reference treats an empty value as no value.
        let value = descriptor.value.as_deref().filter(|v| !v.is_empty());
        let is_pattern = value.is_some_and(|v| v.contains('*'));
        if descriptor.share_threshold && !is_pattern {
            return Err(invalid(
                &format!("{here}.share_threshold"),
                "share_threshold needs a wildcard value (one containing '*')".to_owned(),
            ));
        }
        let path = match value {
            Some(v) => format!("{parent}.{}_{v}", descriptor.key),
            None => format!("{parent}.{}", descriptor.key),
        };
        let limit = match &descriptor.rate_limit {
            None => None,
            Some(rl) => Some(Arc::new(compile_limit(
                rl,
                descriptor.shadow_mode,
                &path,
                &format!("{here}.rate_limit"),
                invalid,
            )?)),
        };
        let node = Node {
            limit,
            share_threshold: descriptor.share_threshold,
            children: compile_level(
                &descriptor.descriptors,
                &path,
                &format!("{here}.descriptors"),
                invalid,
            )?,
        };
        let by_key = level.keys.entry(descriptor.key.clone()).or_default();
        let duplicate = match value {
            None => by_key.any.replace(node).is_some(),
            Some(v) if is_pattern => {
                let dup = by_key.wildcards.iter().any(|(p, _)| p.text == v);
                by_key.wildcards.push((Pattern::new(v), node));
                dup
            }
            Some(v) => by_key.exact.insert(v.to_owned(), node).is_some(),
        };
        if duplicate {
            return Err(invalid(
                &here,
                format!("duplicate descriptor {path:?} (same key and value at one level)"),
            ));
        }
    }
    Ok(level)
}

fn compile_limit(
    rl: &YamlRateLimit,
    shadow_mode: bool,
    path: &str,
    at: &str,
    invalid: &dyn Fn(&str, String) -> ConfigError,
) -> Result<LimitSpec, ConfigError> {
    let unit = match rl.unit.as_deref() {
        Some(text) => Some(Unit::parse(text).ok_or_else(|| {
            invalid(
                &format!("{at}.unit"),
                format!(
                    "invalid rate limit unit {text:?}: expected second, minute, hour, day, week, month or year"
                ),
            )
        })?),
        None => None,
    };
    let name = rl.name.clone().unwrap_or_default();
    let mut replaces = Vec::with_capacity(rl.replaces.len());
    for (i, replaced) in rl.replaces.iter().enumerate() {
        let here = format!("{at}.replaces[{i}].name");
        if replaced.name.is_empty() {
            return Err(invalid(&here, "must not be empty".to_owned()));
        }
        if replaced.name == name {
            return Err(invalid(&here, "a limit must not replace itself".to_owned()));
        }
        replaces.push(replaced.name.clone());
    }
    if rl.unlimited {
        if unit.is_some() {
            return Err(invalid(
                &format!("{at}.unit"),
                "should not specify a unit when unlimited".to_owned(),
            ));
        }
        return Ok(LimitSpec {
            requests_per_unit: rl.requests_per_unit,
            unit: None,
            name,
            unlimited: true,
            replaces,
            shadow_mode,
            path: path.to_owned(),
            rule: None,
        });
    }
    let Some(unit) = unit else {
        return Err(invalid(
            &format!("{at}.unit"),
            "is required (second, minute, hour, day, week, month or year) unless unlimited"
                .to_owned(),
        ));
    };
    let rule = bucket_rule(rl.requests_per_unit, unit)
        .map_err(|err| invalid(&format!("{at}.requests_per_unit"), err.to_string()))?;
    Ok(LimitSpec {
        requests_per_unit: rl.requests_per_unit,
        unit: Some(unit),
        name,
        unlimited: false,
        replaces,
        shadow_mode,
        path: path.to_owned(),
        rule,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> RateLimitConfig {
        RateLimitConfig::from_texts([("test.yaml".to_owned(), text.to_owned())]).unwrap()
    }

    fn error(text: &str) -> String {
        RateLimitConfig::from_texts([("test.yaml".to_owned(), text.to_owned())])
            .unwrap_err()
            .to_string()
    }

    fn find(config: &RateLimitConfig, domain: &str, entries: &[(&str, &str)]) -> Option<Resolved> {
        config.find(domain, entries.iter().copied())
    }

    const MESSAGING: &str = r#"
domain: messaging
descriptors:
  # Only allow 5 marketing messages a day
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit:
          unit: day
          requests_per_unit: 5

  # Only allow 100 messages a day to any unique phone number
  - key: to_number
    rate_limit:
      unit: day
      requests_per_unit: 100
"#;

    #[test]
    fn nested_descriptors_and_per_value_buckets() {
        let config = config(MESSAGING);
        let marketing = find(
            &config,
            "messaging",
            &[("message_type", "marketing"), ("to_number", "2061111111")],
        )
        .unwrap();
        assert_eq!(marketing.limit.requests_per_unit, 5);
        assert_eq!(marketing.limit.unit, Some(Unit::Day));
        assert_eq!(
            marketing.limit.path,
            "messaging.message_type_marketing.to_number"
        );
        let other = find(
            &config,
            "messaging",
            &[("message_type", "marketing"), ("to_number", "2062222222")],
        )
        .unwrap();
        assert_ne!(marketing.bucket, other.bucket);
        let any = find(&config, "messaging", &[("to_number", "2061111111")]).unwrap();
        assert_eq!(any.limit.requests_per_unit, 100);
        assert_ne!(any.bucket, marketing.bucket);
        // Depth must match: no limit for the placeholder level alone, nor a deeper request.
        assert!(find(&config, "messaging", &[("message_type", "marketing")]).is_none());
        assert!(find(&config, "messaging", &[("to_number", "1"), ("x", "y")]).is_none());
        assert!(find(&config, "other", &[("to_number", "1")]).is_none());
        assert!(find(&config, "messaging", &[("message_type", "transactional")]).is_none());
    }

    #[test]
    fn the_most_specific_value_wins() {
        let config = config(
            r#"
domain: edge_proxy_per_ip
descriptors:
  - key: remote_address
    rate_limit:
      unit: second
      requests_per_unit: 10

  # Black list IP
  - key: remote_address
    value: 50.0.0.5
    rate_limit:
      unit: second
      requests_per_unit: 0
"#,
        );
        let any = find(
            &config,
            "edge_proxy_per_ip",
            &[("remote_address", "50.0.0.1")],
        )
        .unwrap();
        assert_eq!(any.limit.requests_per_unit, 10);
        assert!(any.limit.rule.is_some());
        let black = find(
            &config,
            "edge_proxy_per_ip",
            &[("remote_address", "50.0.0.5")],
        )
        .unwrap();
        assert_eq!(black.limit.requests_per_unit, 0);
        assert!(black.limit.rule.is_none());
    }

    #[test]
    fn wildcards_prefix_middle_and_shared() {
        let config = config(
            r#"
domain: example9
descriptors:
  - key: key1
    value: value*
    rate_limit: {unit: minute, requests_per_unit: 20}
  - key: path
    value: /api/*/action
    rate_limit: {unit: minute, requests_per_unit: 21}
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 10}
"#,
        );
        let a = find(&config, "example9", &[("key1", "value1")]).unwrap();
        let b = find(&config, "example9", &[("key1", "valueXYZ")]).unwrap();
        assert_eq!(a.limit.requests_per_unit, 20);
        assert_ne!(a.bucket, b.bucket, "each value has its own bucket");
        assert!(find(&config, "example9", &[("key1", "valu")]).is_none());
        assert!(find(&config, "example9", &[("path", "/api/123/action")]).is_some());
        assert!(find(&config, "example9", &[("path", "/api/123/other")]).is_none());
        let f1 = find(&config, "example9", &[("files", "files/a.pdf")]).unwrap();
        let f2 = find(&config, "example9", &[("files", "files/b.csv")]).unwrap();
        assert_eq!(f1.bucket, f2.bucket, "share_threshold: one bucket");
    }

    #[test]
    fn pattern_matching() {
        let p = Pattern::new("/api/*/resource/*/action");
        assert!(p.matches("/api/v1/resource/123/action"));
        assert!(!p.matches("/api/v1/resource/123/other"));
        assert!(!p.matches("/api/action"));
        let p = Pattern::new("ab*ba");
        assert!(p.matches("abba"));
        assert!(!p.matches("aba"), "prefix and suffix may not overlap");
        assert!(Pattern::new("*").matches(""));
        assert!(Pattern::new("a*").matches("a"));
    }

    #[test]
    fn unlimited_shadow_and_replaces() {
        let config = config(
            r#"
domain: internal
descriptors:
  - key: ldap
    rate_limit:
      unlimited: true
  - key: azure
    shadow_mode: true
    rate_limit:
      unit: MINUTE
      requests_per_unit: 100
      name: azure_limit
      replaces:
        - name: other
"#,
        );
        let ldap = find(&config, "internal", &[("ldap", "x")]).unwrap();
        assert!(ldap.limit.unlimited);
        let azure = find(&config, "internal", &[("azure", "x")]).unwrap();
        assert!(azure.limit.shadow_mode);
        assert_eq!(azure.limit.name, "azure_limit");
        assert_eq!(azure.limit.replaces, ["other"]);
        assert_eq!(azure.limit.unit, Some(Unit::Minute));
    }

    #[test]
    fn buckets_refill_over_one_unit() {
        let rule = bucket_rule(500, Unit::Second).unwrap().unwrap();
        assert_eq!(rule.max_tokens(), 500);
        assert_eq!(rule.refill_rate(), 30_000.0);
        let rule = bucket_rule(5, Unit::Day).unwrap().unwrap();
        assert!((rule.refill_rate() - 5.0 / 1_440.0).abs() < 1e-12);
        assert!(bucket_rule(1, Unit::Year).unwrap().is_some());
        assert!(bucket_rule(0, Unit::Second).unwrap().is_none());
    }

    #[test]
    fn errors_name_the_file_and_the_place() {
        assert_eq!(
            error(
                "domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n"
            ),
            "test.yaml: descriptors[0].rate_limit.unit: invalid rate limit unit \"fortnight\": expected second, minute, hour, day, week, month or year"
        );
        assert_eq!(
            error("domain: d\ndescriptors:\n  - key: a\n    descriptors:\n      - key: ''\n"),
            "test.yaml: descriptors[0].descriptors[0].key: must not be empty"
        );
        assert_eq!(
            error("descriptors: []\n"),
            "test.yaml: domain: must not be empty"
        );
        let unknown = error("domain: d\ndescriptors:\n  - key: a\n    rate_limits: {}\n");
        assert!(
            unknown.starts_with("test.yaml: descriptors[0]: unknown field `rate_limits`"),
            "{unknown}"
        );
        assert!(unknown.contains("line 4"), "{unknown}");
        let dup =
            error("domain: d\ndescriptors:\n  - key: a\n    value: b\n  - key: a\n    value: b\n");
        assert_eq!(
            dup,
            "test.yaml: descriptors[1]: duplicate descriptor \"d.a_b\" (same key and value at one level)"
        );
        assert!(
            error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {requests_per_unit: 1}\n")
                .contains("descriptors[0].rate_limit.unit: is required")
        );
        assert!(error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unlimited: true, unit: second}\n")
            .contains("should not specify a unit when unlimited"));
        assert!(error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: -1}\n")
            .starts_with("test.yaml: "));
        assert!(
            error("domain: d\ndescriptors:\n  - key: a\n    share_threshold: true\n")
                .contains("share_threshold needs a wildcard")
        );
        assert!(error("domain: d\ndescriptors:\n  - key: a\n    rate_limit: {unit: second, requests_per_unit: 1, name: x, replaces: [{name: x}]}\n")
            .contains("must not replace itself"));
        let two = RateLimitConfig::from_texts([
            ("a.yaml".to_owned(), "domain: d\n".to_owned()),
            ("b.yaml".to_owned(), "domain: d\n".to_owned()),
        ])
        .unwrap_err()
        .to_string();
        assert_eq!(
            two,
            "b.yaml: domain: duplicate domain \"d\", already defined in a.yaml"
        );
    }

    #[test]
    fn numbers_and_empty_values_read_as_the_reference_reads_them() {
        let config = config(
            "domain: d\ndescriptors:\n  - key: port\n    value: 8080\n    rate_limit: {unit: second, requests_per_unit: 1}\n  - key: e\n    value: ''\n    rate_limit: {unit: second, requests_per_unit: 2}\n",
        );
        assert!(find(&config, "d", &[("port", "8080")]).is_some());
        // An empty value is no value: every value matches.
        assert_eq!(
            find(&config, "d", &[("e", "x")])
                .unwrap()
                .limit
                .requests_per_unit,
            2
        );
    }

    #[test]
    fn the_version_follows_the_content() {
        let a = config(MESSAGING);
        let b = config(&MESSAGING.replace("100", "101"));
        assert_ne!(a.version(), b.version());
        assert_eq!(a.version(), config(MESSAGING).version());
        assert_eq!(a.version().len(), 16);
    }
}
