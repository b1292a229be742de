//! The provider dashboard, served under `/dashboard`: one HTML page, a
//! stylesheet and a script, compiled into the binary (`query/dashboard/`),
//! no build step, nothing fetched from elsewhere. The script draws every
//! page from the query API's JSON (the same endpoints an integration
//! reads, documented in `/openapi.json`) with hand-written SVG charts.
//!
//! The browser signs in through [`session`]. The pages are strict about
//! what they load (`Content-Security-Policy` allows this origin only, no
//! inline script) and may not be framed.

pub mod session;

use warp::http::{HeaderValue, StatusCode};
use warp::reply::Response;
use warp::Reply;

const INDEX: &str = include_str!("../../dashboard/index.html");
const SCRIPT: &str = include_str!("../../dashboard/app.js");
const STYLE: &str = include_str!("../../dashboard/app.css");
const ICON: &str = include_str!("../../dashboard/icon.svg");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The file at `path` under `/dashboard/` ("" is the page).
pub fn asset(path: &str) -> Option<(&'static str, &'static str)> {
    Some(match path {
        "" | "index.html" => ("text/html; charset=utf-8", INDEX),
        "app.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "app.css" => ("text/css; charset=utf-8", STYLE),
        "icon.svg" => ("image/svg+xml", ICON),
        _ => return None,
    })
}

/// The response serving `path`, or `None` for an unknown file.
pub fn serve(path: &str) -> Option<Response> {
    let (content_type, body) = asset(path)?;
    let mut response = warp::reply::with_status(body, StatusCode::OK).into_response();
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: &'static str| {
        headers.insert(name, HeaderValue::from_static(value));
    };
    set("content-type", content_type);
    set("content-security-policy", CSP);
    set("x-content-type-options", "nosniff");
    set("x-frame-options", "DENY");
    set("referrer-policy", "no-referrer");
    // Assets change with the binary; revalidating is cheap at this size.
    set("cache-control", "no-cache");
    Some(response)
}

/// `/dashboard` without the slash: the page's relative links need it.
pub fn redirect_to_index() -> Response {
    let mut response = StatusCode::PERMANENT_REDIRECT.into_response();
    response
        .headers_mut()
        .insert("location", HeaderValue::from_static("/dashboard/"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_page_names_is_served() {
        for name in ["app.js", "app.css", "icon.svg"] {
            assert!(INDEX.contains(name), "{name}");
            assert!(asset(name).is_some(), "{name}");
        }
        assert!(asset("../Cargo.toml").is_none());
        let r = serve("").unwrap();
        assert_eq!(r.headers()["content-security-policy"], CSP);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_runs_no_inline_script() {
        assert!(!INDEX.contains("://") && !STYLE.contains("://"));
        // The only absolute URL in the script is SVG's namespace name.
        let svg_ns = "http://www.w3.org/2000/svg";
        assert_eq!(
            SCRIPT.matches("://").count(),
            SCRIPT.matches(svg_ns).count()
        );
        assert!(!INDEX.contains("<script>"), "inline script");
        let handler = INDEX.split(" on").skip(1).any(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(!handler, "inline handlers");
    }
}
