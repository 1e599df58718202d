//! The bucket identifier of a client IP address: one normalisation for every caller.
//!
//! The HTTP layer writes the identifier of an `ip`-scoped bucket from the address it resolved;
//! the admin CLI writes it from the address an operator typed. Both must write the same text,
//! or the CLI addresses a bucket the service never uses. [`IpGrouping`] is that one function.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// How many leading bits of a client address name one client.
///
/// Addresses are first made canonical (an IPv4-mapped IPv6 address `::ffff:1.2.3.4` is the
/// IPv4 address `1.2.3.4`), then grouped:
///
/// - IPv4: `/32` by default, one bucket per address, written `1.2.3.4`; a shorter prefix
///   writes the network, `1.2.3.0/24`.
/// - IPv6: `/64` by default, written as the network, `2001:db8:1:2::/64`. One host usually
///   owns a whole `/64` and can pick any address in it, so per-address buckets would let it
///   bypass the limit. `/128` writes the plain address.
///
/// The written form is RFC 5952's canonical text, so every spelling of an address yields
/// the same identifier.
///
/// ```
/// use ratelimit_domain::IpGrouping;
///
/// let grouping = IpGrouping::default();
/// assert_eq!(grouping.identifier("::ffff:192.0.2.7".parse()?), "192.0.2.7");
/// assert_eq!(grouping.identifier("2001:DB8:0:0:1::7".parse()?), "2001:db8::/64");
/// // What an operator types: brackets, zone ids and already-grouped identifiers.
/// assert_eq!(grouping.normalize("[2001:db8::1]")?, "2001:db8::/64");
/// assert_eq!(grouping.normalize("2001:db8::/64")?, "2001:db8::/64");
/// assert_eq!(grouping.normalize("::1")?, "::/64");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpGrouping {
    ipv4_prefix: u8,
    ipv6_prefix: u8,
}

impl Default for IpGrouping {
    fn default() -> Self {
        Self {
            ipv4_prefix: Self::DEFAULT_IPV4_PREFIX,
            ipv6_prefix: Self::DEFAULT_IPV6_PREFIX,
        }
    }
}

impl IpGrouping {
    /// The default IPv4 prefix length: one bucket per address.
    pub const DEFAULT_IPV4_PREFIX: u8 = 32;

    /// The default IPv6 prefix length: one bucket per `/64`.
    pub const DEFAULT_IPV6_PREFIX: u8 = 64;

    /// The default grouping: IPv4 by `/32`, IPv6 by `/64`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Groups IPv4 clients by their first `prefix` bits (values above 32 mean 32).
    #[must_use]
    pub fn ipv4_prefix(mut self, prefix: u8) -> Self {
        self.ipv4_prefix = prefix.min(32);
        self
    }

    /// Groups IPv6 clients by their first `prefix` bits (values above 128 mean 128).
    #[must_use]
    pub fn ipv6_prefix(mut self, prefix: u8) -> Self {
        self.ipv6_prefix = prefix.min(128);
        self
    }

    /// The prefix lengths in use: (IPv4, IPv6).
    pub fn prefixes(&self) -> (u8, u8) {
        (self.ipv4_prefix, self.ipv6_prefix)
    }

    /// The prefix length used for `ip`'s family (after making it canonical).
    pub fn prefix_for(&self, ip: IpAddr) -> u8 {
        match ip.to_canonical() {
            IpAddr::V4(_) => self.ipv4_prefix,
            IpAddr::V6(_) => self.ipv6_prefix,
        }
    }

    /// The bucket identifier of a client address.
    pub fn identifier(&self, ip: IpAddr) -> String {
        let ip = ip.to_canonical();
        let prefix = self.prefix_for(ip);
        if prefix == max_prefix(ip) {
            ip.to_string()
        } else {
            format!("{}/{prefix}", mask(ip, prefix))
        }
    }

    /// The bucket identifier of an address written by a person: any spelling
    /// [`parse_client_ip`] accepts, or an identifier this grouping wrote (`2001:db8::/64`,
    /// `1.2.3.0/24`) — a network is accepted only with the prefix this grouping uses for its
    /// family, since any other would name a bucket the service never fills.
    ///
    /// # Errors
    /// [`ClientIpError`] when `text` is not an address, or is a network with another prefix.
    pub fn normalize(&self, text: &str) -> Result<String, ClientIpError> {
        let trimmed = text.trim();
        let Some((addr, prefix)) = trimmed.split_once('/') else {
            return parse_client_ip(trimmed).map(|ip| self.identifier(ip));
        };
        let ip = parse_client_ip(addr)?;
        let expected = self.prefix_for(ip);
        let family = match ip.to_canonical() {
            IpAddr::V4(_) => "IPv4",
            IpAddr::V6(_) => "IPv6",
        };
        // An IPv4-mapped network is written with the IPv6 prefix length (/96 + n).
        let given: Option<u8> = prefix.parse().ok();
        let given = match (ip, given) {
            (IpAddr::V6(v6), Some(p)) if v6.to_ipv4_mapped().is_some() => p.checked_sub(96),
            (_, p) => p,
        };
        match given {
            Some(p) if p == expected => Ok(self.identifier(ip)),
            _ => Err(ClientIpError(format!(
                "{trimmed:?} is a network of prefix /{prefix}, but {family} clients are grouped \
                 by /{expected}"
            ))),
        }
    }
}

/// Parses a client address as people and proxies write it: `1.2.3.4`, `2001:db8::1`,
/// `[2001:db8::1]`, `::ffff:1.2.3.4`, or with an IPv6 zone id, `fe80::1%eth0` (the zone names
/// an interface of the machine that wrote it, not a client, and is dropped). Surrounding
/// whitespace is ignored; ports are not accepted (see the HTTP layer's header parser for
/// those).
///
/// ```
/// use ratelimit_domain::parse_client_ip;
///
/// assert_eq!(parse_client_ip("[::1]")?, "::1".parse::<std::net::IpAddr>()?);
/// assert_eq!(parse_client_ip("fe80::1%eth0")?, "fe80::1".parse::<std::net::IpAddr>()?);
/// assert!(parse_client_ip("alice").is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`ClientIpError`] for anything else.
pub fn parse_client_ip(text: &str) -> Result<IpAddr, ClientIpError> {
    let text = text.trim();
    let inner = match text.strip_prefix('[') {
        Some(rest) => rest
            .strip_suffix(']')
            .ok_or_else(|| ClientIpError(format!("{text:?} opens a bracket it does not close")))?,
        None => text,
    };
    let bracketed = inner.len() != text.len();
    if let Some((addr, zone)) = inner.split_once('%') {
        return match addr.parse::<Ipv6Addr>() {
            Ok(v6) if is_zone_id(zone) => Ok(IpAddr::V6(v6)),
            _ => Err(ClientIpError(format!(
                "{text:?} is not an IP address (a zone id follows an IPv6 address: fe80::1%eth0)"
            ))),
        };
    }
    let parsed = if bracketed {
        inner.parse::<Ipv6Addr>().map(IpAddr::V6).ok()
    } else {
        inner.parse::<IpAddr>().ok()
    };
    parsed.ok_or_else(|| ClientIpError(format!("{text:?} is not an IP address")))
}

/// Whether `zone` is a plausible IPv6 zone id (RFC 6874: unreserved characters, or `%25`
/// for the URI form's encoded `%`).
fn is_zone_id(zone: &str) -> bool {
    let zone = zone
        .strip_prefix("25")
        .filter(|z| !z.is_empty())
        .unwrap_or(zone);
    !zone.is_empty()
        && zone.len() <= 64
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
}

/// A text that is not a client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIpError(String);

impl fmt::Display for ClientIpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ClientIpError {}

/// The length of an address in bits: 32 or 128.
pub fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with every bit after the first `prefix` cleared (`prefix` is clamped to the
/// address's length).
pub fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let keep = match u32::from(prefix.min(32)) {
                0 => 0,
                n => u32::MAX << (32 - n),
            };
            IpAddr::V4(Ipv4Addr::from(bits & keep))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = match u32::from(prefix.min(128)) {
                0 => 0,
                n => u128::MAX << (128 - n),
            };
            IpAddr::V6(Ipv6Addr::from(bits & keep))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn grouping_canonicalises_and_groups_ipv6() {
        let g = IpGrouping::default();
        assert_eq!(g.identifier(ip("1.2.3.4")), "1.2.3.4");
        assert_eq!(g.identifier(ip("::ffff:1.2.3.4")), "1.2.3.4");
        assert_eq!(g.identifier(ip("::ffff:0102:0304")), "1.2.3.4");
        assert_eq!(
            g.identifier(ip("2001:db8:1:2:3:4:5:6")),
            "2001:db8:1:2::/64"
        );
        assert_eq!(
            g.identifier(ip("2001:0DB8:0001:0002:ffff::1")),
            "2001:db8:1:2::/64"
        );
        assert_eq!(g.identifier(ip("::1")), "::/64");
        assert_eq!(
            IpGrouping::default()
                .ipv6_prefix(48)
                .identifier(ip("2001:db8:1:2::9")),
            "2001:db8:1::/48"
        );
        let fine = IpGrouping::new().ipv6_prefix(128).ipv4_prefix(24);
        assert_eq!(fine.identifier(ip("2001:DB8::0:1")), "2001:db8::1");
        assert_eq!(fine.identifier(ip("1.2.3.4")), "1.2.3.0/24");
        assert_eq!(fine.prefixes(), (24, 128));
        let clamped = IpGrouping::new().ipv6_prefix(200).ipv4_prefix(99);
        assert_eq!(clamped.prefixes(), (32, 128));
        assert_eq!(
            IpGrouping::new().ipv4_prefix(0).identifier(ip("9.9.9.9")),
            "0.0.0.0/0"
        );
    }

    #[test]
    fn every_spelling_an_operator_types_names_the_service_s_bucket() {
        let g = IpGrouping::default();
        for (typed, identifier) in [
            ("::1", "::/64"),
            ("[::1]", "::/64"),
            (" ::1 ", "::/64"),
            ("0:0:0:0:0:0:0:1", "::/64"),
            ("::/64", "::/64"),
            ("[2001:DB8::7]", "2001:db8::/64"),
            ("2001:db8:0:0:ffff::/64", "2001:db8::/64"),
            ("::ffff:1.2.3.4", "1.2.3.4"),
            ("[::ffff:1.2.3.4]", "1.2.3.4"),
            ("::ffff:1.2.3.4/128", "1.2.3.4"),
            ("1.2.3.4/32", "1.2.3.4"),
            ("fe80::1%eth0", "fe80::/64"),
            ("[fe80::1%25eth0]", "fe80::/64"),
            ("192.0.2.7", "192.0.2.7"),
        ] {
            assert_eq!(g.normalize(typed).as_deref(), Ok(identifier), "{typed:?}");
        }
        let fine = IpGrouping::new().ipv6_prefix(128).ipv4_prefix(24);
        assert_eq!(fine.normalize("[::1]").as_deref(), Ok("::1"));
        assert_eq!(fine.normalize("1.2.3.99").as_deref(), Ok("1.2.3.0/24"));
        assert_eq!(fine.normalize("1.2.3.0/24").as_deref(), Ok("1.2.3.0/24"));
    }

    #[test]
    fn what_is_not_an_address_or_another_grouping_is_refused() {
        let g = IpGrouping::default();
        for bad in [
            "",
            "alice",
            "[::1",
            "::1]",
            "[1.2.3.4]",
            "1.2.3.4%eth0",
            "fe80::1%",
            "fe80::1%a b",
            "1.2.3.4:80",
            "[::1]:443",
            "2001:db8::/48",
            "1.2.3.0/24",
            "::/x",
            "1.2.3.4/",
            "unknown",
            "_hidden",
        ] {
            let err = g.normalize(bad).unwrap_err();
            assert!(!err.to_string().is_empty(), "{bad:?}");
        }
        let err = g.normalize("2001:db8::/48").unwrap_err();
        assert!(err.to_string().contains("grouped by /64"), "{err}");
    }
}
