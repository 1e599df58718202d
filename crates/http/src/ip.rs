//! Client addresses: canonical form, grouping by prefix, and proxy trust.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName};

/// The `X-Forwarded-For` header name.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`), or a single address.
///
/// Host bits are cleared on construction, and an IPv4-mapped IPv6 network
/// (`::ffff:10.0.0.0/104`) is stored as the IPv4 network it denotes (`10.0.0.0/8`), so that
/// trust never depends on how an address was spelt.
///
/// ```
/// use ratelimit_http::IpNet;
///
/// let net: IpNet = "10.1.2.3/8".parse()?;
/// assert_eq!(net.to_string(), "10.0.0.0/8");
/// assert!(net.contains("10.200.0.1".parse()?));
/// assert!(net.contains("::ffff:10.0.0.7".parse()?));
/// assert!(!net.contains("11.0.0.1".parse()?));
/// let host: IpNet = "::1".parse()?;
/// assert_eq!(host.to_string(), "::1/128");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The network of `addr` with `prefix` leading bits.
    ///
    /// # Errors
    /// [`ParseIpNetError`] when `prefix` is longer than the address (32 bits for IPv4, 128 for
    /// IPv6).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, ParseIpNetError> {
        let (addr, prefix) = match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                // ::ffff:a.b.c.d/n with n >= 96 is the IPv4 network a.b.c.d/(n - 96).
                Some(v4) if (96..=128).contains(&prefix) => (IpAddr::V4(v4), prefix - 96),
                _ => (addr, prefix),
            },
            IpAddr::V4(_) => (addr, prefix),
        };
        let max = max_prefix(addr);
        if prefix > max {
            return Err(ParseIpNetError(format!(
                "prefix /{prefix} is longer than the {max} bits of {addr}"
            )));
        }
        Ok(Self {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// The network of exactly one address.
    pub fn host(addr: IpAddr) -> Self {
        let addr = addr.to_canonical();
        Self {
            addr,
            prefix: max_prefix(addr),
        }
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` (in any spelling, IPv4-mapped IPv6 included) lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }
}

impl From<IpAddr> for IpNet {
    fn from(addr: IpAddr) -> Self {
        Self::host(addr)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = ParseIpNetError;

    /// Parses `ADDRESS` or `ADDRESS/PREFIX` (IPv4 or IPv6).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.split_once('/') {
            None => s
                .parse::<IpAddr>()
                .map(Self::host)
                .map_err(|_| ParseIpNetError(format!("{s:?} is not an IP address"))),
            Some((addr, prefix)) => {
                let addr: IpAddr = addr
                    .parse()
                    .map_err(|_| ParseIpNetError(format!("{addr:?} is not an IP address")))?;
                let prefix: u8 = prefix
                    .parse()
                    .map_err(|_| ParseIpNetError(format!("{prefix:?} is not a prefix length")))?;
                Self::new(addr, prefix)
            }
        }
    }
}

/// A text that is not an IP network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseIpNetError(String);

impl fmt::Display for ParseIpNetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid IP network: {}", self.0)
    }
}

impl std::error::Error for ParseIpNetError {}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// `addr` with every bit after the first `prefix` cleared (`prefix` is clamped to the
/// address's length).
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
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
/// use ratelimit_http::IpGrouping;
///
/// let grouping = IpGrouping::default();
/// assert_eq!(grouping.identifier("::ffff:192.0.2.7".parse()?), "192.0.2.7");
/// assert_eq!(grouping.identifier("2001:DB8:0:0:1::7".parse()?), "2001:db8::/64");
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
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }
}

impl IpGrouping {
    /// The default IPv6 prefix length.
    pub const DEFAULT_IPV6_PREFIX: u8 = 64;

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

    /// The bucket identifier of a client address.
    pub fn identifier(&self, ip: IpAddr) -> String {
        let ip = ip.to_canonical();
        let prefix = match ip {
            IpAddr::V4(_) => self.ipv4_prefix,
            IpAddr::V6(_) => self.ipv6_prefix,
        };
        if prefix == max_prefix(ip) {
            ip.to_string()
        } else {
            format!("{}/{prefix}", mask(ip, prefix))
        }
    }
}

/// Which header the trusted proxies maintain.
///
/// Only one is read: a proxy that maintains `X-Forwarded-For` passes a client's own
/// `Forwarded` header through untouched, so reading both would let clients choose their
/// address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (nginx, HAProxy, most load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client;proto=https, for="[2001:db8::1]:4711"`.
    Forwarded,
}

/// Finds the client address of a request, trusting forwarding headers only from configured
/// proxies.
///
/// The algorithm is the standard right-to-left walk:
///
/// 1. Start from the peer address (the TCP connection's other end). If it is not a trusted
///    proxy, it is the client: the forwarding header is ignored.
/// 2. Otherwise walk the header's hops from right (nearest) to left. Each hop was written by
///    the trusted proxy to its right; the first hop that is not itself a trusted proxy is the
///    client.
/// 3. A hop that cannot be read (garbage, `unknown`, an obfuscated `_name`) stops the walk:
///    the client is the last address known for sure (the trusted proxy that handed the
///    request over). If every hop is trusted, the left-most one is the client.
///
/// Addresses are compared and returned in canonical form (IPv4-mapped IPv6 → IPv4).
///
/// ```
/// use http::HeaderMap;
/// use ratelimit_http::{ClientIpResolver, IpNet};
///
/// let resolver = ClientIpResolver::new().trust(["10.0.0.0/8".parse::<IpNet>()?]);
/// let mut headers = HeaderMap::new();
/// headers.insert("x-forwarded-for", "6.6.6.6, 203.0.113.9, 10.0.0.2".parse()?);
/// // Through a trusted proxy: the right-most untrusted hop.
/// assert_eq!(resolver.resolve("10.0.0.1".parse()?, &headers), "203.0.113.9".parse::<std::net::IpAddr>()?);
/// // Straight from a client: the header is ignored.
/// assert_eq!(resolver.resolve("198.51.100.4".parse()?, &headers), "198.51.100.4".parse::<std::net::IpAddr>()?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClientIpResolver {
    trusted: Vec<IpNet>,
    header: ForwardedHeader,
}

impl ClientIpResolver {
    /// A resolver that trusts no proxy: the client is always the peer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds trusted proxies (addresses or networks).
    #[must_use]
    pub fn trust(mut self, proxies: impl IntoIterator<Item = IpNet>) -> Self {
        self.trusted.extend(proxies);
        self
    }

    /// Chooses the header the trusted proxies maintain (default `X-Forwarded-For`).
    #[must_use]
    pub fn header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    /// The trusted proxies.
    pub fn trusted_proxies(&self) -> &[IpNet] {
        &self.trusted
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(ip))
    }

    /// The client address of a request that arrived from `peer` with `headers`.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.is_trusted(client) {
            return client;
        }
        let hops = match self.header {
            ForwardedHeader::XForwardedFor => x_forwarded_for_hops(headers),
            ForwardedHeader::Forwarded => forwarded_hops(headers),
        };
        for hop in hops.into_iter().rev() {
            let Some(ip) = hop else {
                return client;
            };
            client = ip.to_canonical();
            if !self.is_trusted(client) {
                return client;
            }
        }
        client
    }
}

/// The hops of every `X-Forwarded-For` line, in order; `None` for one that cannot be read.
fn x_forwarded_for_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        match value.to_str() {
            Ok(text) => hops.extend(text.split(',').map(parse_node)),
            Err(_) => hops.push(None),
        }
    }
    hops
}

/// The `for=` hops of every RFC 7239 `Forwarded` line, in order; `None` for an element
/// without a readable `for=`.
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let mut hops = Vec::new();
    for value in headers.get_all(FORWARDED) {
        let Ok(text) = value.to_str() else {
            hops.push(None);
            continue;
        };
        for element in split_unquoted(text, ',') {
            let node = split_unquoted(element, ';').into_iter().find_map(|pair| {
                let (name, value) = pair.split_once('=')?;
                name.trim()
                    .eq_ignore_ascii_case("for")
                    .then(|| unquote(value.trim()))
            });
            hops.push(node.and_then(|node| parse_node(&node)));
        }
    }
    hops
}

/// Splits on `separator` outside double-quoted strings (which may hold `\` escapes).
fn split_unquoted(text: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if !quoted && c == separator {
            parts.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&text[start..]);
    parts
}

/// The value of a token or a quoted-string.
fn unquote(value: &str) -> String {
    let Some(inner) = value
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
    else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`
/// or `[2001:db8::1]:443`. `None` for anything else (`unknown`, `_hidden`, garbage).
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim();
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(socket) = node.parse::<SocketAddr>() {
        return Some(socket.ip());
    }
    node.strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<Ipv6Addr>().ok())
        .map(IpAddr::V6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for value in values {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn networks_parse_mask_and_match() {
        assert_eq!(net("192.168.7.9/16").to_string(), "192.168.0.0/16");
        assert_eq!(net("10.0.0.1").to_string(), "10.0.0.1/32");
        assert_eq!(net("2001:db8::1/32").to_string(), "2001:db8::/32");
        assert_eq!(net("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!net("0.0.0.0/0").contains(ip("::1")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
        assert!(net("2001:db8::/32").contains(ip("2001:db8:ffff::1")));
        assert!(!net("2001:db8::/32").contains(ip("2001:db9::1")));
        // IPv4-mapped spellings on either side.
        assert_eq!(net("::ffff:10.0.0.0/104").to_string(), "10.0.0.0/8");
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.9.9.9")));
        assert_eq!(IpNet::from(ip("::ffff:1.2.3.4")).to_string(), "1.2.3.4/32");
    }

    #[test]
    fn bad_networks_are_rejected_with_a_reason() {
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "nope",
            "10.0.0.0/x",
            "10.0.0.0/-1",
        ] {
            let err = bad.parse::<IpNet>().unwrap_err();
            assert!(err.to_string().starts_with("invalid IP network"), "{err}");
        }
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
        let fine = IpGrouping::default().ipv6_prefix(128).ipv4_prefix(24);
        assert_eq!(fine.identifier(ip("2001:DB8::0:1")), "2001:db8::1");
        assert_eq!(fine.identifier(ip("1.2.3.4")), "1.2.3.0/24");
        assert_eq!(fine.prefixes(), (24, 128));
        let clamped = IpGrouping::default().ipv6_prefix(200).ipv4_prefix(99);
        assert_eq!(clamped.prefixes(), (32, 128));
        assert_eq!(
            IpGrouping::default()
                .ipv6_prefix(48)
                .identifier(ip("2001:db8:1:2::9")),
            "2001:db8:1::/48"
        );
    }

    #[test]
    fn untrusted_peers_are_the_client() {
        let h = headers("x-forwarded-for", &["6.6.6.6"]);
        let resolver = ClientIpResolver::new();
        assert_eq!(resolver.resolve(ip("203.0.113.1"), &h), ip("203.0.113.1"));
        let resolver = ClientIpResolver::new().trust([net("10.0.0.0/8")]);
        assert_eq!(resolver.resolve(ip("203.0.113.1"), &h), ip("203.0.113.1"));
        assert_eq!(
            resolver.resolve(ip("::ffff:203.0.113.1"), &h),
            ip("203.0.113.1")
        );
    }

    #[test]
    fn x_forwarded_for_takes_the_right_most_untrusted_hop() {
        let resolver = ClientIpResolver::new().trust([net("10.0.0.0/8"), net("fd00::/8")]);
        let peer = ip("10.0.0.1");
        let cases: &[(&[&str], &str)] = &[
            (&["203.0.113.9"], "203.0.113.9"),
            (&["6.6.6.6, 203.0.113.9"], "203.0.113.9"),
            (&["6.6.6.6, 203.0.113.9, 10.0.0.2"], "203.0.113.9"),
            // Several header lines are one list, in order.
            (&["6.6.6.6", "203.0.113.9", "10.0.0.2"], "203.0.113.9"),
            // Ports and brackets as some proxies write them.
            (&["203.0.113.9:5555"], "203.0.113.9"),
            (&["[2001:db8::1]:443"], "2001:db8::1"),
            (&["[2001:db8::1]"], "2001:db8::1"),
            (&["2001:db8::1, fd00::5"], "2001:db8::1"),
            (&["::ffff:203.0.113.9"], "203.0.113.9"),
            // Everything trusted: the left-most hop.
            (&["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
            // Unreadable hops stop the walk at the last known address.
            (&["6.6.6.6, garbage"], "10.0.0.1"),
            (&["6.6.6.6, garbage, 10.0.0.2"], "10.0.0.2"),
            (&["6.6.6.6, unknown"], "10.0.0.1"),
            (&[""], "10.0.0.1"),
        ];
        for (values, expected) in cases {
            let h = headers("x-forwarded-for", values);
            assert_eq!(resolver.resolve(peer, &h), ip(expected), "{values:?}");
        }
        // No header: the peer.
        assert_eq!(resolver.resolve(peer, &HeaderMap::new()), peer);
        // The Forwarded header is not read when X-Forwarded-For is configured.
        let h = headers("forwarded", &["for=6.6.6.6"]);
        assert_eq!(resolver.resolve(peer, &h), peer);
    }

    #[test]
    fn forwarded_for_is_parsed_per_rfc_7239() {
        let resolver = ClientIpResolver::new()
            .trust([net("10.0.0.0/8")])
            .header(ForwardedHeader::Forwarded);
        let peer = ip("10.0.0.1");
        let cases: &[(&[&str], &str)] = &[
            (&["for=192.0.2.60;proto=http;by=203.0.113.43"], "192.0.2.60"),
            (&["For=\"[2001:db8:cafe::17]:4711\""], "2001:db8:cafe::17"),
            (&["for=192.0.2.43, for=198.51.100.17"], "198.51.100.17"),
            (&["for=192.0.2.43, for=10.0.0.9"], "192.0.2.43"),
            (
                &["for=192.0.2.43", "for=10.0.0.9;proto=https"],
                "192.0.2.43",
            ),
            (&["proto=https;for=\"192.0.2.43:80\""], "192.0.2.43"),
            // A quoted comma does not split elements.
            (&["for=192.0.2.43;x=\"a,b\""], "192.0.2.43"),
            (&["for=\"\\[::1\\]\""], "::1"),
            // Obfuscated, unknown or missing: stop at the last known address.
            (&["for=192.0.2.43, for=_hidden"], "10.0.0.1"),
            (&["for=192.0.2.43, for=unknown"], "10.0.0.1"),
            (&["for=192.0.2.43, proto=https"], "10.0.0.1"),
        ];
        for (values, expected) in cases {
            let h = headers("forwarded", values);
            assert_eq!(resolver.resolve(peer, &h), ip(expected), "{values:?}");
        }
        // X-Forwarded-For is not read when Forwarded is configured.
        let h = headers("x-forwarded-for", &["6.6.6.6"]);
        assert_eq!(resolver.resolve(peer, &h), peer);
    }

    #[test]
    fn non_ascii_header_values_are_unreadable_hops() {
        let resolver = ClientIpResolver::new().trust([net("10.0.0.0/8")]);
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            http::HeaderValue::from_bytes(b"1.2.3.4, \xff").unwrap(),
        );
        assert_eq!(resolver.resolve(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }
}
