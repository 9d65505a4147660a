//! Finding the token in an HTTP upgrade request: `Authorization: Bearer`,
//! then the `token` query parameter, then a named cookie.

use http::header::{AUTHORIZATION, COOKIE};
use http::request::Parts;

/// The token a request carries, looked for in order:
/// 1. `Authorization: Bearer <token>` (scheme case-insensitive);
/// 2. the `token` query parameter, percent-decoded (browsers cannot set
///    headers on a WebSocket);
/// 3. the cookie `cookie_name`, when given.
///
/// Empty values count as absent, so the next source is tried.
pub fn token_from_request(parts: &Parts, cookie_name: Option<&str>) -> Option<String> {
    bearer(parts)
        .or_else(|| query_param(parts.uri.query()?, "token"))
        .or_else(|| cookie(parts, cookie_name?))
}

fn bearer(parts: &Parts) -> Option<String> {
    parts.headers.get_all(AUTHORIZATION).iter().find_map(|v| {
        let v = v.to_str().ok()?.trim();
        let (scheme, token) = v.split_once(' ')?;
        let token = token.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
    })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? != name {
            return None;
        }
        percent_decode(v).filter(|v| !v.is_empty())
    })
}

fn cookie(parts: &Parts, name: &str) -> Option<String> {
    parts.headers.get_all(COOKIE).iter().find_map(|v| {
        v.to_str().ok()?.split(';').find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            let v = v.trim().trim_matches('"');
            (k.trim() == name && !v.is_empty()).then(|| v.to_owned())
        })
    })
}

/// `application/x-www-form-urlencoded` decoding: `%XX` escapes and `+` as a
/// space. `None` for a broken escape or bytes that are not UTF-8. Shared by
/// every query the edge reads, so they all decode alike.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn bearer_header() {
        let p = parts("/ws", &[("authorization", "Bearer abc.def.ghi")]);
        assert_eq!(token_from_request(&p, None).as_deref(), Some("abc.def.ghi"));
        let p = parts("/ws", &[("authorization", "bearer   xyz ")]);
        assert_eq!(token_from_request(&p, None).as_deref(), Some("xyz"));
        let p = parts("/ws", &[("authorization", "Basic dXNlcjpwdw==")]);
        assert_eq!(token_from_request(&p, None), None);
        let p = parts("/ws", &[("authorization", "Bearer ")]);
        assert_eq!(token_from_request(&p, None), None);
    }

    #[test]
    fn query_parameter_is_percent_decoded() {
        let p = parts("/ws?room=a&token=ab%2Ecd%2Eef&x=1", &[]);
        assert_eq!(token_from_request(&p, None).as_deref(), Some("ab.cd.ef"));
        let p = parts("/ws?tokens=no&token=", &[]);
        assert_eq!(token_from_request(&p, None), None);
        let p = parts("/ws?token=bad%zz", &[]);
        assert_eq!(token_from_request(&p, None), None);
        assert_eq!(percent_decode("a+b%20c%C3%BC").as_deref(), Some("a b cü"));
        assert_eq!(percent_decode("%4"), None);
    }

    #[test]
    fn named_cookie() {
        let p = parts("/ws", &[("cookie", "theme=dark; rc_token=t.o.k; other=1")]);
        assert_eq!(
            token_from_request(&p, Some("rc_token")).as_deref(),
            Some("t.o.k")
        );
        assert_eq!(token_from_request(&p, Some("missing")), None);
        assert_eq!(
            token_from_request(&p, None),
            None,
            "cookies only when named"
        );
    }

    #[test]
    fn sources_are_tried_in_order() {
        let all = [
            ("authorization", "Bearer from-header"),
            ("cookie", "c=from-cookie"),
        ];
        let p = parts("/ws?token=from-query", &all);
        assert_eq!(
            token_from_request(&p, Some("c")).as_deref(),
            Some("from-header")
        );
        let p = parts("/ws?token=from-query", &all[1..]);
        assert_eq!(
            token_from_request(&p, Some("c")).as_deref(),
            Some("from-query")
        );
        let p = parts("/ws", &all[1..]);
        assert_eq!(
            token_from_request(&p, Some("c")).as_deref(),
            Some("from-cookie")
        );
    }
}
