//! The dashboard's session: the browser signs in with the same JWT as the
//! API, once, and then holds it in a cookie it cannot read.
//!
//! `POST /dashboard/session` takes `{"token": "<jwt>"}`, verifies it like any
//! request and answers with `Set-Cookie: usage_session=<jwt>; HttpOnly;
//! SameSite=Strict; Path=/` (and `Secure` when the service is served over
//! HTTPS, `USAGE_DASHBOARD_SECURE_COOKIE`), for at most the token's
//! lifetime and `USAGE_DASHBOARD_SESSION_HOURS`. The token never appears in a
//! URL, in the page or in a script's reach. `DELETE /dashboard/session`
//! signs out; `GET /dashboard/session` says who is signed in.
//!
//! Cross-site request forgery: a request that authenticates by the cookie
//! and changes something (sign-in, sign-out, an export, an erasure) must
//! come from this origin: `Sec-Fetch-Site: same-origin` (what browsers send)
//! or, from browsers that do not send it, an `Origin` naming this host.
//! SameSite=Strict already keeps the cookie off cross-site requests; this is
//! the second lock. Reads with the cookie are safe methods and change
//! nothing. A request with an `Authorization` header (an integration) is
//! not a browser session and is not checked.

use warp::http::HeaderMap;

pub const COOKIE: &str = "usage_session";

/// How a request proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials<'a> {
    /// `Authorization: Bearer ...`.
    Header(&'a str),
    /// The dashboard's session cookie: the JWT alone.
    Cookie(&'a str),
    None,
}

pub fn credentials(headers: &HeaderMap) -> Credentials<'_> {
    if let Some(auth) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        return Credentials::Header(auth);
    }
    match session_cookie(headers) {
        Some(token) => Credentials::Cookie(token),
        None => Credentials::None,
    }
}

/// The session cookie's value, if the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all("cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim())
        .filter(|v| !v.is_empty())
}

/// Whether a browser request comes from this service's own pages.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match header("sec-fetch-site") {
        Some(site) => site == "same-origin",
        None => match (header("origin"), header("host")) {
            (Some(origin), Some(host)) => origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
            _ => false,
        },
    }
}

/// The `Set-Cookie` value that opens a session for `max_age_secs`.
pub fn open(token: &str, max_age_secs: i64, secure: bool) -> String {
    format!(
        "{COOKIE}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Strict{}",
        max_age_secs.max(0),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends the session.
pub fn close(secure: bool) -> String {
    open("", 0, secure)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_header_wins_over_the_cookie() {
        let h = headers(&[
            ("cookie", "theme=dark; usage_session=abc.def.ghi"),
            ("authorization", "Bearer x"),
        ]);
        assert_eq!(credentials(&h), Credentials::Header("Bearer x"));
        let h = headers(&[("cookie", "theme=dark; usage_session=abc.def.ghi")]);
        assert_eq!(credentials(&h), Credentials::Cookie("abc.def.ghi"));
        let h = headers(&[("cookie", "usage_session=; other=1")]);
        assert_eq!(credentials(&h), Credentials::None);
        assert_eq!(credentials(&HeaderMap::new()), Credentials::None);
    }

    #[test]
    fn only_this_origin_may_act_with_the_cookie() {
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        for site in ["cross-site", "same-site", "none"] {
            assert!(
                !same_origin(&headers(&[("sec-fetch-site", site)])),
                "{site}"
            );
        }
        let host = ("host", "127.0.0.1:8081");
        assert!(same_origin(&headers(&[
            ("origin", "http://127.0.0.1:8081"),
            host
        ])));
        assert!(!same_origin(&headers(&[
            ("origin", "http://evil.example"),
            host
        ])));
        assert!(!same_origin(&headers(&[("origin", "null"), host])));
        assert!(!same_origin(&headers(&[host])));
    }

    #[test]
    fn the_cookie_is_http_only_and_strict() {
        assert_eq!(
            open("a.b.c", 3600, true),
            "usage_session=a.b.c; Path=/; Max-Age=3600; HttpOnly; SameSite=Strict; Secure"
        );
        assert_eq!(
            close(false),
            "usage_session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
        );
    }
}
