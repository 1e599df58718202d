//! Client addresses: canonical form, grouping by prefix, and proxy trust.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use http::HeaderMap;
use http::header::{FORWARDED, HeaderName};
use ratelimit_adapter::domain::client_ip::{mask, max_prefix};
use ratelimit_adapter::domain::parse_client_ip;

// How client addresses are grouped into buckets lives in the domain, shared with the admin
// CLI so that both write the same identifier for the same client.
pub use ratelimit_adapter::domain::IpGrouping;

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
/// 3. A hop that cannot be read (garbage, `unknown`, an obfuscated `_name`, an unterminated
///    quoted-string) stops the walk: the client is the last address known for sure (the last
///    hop a trusted proxy added, or the peer). If every hop is trusted, the left-most one read
///    is the client.
///
/// Each header line is split into elements from its right end, so what a client wrote on the
/// left (an unterminated quote, a stray comma, bytes that are not ASCII) cannot change how the
/// elements its proxies appended are split: the right-most element a trusted proxy added
/// always wins. Work is bounded by [`MAX_HOPS`](Self::MAX_HOPS) and
/// [`MAX_SCAN_BYTES`](Self::MAX_SCAN_BYTES).
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
    ///
    /// Bounded work: at most [`MAX_HOPS`](Self::MAX_HOPS) elements and
    /// [`MAX_SCAN_BYTES`](Self::MAX_SCAN_BYTES) bytes of the header are read, from the right;
    /// a chain of trusted proxies longer than that ends at the last hop read.
    pub fn resolve(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.is_trusted(client) {
            return client;
        }
        let name = match self.header {
            ForwardedHeader::XForwardedFor => X_FORWARDED_FOR,
            ForwardedHeader::Forwarded => FORWARDED,
        };
        let lines = headers
            .get_all(name)
            .iter()
            .rev()
            .map(|value| value.as_bytes());
        for hop in HopsFromRight::new(lines, self.header) {
            match hop {
                Hop::Empty => {}
                Hop::Unreadable => return client,
                Hop::Address(ip) => {
                    client = ip.to_canonical();
                    if !self.is_trusted(client) {
                        return client;
                    }
                }
            }
        }
        client
    }

    /// The most header elements (hops, empty ones included) [`resolve`](Self::resolve) reads.
    pub const MAX_HOPS: usize = 32;

    /// The most header bytes [`resolve`](Self::resolve) reads, over all lines.
    pub const MAX_SCAN_BYTES: usize = 8 * 1024;
}

/// One element of a forwarding header, read from the right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// An empty list element (`a, , b`): ignored, as RFC 9110 asks of list recipients.
    Empty,
    /// An element that names no address: garbage, `unknown`, an obfuscated `_name`, an
    /// element without `for=`, an unterminated quoted-string, or one past the reading limits.
    Unreadable,
    /// The address an element names.
    Address(IpAddr),
}

/// The elements of every line of a forwarding header, right-most first.
///
/// Each line is split from its right end, so how an element is delimited depends only on
/// the text to its right: what a client wrote on the left (an unterminated quote, a stray
/// comma, bytes that are not ASCII) can never change how the elements the proxies appended
/// are split. Lines are separate lists (a quoted-string never runs from one line into the
/// next), read last line first.
struct HopsFromRight<'a, I> {
    lines: I,
    /// The part of the current line not yet read; `None` when the line is done.
    rest: Option<&'a [u8]>,
    header: ForwardedHeader,
    hops_left: usize,
    bytes_left: usize,
    /// Set once an element made the rest unreadable: nothing more is yielded.
    done: bool,
}

impl<'a, I: Iterator<Item = &'a [u8]>> HopsFromRight<'a, I> {
    fn new(lines: I, header: ForwardedHeader) -> Self {
        Self {
            lines,
            rest: None,
            header,
            hops_left: ClientIpResolver::MAX_HOPS,
            bytes_left: ClientIpResolver::MAX_SCAN_BYTES,
            done: false,
        }
    }

    fn stop(&mut self) -> Option<Hop> {
        self.done = true;
        Some(Hop::Unreadable)
    }
}

impl<'a, I: Iterator<Item = &'a [u8]>> Iterator for HopsFromRight<'a, I> {
    type Item = Hop;

    fn next(&mut self) -> Option<Hop> {
        if self.done {
            return None;
        }
        let line = match self.rest.take() {
            Some(line) => line,
            None => self.lines.next()?,
        };
        if self.hops_left == 0 {
            // More elements than the limit: the walk ends here.
            return self.stop();
        }
        self.hops_left -= 1;
        let quotes = self.header == ForwardedHeader::Forwarded;
        let Some((element, rest)) = split_last_element(line, quotes, &mut self.bytes_left) else {
            // An unterminated quoted-string or the byte limit: this element, and anything to
            // its left, cannot be read.
            return self.stop();
        };
        self.rest = rest;
        let element = trim_ows(element);
        if element.is_empty() {
            return Some(Hop::Empty);
        }
        let node = if quotes {
            forwarded_for(element)
        } else {
            std::str::from_utf8(element).ok().map(str::to_owned)
        };
        match node.as_deref().and_then(parse_node) {
            Some(ip) => Some(Hop::Address(ip)),
            None => self.stop(),
        }
    }
}

/// Splits the right-most element off `line`: `(element, the rest of the line left of its
/// comma)`, the rest `None` when the element started the line. `None` when the element cannot
/// be delimited: a quoted-string (with `quotes`) that is not closed before the line's start,
/// or more bytes than `budget` allows (the budget is charged with the bytes read).
///
/// Reading right to left, a `"` outside a quoted-string closes one, which runs left to the
/// first `"` not escaped by an odd number of backslashes. The state at any byte depends only
/// on the bytes to its right.
fn split_last_element<'a>(
    line: &'a [u8],
    quotes: bool,
    budget: &mut usize,
) -> Option<(&'a [u8], Option<&'a [u8]>)> {
    let mut quoted = false;
    let mut i = line.len();
    while i > 0 {
        if *budget == 0 {
            return None;
        }
        *budget -= 1;
        i -= 1;
        match line[i] {
            b'"' if quotes && quoted => {
                // Counted within the budget: a longer run exhausts the budget below anyway.
                let backslashes = line[..i]
                    .iter()
                    .rev()
                    .take(*budget)
                    .take_while(|&&b| b == b'\\')
                    .count();
                if backslashes % 2 == 0 {
                    quoted = false;
                }
            }
            b'"' if quotes => quoted = true,
            b',' if !quoted => return Some((&line[i + 1..], Some(&line[..i]))),
            _ => {}
        }
    }
    (!quoted).then_some((line, None))
}

/// `bytes` without leading and trailing spaces and tabs (RFC 9110's OWS).
fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| matches!(b, b' ' | b'\t');
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// The `for=` value of one RFC 7239 element (`for=192.0.2.60;proto=http`), unquoted; `None`
/// unless the element is well-formed (`name=value` pairs separated by `;`, a value being a
/// token or a quoted-string) with exactly one `for`.
fn forwarded_for(element: &[u8]) -> Option<String> {
    let mut node = None;
    let mut pos = 0;
    loop {
        // One pair (or an empty one) up to the next `;` or the end.
        let rest = &element[pos..];
        let lead = rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        pos += lead;
        if pos == element.len() {
            break;
        }
        if element[pos] == b';' {
            pos += 1;
            continue;
        }
        let name_len = element[pos..].iter().take_while(|&&b| is_tchar(b)).count();
        let name = &element[pos..pos + name_len];
        pos += name_len;
        if name.is_empty() || element.get(pos) != Some(&b'=') {
            return None;
        }
        pos += 1;
        let (value, used) = pair_value(&element[pos..])?;
        pos += used;
        if name.eq_ignore_ascii_case(b"for") {
            if node.is_some() {
                // RFC 7239 §4: a parameter occurs at most once per element.
                return None;
            }
            node = Some(value);
        }
        let trailing = element[pos..]
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        pos += trailing;
        match element.get(pos) {
            None => break,
            Some(b';') => pos += 1,
            Some(_) => return None,
        }
    }
    node
}

/// A token or a quoted-string at the start of `text`: its value and the bytes it took.
fn pair_value(text: &[u8]) -> Option<(String, usize)> {
    if text.first() != Some(&b'"') {
        let len = text
            .iter()
            .take_while(|&&b| is_tchar(b) || b == b':' || b == b'[' || b == b']')
            .count();
        if len == 0 {
            return None;
        }
        return Some((String::from_utf8(text[..len].to_vec()).ok()?, len));
    }
    let mut value = Vec::new();
    let mut i = 1;
    while i < text.len() {
        match text[i] {
            b'"' => return Some((String::from_utf8(value).ok()?, i + 1)),
            b'\\' => {
                value.push(*text.get(i + 1)?);
                i += 2;
            }
            b => {
                value.push(b);
                i += 1;
            }
        }
    }
    None
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:443`, a port obfuscated as `_name`, or an IPv6 zone id (`fe80::1%eth0`,
/// dropped). `None` for anything else (`unknown`, `_hidden`, garbage).
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim_matches([' ', '\t']);
    if node.is_empty() || node.len() > 100 {
        return None;
    }
    let host = if let Some(rest) = node.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        // Only IPv6 goes in brackets.
        if inner.contains('.') && !inner.contains(':') {
            return None;
        }
        inner
    } else {
        match node.split_once(':') {
            // `1.2.3.4:80`: one colon after an IPv4 address.
            Some((v4, port)) if v4.contains('.') && !port.contains(':') && is_port(port) => v4,
            _ => node,
        }
    };
    parse_client_ip(host).ok()
}

/// A port as RFC 7239 writes it: digits, or an obfuscated `_name`.
fn is_port(port: &str) -> bool {
    let digits = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    let obfuscated = port.len() > 1
        && port.starts_with('_')
        && port
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    digits || obfuscated
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

    /// A resolver behind one trusted proxy (10.0.0.1) that appends `, for=<client>` to the
    /// `Forwarded` header the client sent (nginx: `$http_forwarded, for=$remote_addr`).
    fn behind_appending_proxy(header: ForwardedHeader, client_sent: &[u8]) -> IpAddr {
        let resolver = ClientIpResolver::new()
            .trust([net("10.0.0.0/8")])
            .header(header);
        let (name, appended): (HeaderName, &[u8]) = match header {
            ForwardedHeader::Forwarded => (FORWARDED, b", for=203.0.113.9"),
            _ => (X_FORWARDED_FOR, b", 203.0.113.9"),
        };
        let mut value = client_sent.to_vec();
        value.extend_from_slice(appended);
        let mut h = HeaderMap::new();
        h.append(name, http::HeaderValue::from_bytes(&value).unwrap());
        resolver.resolve(ip("10.0.0.1"), &h)
    }

    /// Whatever a client writes before the proxy's element, the proxy's element wins.
    /// (Before the right-to-left reading, `for=198.51.100.7;x="` picked the client's own
    /// address and a bare `"` put it into the proxy's bucket.)
    #[test]
    fn client_text_left_of_the_proxy_s_element_cannot_steer_it() {
        let long_quote = format!("for=\"{}", "a".repeat(100_000));
        let many_commas = ",".repeat(10_000);
        let many_hops = "198.51.100.7, ".repeat(5_000);
        let hostile: Vec<&[u8]> = vec![
            b"for=198.51.100.7;x=\"",
            b"\"",
            b"for=\"",
            b"for=\"\\",
            b"for=\"[::1]",
            b"for=198.51.100.7;x=\"\\\"",
            b"\\\"",
            b"for=10.0.0.5",
            b"for=198.51.100.7, for=10.0.0.5",
            b";;;===",
            b"for=\xff\xfe",
            b"\xff",
            b"unknown",
            b"for=_hidden",
            b"",
            b" , , ",
            long_quote.as_bytes(),
            many_commas.as_bytes(),
            many_hops.as_bytes(),
        ];
        for header in [ForwardedHeader::Forwarded, ForwardedHeader::XForwardedFor] {
            for client_sent in &hostile {
                assert_eq!(
                    behind_appending_proxy(header, client_sent),
                    ip("203.0.113.9"),
                    "{header:?} after {:?}",
                    String::from_utf8_lossy(&client_sent[..client_sent.len().min(40)])
                );
            }
        }
    }

    /// A proxy that adds its own header line: the client's line, however broken, is a list of
    /// its own and cannot swallow the proxy's.
    #[test]
    fn an_unterminated_quote_stays_in_its_own_line() {
        let resolver = ClientIpResolver::new()
            .trust([net("10.0.0.0/8")])
            .header(ForwardedHeader::Forwarded);
        let peer = ip("10.0.0.1");
        for (values, expected) in [
            (
                &["for=198.51.100.7;x=\"", "for=203.0.113.9"][..],
                "203.0.113.9",
            ),
            (&["\"", "for=203.0.113.9;proto=https"][..], "203.0.113.9"),
            (&["for=203.0.113.9", "for=10.0.0.2"][..], "203.0.113.9"),
            // The proxy chain reaches the broken line: stop at the last proxy-added hop.
            (&["for=\"198.51.100.7", "for=10.0.0.2"][..], "10.0.0.2"),
            (&["for=198.51.100.7, \"x", "for=10.0.0.2"][..], "10.0.0.2"),
        ] {
            let h = headers("forwarded", values);
            assert_eq!(resolver.resolve(peer, &h), ip(expected), "{values:?}");
        }
    }

    /// Bytes that are not ASCII poison only the element that holds them (they used to make
    /// the whole line unreadable, and put the client into the proxy's bucket).
    #[test]
    fn non_ascii_bytes_only_poison_their_own_element() {
        let resolver = ClientIpResolver::new().trust([net("10.0.0.0/8")]);
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            http::HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.9").unwrap(),
        );
        assert_eq!(resolver.resolve(ip("10.0.0.1"), &h), ip("203.0.113.9"));
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            http::HeaderValue::from_bytes(b"203.0.113.9, 10.0.0.2\xff").unwrap(),
        );
        assert_eq!(resolver.resolve(ip("10.0.0.1"), &h), ip("10.0.0.1"));
    }

    #[test]
    fn empty_elements_are_ignored_and_unknown_or_obfuscated_nodes_stop_the_walk() {
        let xff = ClientIpResolver::new().trust([net("10.0.0.0/8")]);
        let fwd = xff.clone().header(ForwardedHeader::Forwarded);
        let peer = ip("10.0.0.1");
        for (values, expected) in [
            (&["6.6.6.6, , 203.0.113.9"][..], "203.0.113.9"),
            (&["203.0.113.9, ,"][..], "203.0.113.9"),
            (&["203.0.113.9", "", " "][..], "203.0.113.9"),
            (&["6.6.6.6,,,10.0.0.2,"][..], "6.6.6.6"),
            (&["6.6.6.6, unknown, 10.0.0.2"][..], "10.0.0.2"),
            (&["6.6.6.6, _hidden"][..], "10.0.0.1"),
            (&["6.6.6.6, 10.0.0.2\t,\t"][..], "6.6.6.6"),
        ] {
            assert_eq!(
                xff.resolve(peer, &headers("x-forwarded-for", values)),
                ip(expected),
                "{values:?}"
            );
        }
        for (values, expected) in [
            (&["for=6.6.6.6, , for=203.0.113.9"][..], "203.0.113.9"),
            (&["for=6.6.6.6, for=unknown, for=10.0.0.2"][..], "10.0.0.2"),
            (&["for=6.6.6.6, for=_hidden;proto=https"][..], "10.0.0.1"),
            (&["for=6.6.6.6, for=\"_x\""][..], "10.0.0.1"),
            // Two `for` in one element: nobody honest writes that.
            (&["for=6.6.6.6;for=203.0.113.9"][..], "10.0.0.1"),
            // Not `name=value`: unreadable.
            (&["for=6.6.6.6, for"][..], "10.0.0.1"),
            (&["for=6.6.6.6, for=203.0.113.9 junk"][..], "10.0.0.1"),
            (&["for=6.6.6.6, for=\"\""][..], "10.0.0.1"),
            // Tabs are whitespace (what is left of an obs-fold once a proxy unfolds it).
            (
                &["for=6.6.6.6,\tfor=203.0.113.9\t;\tproto=https"][..],
                "203.0.113.9",
            ),
        ] {
            assert_eq!(
                fwd.resolve(peer, &headers("forwarded", values)),
                ip(expected),
                "{values:?}"
            );
        }
        // An obs-fold itself cannot reach the parser: a header value holds no CR or LF.
        assert!(http::HeaderValue::from_bytes(b"for=1.2.3.4,\r\n for=5.6.7.8").is_err());
    }

    #[test]
    fn ports_brackets_and_zone_ids() {
        let xff = ClientIpResolver::new().trust([net("10.0.0.0/8")]);
        let fwd = xff.clone().header(ForwardedHeader::Forwarded);
        let peer = ip("10.0.0.1");
        for (value, expected) in [
            ("for=\"[2001:db8::1]:4711\"", "2001:db8::1"),
            ("for=\"[2001:db8::1]:_port\"", "2001:db8::1"),
            ("for=\"1.2.3.4:80\"", "1.2.3.4"),
            ("for=1.2.3.4:80", "1.2.3.4"),
            ("for=\"[fe80::1%eth0]:80\"", "fe80::1"),
            ("for=\"[fe80::1%25eth0]\"", "fe80::1"),
            ("for=\"[::ffff:1.2.3.4]:80\"", "1.2.3.4"),
        ] {
            assert_eq!(
                fwd.resolve(peer, &headers("forwarded", &[value])),
                ip(expected),
                "{value}"
            );
        }
        for (value, expected) in [
            ("1.2.3.4:80", "1.2.3.4"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("fe80::1%eth0", "fe80::1"),
            ("[fe80::1%eth0]:443", "fe80::1"),
        ] {
            assert_eq!(
                xff.resolve(peer, &headers("x-forwarded-for", &[value])),
                ip(expected),
                "{value}"
            );
        }
        // Malformed: unreadable, the walk stops at the proxy.
        for value in [
            "[1.2.3.4]",
            "[2001:db8::1",
            "[2001:db8::1]x",
            "[2001:db8::1]:99999999",
            "1.2.3.4:",
            "1.2.3.4%eth0",
            "fe80::1%",
            "fe80::1%a/b",
        ] {
            assert_eq!(
                xff.resolve(peer, &headers("x-forwarded-for", &[value])),
                peer,
                "{value}"
            );
        }
    }

    /// Thousands of hops, thousands of lines and huge values are read only as far as the
    /// limits: a longer chain of trusted proxies ends at the last hop read.
    #[test]
    fn work_is_bounded_by_hops_and_bytes() {
        let resolver = ClientIpResolver::new().trust([net("10.0.0.0/8")]);
        let peer = ip("10.0.0.1");
        let chain = format!("198.51.100.7, {}10.0.0.3", "10.0.0.2, ".repeat(10_000));
        assert_eq!(
            resolver.resolve(peer, &headers("x-forwarded-for", &[&chain])),
            ip("10.0.0.2")
        );
        let hops: Vec<Hop> = HopsFromRight::new(
            std::iter::once(chain.as_bytes()),
            ForwardedHeader::XForwardedFor,
        )
        .collect();
        assert_eq!(hops.len(), ClientIpResolver::MAX_HOPS + 1);
        assert_eq!(hops.last(), Some(&Hop::Unreadable));

        // Thousands of lines: the same limit.
        let mut many = HeaderMap::new();
        many.append(X_FORWARDED_FOR, "198.51.100.7".parse().unwrap());
        for _ in 0..5_000 {
            many.append(X_FORWARDED_FOR, "10.0.0.2".parse().unwrap());
        }
        assert_eq!(resolver.resolve(peer, &many), ip("10.0.0.2"));

        // One huge element right of everything: past the byte limit, unreadable.
        let huge = format!("198.51.100.7, 10.0.0.2, {}", "9".repeat(1_000_000));
        assert_eq!(
            resolver.resolve(peer, &headers("x-forwarded-for", &[&huge])),
            peer
        );
        let mut budget = ClientIpResolver::MAX_SCAN_BYTES;
        assert_eq!(
            split_last_element(huge.as_bytes(), false, &mut budget),
            None
        );
        assert_eq!(budget, 0);
        // A long quoted-string of the proxy's own making is fine within the limit.
        let fwd = resolver.clone().header(ForwardedHeader::Forwarded);
        let ok = format!("for=203.0.113.9;x=\"{}\"", "a\\\"".repeat(1_000));
        assert_eq!(
            fwd.resolve(peer, &headers("forwarded", &[&ok])),
            ip("203.0.113.9")
        );
    }
}
