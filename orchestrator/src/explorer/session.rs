//! Who is looking, and whether a POST is theirs. With tokens on, the token comes from the
//! `sagad_token` cookie (set by `/login`: `HttpOnly`, so no script reads it, `SameSite=Strict`,
//! so no other site's page sends it) or an `authorization: Bearer` header, and gives the role
//! it gives over gRPC. Every form carries the value of the `sagad_csrf` cookie, which a foreign
//! page can neither read nor set: a POST without it, or from another origin, is refused.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use subtle::ConstantTimeEq as _;

use super::{Explorer, PageError, form_value, html, no_store, pages, pairs};
use crate::auth::{Authenticator, Role};

const TOKEN_COOKIE: &str = "sagad_token";
const CSRF_COOKIE: &str = "sagad_csrf";
/// How long a browser keeps the token: a working day.
const TOKEN_COOKIE_SECONDS: u32 = 12 * 60 * 60;

/// The visitor of a page, as its token (or, with tokens off, its address) says.
pub(crate) struct Visitor {
    /// For the history of what it changes: the token's name, else the visitor's address.
    pub(crate) who: String,
    /// Whose share of the limits it takes: the token's name, else the IP address.
    pub(crate) limited_as: String,
    pub(crate) role: Role,
    /// The token's name; `None` with tokens off.
    pub(crate) name: Option<String>,
    /// What this visitor's forms must carry back.
    pub(crate) csrf: String,
    /// The csrf value is new: the response sets its cookie, and no form could carry it yet.
    new_csrf: bool,
}

impl FromRequestParts<Explorer> for Visitor {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, explorer: &Explorer) -> Result<Self, PageError> {
        let (csrf, new_csrf) = csrf_of(&parts.headers)?;
        if !explorer.auth.is_on() {
            let peer = parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|info| info.0);
            return Ok(Self {
                who: match peer {
                    Some(address) => format!("explorer at {address}"),
                    None => "explorer".to_owned(),
                },
                limited_as: peer.map_or_else(|| "explorer".to_owned(), |a| a.ip().to_string()),
                role: Role::Admin,
                name: None,
                csrf,
                new_csrf,
            });
        }
        let token = bearer(&parts.headers).or_else(|| cookie(&parts.headers, TOKEN_COOKIE));
        let Some(caller) = token.and_then(|token| explorer.auth.caller_of(token)) else {
            if parts.method == Method::GET && !parts.uri.path().ends_with("/live") {
                let next = parts
                    .uri
                    .path_and_query()
                    .map_or("/", |target| target.as_str())
                    .to_owned();
                return Err(PageError::Login { next });
            }
            return Err(PageError::Unauthenticated(
                "a token is required: sign in at /login".to_owned(),
            ));
        };
        Ok(Self {
            who: caller.name.clone(),
            limited_as: caller.name.clone(),
            role: caller.role,
            name: Some(caller.name),
            csrf,
            new_csrf,
        })
    }
}

impl Visitor {
    /// Whether the visitor may `what`, which needs `needed`.
    pub(crate) fn require(&self, needed: Role, what: &str) -> Result<(), PageError> {
        if self.may(needed) {
            return Ok(());
        }
        Err(PageError::Forbidden(format!(
            "{} has the role {}; to {what} needs {}",
            self.name.as_deref().unwrap_or("this visitor"),
            self.role.name(),
            needed.name()
        )))
    }

    pub(crate) fn may(&self, needed: Role) -> bool {
        self.role >= needed
    }

    /// Sets the csrf cookie when the visitor had none.
    pub(crate) fn set_cookies(&self, headers: &mut HeaderMap) {
        if self.new_csrf {
            set_cookie(headers, &csrf_cookie(&self.csrf));
        }
    }
}

/// Refuses a request the browser marks as coming from another site or origin.
fn same_origin(headers: &HeaderMap) -> Result<(), PageError> {
    let refused = || PageError::Forbidden("a request from another site is refused".to_owned());
    if let Some(site) = headers.get("sec-fetch-site")
        && site.as_bytes() != b"same-origin"
    {
        return Err(refused());
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .ok_or_else(refused)?;
        let origin = origin.to_str().map_err(|_| refused())?;
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .ok_or_else(refused)?;
        if !origin_host.eq_ignore_ascii_case(host) {
            return Err(refused());
        }
    }
    Ok(())
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

fn is_csrf(value: &str) -> bool {
    value.len() == 64 && value.bytes().all(|byte| byte.is_ascii_hexdigit())
}

fn fresh_csrf() -> Result<String, PageError> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|error| PageError::Unavailable(format!("no randomness: {error}")))?;
    Ok(hex::encode(bytes))
}

/// The csrf value of the visitor's cookie, or a fresh one (`true`) for a visitor without.
fn csrf_of(headers: &HeaderMap) -> Result<(String, bool), PageError> {
    match cookie(headers, CSRF_COOKIE).filter(|value| is_csrf(value)) {
        Some(csrf) => Ok((csrf.to_owned(), false)),
        None => Ok((fresh_csrf()?, true)),
    }
}

fn csrf_cookie(value: &str) -> String {
    format!("{CSRF_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict")
}

fn set_cookie(headers: &mut HeaderMap, cookie: &str) {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        headers.append(header::SET_COOKIE, value);
    }
}

/// Characters a cookie value may hold unquoted; a token with others cannot be kept in one.
fn cookie_safe(token: &str) -> bool {
    token
        .bytes()
        .all(|byte| byte.is_ascii_graphic() && !matches!(byte, b'"' | b',' | b';' | b'\\'))
}

/// Where to go after signing in: a path of this site, else the overview.
pub(crate) fn next_target(query: Option<&str>) -> String {
    local_path(form_value(
        &pairs(query.unwrap_or_default().as_bytes()),
        "next",
    ))
}

fn local_path(target: &str) -> String {
    if target.starts_with('/') && !target.starts_with("//") && !target.contains('\\') {
        target.to_owned()
    } else {
        "/".to_owned()
    }
}

/// The login page; with tokens off there is nothing to sign in to, and it sends the visitor on.
pub(crate) fn login_form(
    auth: &Authenticator,
    headers: &HeaderMap,
    next: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    if !auth.is_on() {
        return Redirect::to(next).into_response();
    }
    let (csrf, new_csrf) = match csrf_of(headers) {
        Ok(csrf) => csrf,
        Err(error) => return error.into_response(),
    };
    let mut response = (status, html(pages::login(next, &csrf, error))).into_response();
    no_store(response.headers_mut());
    if new_csrf {
        set_cookie(response.headers_mut(), &csrf_cookie(&csrf));
    }
    response
}

/// Checks the token of the login form and keeps it in the cookie.
pub(crate) fn log_in(
    auth: &Authenticator,
    headers: &HeaderMap,
    form: &[(String, String)],
) -> Response {
    let next = local_path(form_value(form, "next"));
    if let Err(error) = check_post(headers, form_value(form, "csrf")) {
        return error.into_response();
    }
    let token = form_value(form, "token");
    if !auth.is_on() {
        return Redirect::to(&next).into_response();
    }
    if !cookie_safe(token) {
        return login_form(
            auth,
            headers,
            &next,
            Some("this token holds characters a cookie cannot keep"),
            StatusCode::BAD_REQUEST,
        );
    }
    let Some(caller) = auth.caller_of(token) else {
        return login_form(
            auth,
            headers,
            &next,
            Some("this token is not known"),
            StatusCode::UNAUTHORIZED,
        );
    };
    tracing::info!(token = %caller.name, role = caller.role.name(), "signed in to the explorer");
    let mut response = Redirect::to(&next).into_response();
    set_cookie(
        response.headers_mut(),
        &format!(
            "{TOKEN_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={TOKEN_COOKIE_SECONDS}"
        ),
    );
    response
}

/// Forgets the token the cookie keeps.
pub(crate) fn log_out(headers: &HeaderMap, form: &[(String, String)]) -> Response {
    if let Err(error) = check_post(headers, form_value(form, "csrf")) {
        return error.into_response();
    }
    let mut response = Redirect::to("/login").into_response();
    set_cookie(
        response.headers_mut(),
        &format!("{TOKEN_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

/// A POST from one of this explorer's own pages: the browser says it comes from this origin
/// (or says nothing), and its form carries the value of the csrf cookie the browser already
/// had, which a page of another site can neither read nor set.
pub(crate) fn check_post(headers: &HeaderMap, presented: &str) -> Result<(), PageError> {
    same_origin(headers)?;
    let expected = cookie(headers, CSRF_COOKIE).filter(|value| is_csrf(value));
    if expected.is_some_and(|expected| bool::from(presented.as_bytes().ct_eq(expected.as_bytes())))
    {
        Ok(())
    } else {
        Err(PageError::Forbidden(
            "this form did not come from this explorer's page (or the page is stale): open the \
             page again"
                .to_owned(),
        ))
    }
}

#[cfg(test)]
impl Visitor {
    /// A visitor of `role`, signed in as `name`, whose csrf cookie is known.
    pub(crate) fn signed_in(role: Role, name: &str) -> Self {
        Self {
            who: name.to_owned(),
            limited_as: name.to_owned(),
            role,
            name: Some(name.to_owned()),
            csrf: "ab".repeat(32),
            new_csrf: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            if let (Ok(name), Ok(value)) = (
                header::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                headers.append(name, value);
            }
        }
        headers
    }

    #[test]
    fn a_cookie_is_found_by_its_name_among_others() {
        let sent = headers(&[("cookie", "a=1; sagad_token=abc; b=2"), ("cookie", "c=3")]);
        assert_eq!(cookie(&sent, TOKEN_COOKIE), Some("abc"));
        assert_eq!(cookie(&sent, "c"), Some("3"));
        assert_eq!(cookie(&sent, CSRF_COOKIE), None);
        assert_eq!(
            cookie(&headers(&[("cookie", "sagad_token=")]), TOKEN_COOKIE),
            None
        );
    }

    #[test]
    fn only_a_bearer_authorization_gives_a_token() {
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer t0k")])),
            Some("t0k")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "bearer  t0k ")])),
            Some("t0k")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "Basic dXNlcg==")])),
            None
        );
        assert_eq!(bearer(&headers(&[("authorization", "Bearer ")])), None);
    }

    #[test]
    fn a_post_from_another_origin_or_site_is_refused() {
        let host = ("host", "127.0.0.1:9464");
        assert!(same_origin(&headers(&[host])).is_ok());
        assert!(same_origin(&headers(&[host, ("origin", "http://127.0.0.1:9464")])).is_ok());
        assert!(same_origin(&headers(&[host, ("sec-fetch-site", "same-origin")])).is_ok());
        for foreign in [
            ("origin", "http://attacker.example"),
            ("origin", "http://127.0.0.1:9465"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-site"),
        ] {
            assert!(
                matches!(
                    same_origin(&headers(&[host, foreign])),
                    Err(PageError::Forbidden(_))
                ),
                "{foreign:?}"
            );
        }
        assert!(same_origin(&headers(&[("origin", "http://127.0.0.1:9464")])).is_err());
    }

    #[test]
    fn a_form_must_carry_the_csrf_value_of_a_cookie_the_browser_already_had() {
        let value = "ab".repeat(32);
        let cookie = format!("sagad_csrf={value}");
        let had = headers(&[("cookie", &cookie)]);
        assert!(check_post(&had, &value).is_ok());
        assert!(check_post(&had, &"0".repeat(64)).is_err());
        assert!(check_post(&had, "").is_err());
        // A browser without the cookie (its value would be made now) cannot carry it yet.
        assert!(check_post(&HeaderMap::new(), &value).is_err());
        // Nor is a cookie of another shape taken.
        assert!(check_post(&headers(&[("cookie", "sagad_csrf=ab")]), "ab").is_err());
    }

    #[test]
    fn after_signing_in_the_browser_goes_only_to_a_path_of_this_site() {
        assert_eq!(
            next_target(Some("next=%2Fsagas%3Fstatus%3DFAILED")),
            "/sagas?status=FAILED"
        );
        for elsewhere in [
            "next=%2F%2Fattacker.example",
            "next=http://attacker.example",
            "next=%2F%5Cx",
            "",
        ] {
            assert_eq!(next_target(Some(elsewhere)), "/", "{elsewhere}");
        }
        assert_eq!(next_target(None), "/");
    }

    #[test]
    fn roles_allow_what_they_allow() {
        let reader = Visitor::signed_in(Role::Reader, "viewer");
        assert!(reader.require(Role::Reader, "look").is_ok());
        assert!(
            matches!(reader.require(Role::Operator, "cancel a saga"), Err(PageError::Forbidden(m)) if m.contains("viewer"))
        );
        let operator = Visitor::signed_in(Role::Operator, "ops");
        assert!(operator.may(Role::Operator) && !operator.may(Role::Admin));
    }

    #[test]
    fn a_token_a_cookie_cannot_hold_is_told_apart() {
        assert!(cookie_safe("abcDEF-_.~0123"));
        for bad in ["a b", "a;b", "a,b", "a\"b", "a\\b", "é"] {
            assert!(!cookie_safe(bad), "{bad}");
        }
    }
}
