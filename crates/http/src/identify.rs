//! Who a request's bucket belongs to.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use axum::extract::ConnectInfo;
use http::request::Parts;
use http::{Extensions, HeaderMap, StatusCode};
use ratelimit_adapter::RateLimitScope;

use crate::ip::{ClientIpResolver, ForwardedHeader, IpGrouping, IpNet};

/// The authenticated caller, put into the request extensions by an authentication layer that
/// runs **before** the rate-limit layer.
///
/// - [`RateLimitScope::User`] buckets use [`id`](Self::id).
/// - [`RateLimitScope::UserProvider`] buckets use `id@provider`, where every `%` and `@` of
///   the id is percent-encoded (`%25`, `%40`) so that the first `@` always separates the two:
///   user `42` of `github` is `42@github`.
///
/// ```
/// use ratelimit_http::AuthenticatedUser;
///
/// let mut request = http::Request::new(());
/// request
///     .extensions_mut()
///     .insert(AuthenticatedUser::new("42").with_provider("github"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthenticatedUser {
    /// The user's id; an empty id counts as no user.
    pub id: String,
    /// The identity provider that authenticated the user, if any.
    pub provider: Option<String>,
}

impl AuthenticatedUser {
    /// A user without a provider.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            provider: None,
        }
    }

    /// The same user, authenticated by `provider`.
    #[must_use]
    pub fn with_provider(mut self, provider: impl Into<String>) -> Self {
        self.provider = Some(provider.into());
        self
    }

    /// The identifier of this user's buckets under `scope` (`None` when the scope needs a
    /// provider and there is none, or when the id is empty).
    pub fn identifier(&self, scope: RateLimitScope) -> Option<String> {
        if self.id.is_empty() {
            return None;
        }
        match scope {
            RateLimitScope::UserProvider => {
                let provider = self.provider.as_deref().filter(|p| !p.is_empty())?;
                let id = self.id.replace('%', "%25").replace('@', "%40");
                Some(format!("{id}@{provider}"))
            }
            _ => Some(self.id.clone()),
        }
    }
}

/// A request the layer answers itself, without calling the inner service, because it cannot
/// tell whose bucket the request belongs to.
///
/// The response has the given status and a JSON body
/// `{"error": "<code>", "message": "<message>"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Rejection {
    /// A rejection with a status, a short machine-readable code and a human message (which
    /// is sent to the client: put no secrets in it).
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// The response status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The machine-readable code (`missing_peer_address`, `missing_user`, …).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The human-readable message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.status, self.code, self.message)
    }
}

impl std::error::Error for Rejection {}

/// What an [`IdentifierExtractor`] is asked about.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct IdentifyRequest<'a> {
    /// The request, without its body.
    pub parts: &'a Parts,
    /// The endpoint, `METHOD /route/template`.
    pub endpoint: &'a str,
    /// The scope of the endpoint's rule (never [`RateLimitScope::Global`]: global buckets need
    /// no identifier and the extractor is not asked).
    pub scope: RateLimitScope,
}

/// Finds the identifier of a request's bucket: pluggable, [`DefaultExtractor`] by default.
///
/// Implementations must be cheap and must not block: they run on every limited request.
/// Return a [`Rejection`] to answer the request without calling the inner service.
pub trait IdentifierExtractor: Send + Sync + fmt::Debug + 'static {
    /// The identifier of the request's bucket for `request.scope`.
    ///
    /// # Errors
    /// A [`Rejection`] when the request carries no usable identity.
    fn identify(&self, request: &IdentifyRequest<'_>) -> Result<String, Rejection>;

    /// As [`identify`](Self::identify), written into `identifier`, which is empty when the
    /// layer calls this: the layer passes a buffer it reuses from request to request, so an
    /// implementation that writes into it spares an allocation per request. The default stores
    /// what [`identify`](Self::identify) returns.
    ///
    /// # Errors
    /// As [`identify`](Self::identify).
    fn identify_into(
        &self,
        request: &IdentifyRequest<'_>,
        identifier: &mut String,
    ) -> Result<(), Rejection> {
        *identifier = self.identify(request)?;
        Ok(())
    }
}

/// What the layer answers when a user-scoped rule meets a request without an
/// [`AuthenticatedUser`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MissingUserPolicy {
    /// `401 Unauthorized` (the default): the route needs an authenticated caller. Right when
    /// the authentication layer lets anonymous requests through.
    #[default]
    Unauthorized,
    /// `500 Internal Server Error`: a missing user is a wiring bug (the authentication layer
    /// rejects anonymous requests, so it must have run after the rate-limit layer, or not at
    /// all).
    InternalServerError,
}

/// The standard [`IdentifierExtractor`].
///
/// | scope | identifier |
/// |---|---|
/// | `ip` | the client address ([`ClientIpResolver`]), grouped by [`IpGrouping`] |
/// | `user` | [`AuthenticatedUser::id`] from the request extensions |
/// | `user_provider` | `id@provider` from the [`AuthenticatedUser`] extension |
/// | `global` | none |
///
/// The peer address is read from axum's `ConnectInfo<SocketAddr>` extension: serve the
/// router with `into_make_service_with_connect_info::<SocketAddr>()`. Without it, `ip`
/// rules answer `500 Internal Server Error` (`missing_peer_address`).
///
/// ```
/// use ratelimit_http::{DefaultExtractor, ForwardedHeader, MissingUserPolicy};
///
/// let extractor = DefaultExtractor::new()
///     .trust_proxies(["10.0.0.0/8".parse()?, "fd00::/8".parse()?])
///     .forwarded_header(ForwardedHeader::XForwardedFor)
///     .ipv6_prefix(56)
///     .missing_user(MissingUserPolicy::InternalServerError);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct DefaultExtractor {
    resolver: ClientIpResolver,
    grouping: IpGrouping,
    missing_user: MissingUserPolicy,
}

impl DefaultExtractor {
    /// Trusts no proxy, groups IPv6 by `/64`, answers 401 for a missing user.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds trusted proxies: forwarding headers are read only from these peers.
    #[must_use]
    pub fn trust_proxies(mut self, proxies: impl IntoIterator<Item = IpNet>) -> Self {
        self.resolver = self.resolver.trust(proxies);
        self
    }

    /// Chooses the header the trusted proxies maintain (default `X-Forwarded-For`).
    #[must_use]
    pub fn forwarded_header(mut self, header: ForwardedHeader) -> Self {
        self.resolver = self.resolver.header(header);
        self
    }

    /// Groups IPv6 clients by their first `prefix` bits (default 64; above 128 means 128).
    #[must_use]
    pub fn ipv6_prefix(mut self, prefix: u8) -> Self {
        self.grouping = self.grouping.ipv6_prefix(prefix);
        self
    }

    /// Groups IPv4 clients by their first `prefix` bits (default 32; above 32 means 32).
    #[must_use]
    pub fn ipv4_prefix(mut self, prefix: u8) -> Self {
        self.grouping = self.grouping.ipv4_prefix(prefix);
        self
    }

    /// Chooses the answer to a user-scoped request without a user (default 401).
    #[must_use]
    pub fn missing_user(mut self, policy: MissingUserPolicy) -> Self {
        self.missing_user = policy;
        self
    }

    /// The client-address resolver.
    pub fn resolver(&self) -> &ClientIpResolver {
        &self.resolver
    }

    /// The client address of a request (after proxy trust), or `None` without a peer
    /// address.
    pub fn client_ip(&self, parts: &Parts) -> Option<IpAddr> {
        self.client_ip_of(&parts.headers, &parts.extensions)
    }

    /// [`client_ip`](Self::client_ip) of a request's headers and extensions.
    fn client_ip_of(&self, headers: &HeaderMap, extensions: &Extensions) -> Option<IpAddr> {
        let peer = extensions.get::<ConnectInfo<SocketAddr>>()?.0.ip();
        Some(self.resolver.resolve(peer, headers))
    }

    fn missing_user_rejection(&self, scope: RateLimitScope) -> Rejection {
        let what = match scope {
            RateLimitScope::UserProvider => "an authenticated user with an identity provider",
            _ => "an authenticated user",
        };
        match self.missing_user {
            MissingUserPolicy::InternalServerError => Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "missing_user",
                format!("this endpoint is limited per user but the request carries no {what}"),
            ),
            MissingUserPolicy::Unauthorized => Rejection::new(
                StatusCode::UNAUTHORIZED,
                "missing_user",
                format!("this endpoint needs {what}"),
            ),
        }
    }
}

impl DefaultExtractor {
    /// The bucket identifier of a client address: [`IpGrouping::identifier`]'s, with a
    /// single IPv4 address (the common case) written without the formatting machinery.
    #[cfg(test)]
    fn ip_identifier(&self, ip: IpAddr) -> String {
        let mut out = String::new();
        self.push_ip_identifier(ip, &mut out);
        out
    }

    /// Appends the bucket identifier of a client address to `out`.
    fn push_ip_identifier(&self, ip: IpAddr, out: &mut String) {
        let canonical = ip.to_canonical();
        match canonical {
            IpAddr::V4(v4) if self.grouping.prefix_for(canonical) == 32 => push_ipv4(out, v4),
            _ => out.push_str(&self.grouping.identifier(ip)),
        }
    }
}

/// Appends `ip` in dotted decimal, as its `Display` writes it.
fn push_ipv4(out: &mut String, ip: std::net::Ipv4Addr) {
    out.reserve(15);
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

impl IdentifierExtractor for DefaultExtractor {
    fn identify(&self, request: &IdentifyRequest<'_>) -> Result<String, Rejection> {
        let mut identifier = String::new();
        self.identify_into(request, &mut identifier)?;
        Ok(identifier)
    }

    fn identify_into(
        &self,
        request: &IdentifyRequest<'_>,
        identifier: &mut String,
    ) -> Result<(), Rejection> {
        self.identify_parts_into(
            &request.parts.headers,
            &request.parts.extensions,
            request.scope,
            identifier,
        )
    }
}

impl DefaultExtractor {
    /// [`identify_into`](IdentifierExtractor::identify_into) from a request's headers and
    /// extensions, all it reads: the layer asks this of its default extractor without taking
    /// the request apart.
    pub(crate) fn identify_parts_into(
        &self,
        headers: &HeaderMap,
        extensions: &Extensions,
        scope: RateLimitScope,
        identifier: &mut String,
    ) -> Result<(), Rejection> {
        identifier.clear();
        match scope {
            RateLimitScope::Ip => {
                let ip = self.client_ip_of(headers, extensions).ok_or_else(|| {
                    Rejection::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "missing_peer_address",
                        "the server cannot tell the client address of this request",
                    )
                })?;
                self.push_ip_identifier(ip, identifier);
            }
            RateLimitScope::User | RateLimitScope::UserProvider => {
                let user = extensions
                    .get::<AuthenticatedUser>()
                    .and_then(|user| user.identifier(scope))
                    .ok_or_else(|| self.missing_user_rejection(scope))?;
                *identifier = user;
            }
            _ => identifier.push_str(GLOBAL_IDENTIFIER),
        }
        Ok(())
    }
}

/// The identifier passed for global rules (the adapter ignores it; events show it).
pub(crate) const GLOBAL_IDENTIFIER: &str = "global";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifying_into_a_reused_buffer_gives_what_identify_gives() {
        #[derive(Debug)]
        struct Fixed;
        impl IdentifierExtractor for Fixed {
            fn identify(&self, _: &IdentifyRequest<'_>) -> Result<String, Rejection> {
                Ok("fixed".to_owned())
            }
        }
        let mut request = http::Request::new(());
        request
            .extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([198, 51, 100, 7], 4000))));
        request
            .extensions_mut()
            .insert(AuthenticatedUser::new("4%2@x").with_provider("github"));
        let (parts, ()) = request.into_parts();
        let extractors: [&dyn IdentifierExtractor; 3] = [
            &DefaultExtractor::new(),
            &DefaultExtractor::new().ipv4_prefix(24),
            &Fixed,
        ];
        for extractor in extractors {
            let mut buffer = String::new();
            for scope in [
                RateLimitScope::Ip,
                RateLimitScope::User,
                RateLimitScope::UserProvider,
                RateLimitScope::Ip,
            ] {
                let request = IdentifyRequest {
                    parts: &parts,
                    endpoint: "GET /x",
                    scope,
                };
                // The layer hands over an empty buffer that still has its allocation.
                buffer.clear();
                extractor.identify_into(&request, &mut buffer).unwrap();
                assert_eq!(buffer, extractor.identify(&request).unwrap(), "{scope:?}");
            }
        }
    }

    #[test]
    fn the_fast_ip_identifier_is_the_grouping_s() {
        let extractors = [
            DefaultExtractor::new(),
            DefaultExtractor::new().ipv4_prefix(24),
            DefaultExtractor::new().ipv6_prefix(128),
        ];
        let mut addresses: Vec<IpAddr> = Vec::new();
        for a in [0u8, 1, 9, 10, 99, 100, 127, 199, 200, 255] {
            for b in [0u8, 7, 10, 42, 100, 255] {
                addresses.push(IpAddr::from([a, b, 255 - b, a / 2]));
            }
        }
        for text in [
            "::1",
            "2001:db8::7",
            "::ffff:10.1.2.3",
            "::ffff:255.0.9.100",
            "fe80::1",
        ] {
            addresses.push(text.parse().unwrap());
        }
        for extractor in &extractors {
            for &ip in &addresses {
                assert_eq!(
                    extractor.ip_identifier(ip),
                    extractor.grouping.identifier(ip),
                    "{ip}"
                );
            }
        }
    }

    fn parts(peer: Option<&str>, xff: Option<&str>, user: Option<AuthenticatedUser>) -> Parts {
        let mut request = http::Request::new(());
        if let Some(peer) = peer {
            let addr: SocketAddr = peer.parse().unwrap();
            request.extensions_mut().insert(ConnectInfo(addr));
        }
        if let Some(xff) = xff {
            request
                .headers_mut()
                .insert("x-forwarded-for", xff.parse().unwrap());
        }
        if let Some(user) = user {
            request.extensions_mut().insert(user);
        }
        request.into_parts().0
    }

    fn identify(
        extractor: &DefaultExtractor,
        scope: RateLimitScope,
        parts: &Parts,
    ) -> Result<String, Rejection> {
        extractor.identify(&IdentifyRequest {
            parts,
            endpoint: "GET /x",
            scope,
        })
    }

    #[test]
    fn ip_scope_uses_the_peer_unless_a_trusted_proxy_forwarded() {
        let plain = DefaultExtractor::new();
        let trusting = DefaultExtractor::new().trust_proxies(["127.0.0.1".parse().unwrap()]);
        let via_proxy = parts(Some("127.0.0.1:4000"), Some("203.0.113.5"), None);
        assert_eq!(
            identify(&plain, RateLimitScope::Ip, &via_proxy).unwrap(),
            "127.0.0.1"
        );
        assert_eq!(
            identify(&trusting, RateLimitScope::Ip, &via_proxy).unwrap(),
            "203.0.113.5"
        );
        let v6 = parts(Some("[2001:db8::1:2]:4000"), None, None);
        assert_eq!(
            identify(&plain, RateLimitScope::Ip, &v6).unwrap(),
            "2001:db8::/64"
        );
        let mapped = parts(Some("[::ffff:198.51.100.7]:4000"), None, None);
        assert_eq!(
            identify(&plain, RateLimitScope::Ip, &mapped).unwrap(),
            "198.51.100.7"
        );
        assert_eq!(
            identify(&plain.clone().ipv6_prefix(128), RateLimitScope::Ip, &v6).unwrap(),
            "2001:db8::1:2"
        );
    }

    /// The identifier the layer writes is the one the admin CLI computes from any spelling of
    /// the address an operator types (both use the domain's `IpGrouping`).
    #[test]
    fn the_layer_and_the_cli_normalisation_agree() {
        let plain = DefaultExtractor::new();
        let cli = ratelimit_adapter::domain::IpGrouping::default();
        for (peer, typed) in [
            ("[::1]:4000", "::1"),
            ("[::1]:4000", "[0:0::1]"),
            ("[2001:db8::1:2]:4000", "2001:DB8::1:2"),
            ("[::ffff:198.51.100.7]:4000", "198.51.100.7"),
            ("[::ffff:198.51.100.7]:4000", "::ffff:198.51.100.7"),
            ("198.51.100.7:4000", "[::ffff:198.51.100.7]"),
            ("[fe80::1]:4000", "fe80::1%eth0"),
        ] {
            let layer = identify(&plain, RateLimitScope::Ip, &parts(Some(peer), None, None));
            assert_eq!(layer.ok(), cli.normalize(typed).ok(), "{peer} / {typed}");
        }
        let coarse = DefaultExtractor::new().ipv6_prefix(48);
        let layer = identify(
            &coarse,
            RateLimitScope::Ip,
            &parts(Some("[2001:db8:1:2::9]:1"), None, None),
        );
        assert_eq!(
            layer.ok(),
            cli.ipv6_prefix(48).normalize("2001:db8:1:ffff::1").ok()
        );
    }

    #[test]
    fn ip_scope_without_peer_is_a_500() {
        let err = identify(
            &DefaultExtractor::new(),
            RateLimitScope::Ip,
            &parts(None, None, None),
        )
        .unwrap_err();
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(err.code(), "missing_peer_address");
    }

    #[test]
    fn user_scopes_read_the_extension() {
        let extractor = DefaultExtractor::new();
        let user = AuthenticatedUser::new("a@b%c").with_provider("github");
        let p = parts(None, None, Some(user));
        assert_eq!(
            identify(&extractor, RateLimitScope::User, &p).unwrap(),
            "a@b%c"
        );
        assert_eq!(
            identify(&extractor, RateLimitScope::UserProvider, &p).unwrap(),
            "a%40b%25c@github"
        );
        assert_eq!(
            identify(&extractor, RateLimitScope::Global, &p).unwrap(),
            "global"
        );
    }

    #[test]
    fn missing_user_follows_the_policy() {
        let no_user = parts(Some("127.0.0.1:1"), None, None);
        let no_provider = parts(None, None, Some(AuthenticatedUser::new("42")));
        let empty = parts(None, None, Some(AuthenticatedUser::new("")));
        let default = DefaultExtractor::new();
        for (scope, p) in [
            (RateLimitScope::User, &no_user),
            (RateLimitScope::User, &empty),
            (RateLimitScope::UserProvider, &no_user),
            (RateLimitScope::UserProvider, &no_provider),
        ] {
            let err = identify(&default, scope, p).unwrap_err();
            assert_eq!(
                (err.status(), err.code()),
                (StatusCode::UNAUTHORIZED, "missing_user")
            );
        }
        let strict = DefaultExtractor::new().missing_user(MissingUserPolicy::InternalServerError);
        let err = identify(&strict, RateLimitScope::User, &no_user).unwrap_err();
        assert_eq!(err.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(err.to_string().contains("missing_user"), "{err}");
    }
}
