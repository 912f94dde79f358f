//! Who may do what: bearer tokens with roles, read from a TOML file of their SHA-256 hashes
//! (so the file holds nothing a reader of it could present) and re-read on SIGHUP. The gRPC
//! edge asks [`Authenticator::authorize`] before anything else; no token ever reaches a log.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// What a token allows; each role may do what the ones below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// GetSaga, ListSagas, WatchSaga.
    Reader,
    /// Also StartSaga and CancelSaga.
    Operator,
    /// Also RetrySaga.
    Admin,
}

impl Role {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "reader" => Some(Self::Reader),
            "operator" => Some(Self::Operator),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// The name the token file and the errors use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

/// Who a request comes from, once its token is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name: what the audit events record.
    pub name: String,
    pub role: Role,
}

/// The hex SHA-256 of a token: what the token file stores.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenLine>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenLine {
    name: String,
    role: String,
    sha256: String,
}

struct Token {
    caller: Caller,
    sha256: [u8; 32],
}

/// The tokens of one reading of the file.
struct TokenTable {
    tokens: Vec<Token>,
}

impl TokenTable {
    /// Reads and checks the file; an error names the file and the field.
    fn load(path: &Path) -> Result<Self, String> {
        let at = path.display();
        let text = std::fs::read_to_string(path).map_err(|error| format!("{at}: {error}"))?;
        let file: TokenFile =
            toml::from_str(&text).map_err(|error| format!("{at}: {}", error.message().trim()))?;
        let mut names = BTreeSet::new();
        let mut tokens = Vec::with_capacity(file.token.len());
        for (index, line) in file.token.into_iter().enumerate() {
            let field = |name: &str| format!("{at}: token[{index}].{name}");
            if line.name.trim().is_empty() {
                return Err(format!("{} is empty", field("name")));
            }
            if !names.insert(line.name.clone()) {
                return Err(format!("{}: {:?} is given twice", field("name"), line.name));
            }
            let role = Role::parse(&line.role).ok_or_else(|| {
                format!(
                    "{}: {:?} is not reader, operator or admin",
                    field("role"),
                    line.role
                )
            })?;
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(line.sha256.trim(), &mut sha256).map_err(|_| {
                format!(
                    "{}: expected the token's SHA-256 as 64 hex digits",
                    field("sha256")
                )
            })?;
            tokens.push(Token {
                caller: Caller {
                    name: line.name,
                    role,
                },
                sha256,
            });
        }
        Ok(Self { tokens })
    }

    /// The token's owner, found by comparing its hash with every entry in constant time: how
    /// long this takes says nothing about how close a guess came.
    fn find(&self, token: &str) -> Option<&Caller> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.tokens {
            if bool::from(entry.sha256.ct_eq(&presented)) {
                found = Some(&entry.caller);
            }
        }
        found
    }
}

/// The tokens in force, shared by every request; off when sagad runs without a token file.
#[derive(Clone)]
pub struct Authenticator {
    file: Option<(PathBuf, Arc<RwLock<Arc<TokenTable>>>)>,
}

impl Authenticator {
    /// Every caller may do everything: no token file.
    pub fn off() -> Self {
        Self { file: None }
    }

    /// Tokens from `path`; an error names the file and the field.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let table = TokenTable::load(path)?;
        Ok(Self {
            file: Some((path.to_owned(), Arc::new(RwLock::new(Arc::new(table))))),
        })
    }

    /// Whether requests need a token.
    pub fn is_on(&self) -> bool {
        self.file.is_some()
    }

    /// Reads the file again; on an error the tokens in force stay. Returns how many tokens
    /// are in force.
    pub fn reload(&self) -> Result<usize, String> {
        let Some((path, table)) = &self.file else {
            return Ok(0);
        };
        let fresh = Arc::new(TokenTable::load(path)?);
        let count = fresh.tokens.len();
        match table.write() {
            Ok(mut slot) => *slot = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        Ok(count)
    }

    /// Checks the request's `authorization: Bearer <token>` against `needed`. With tokens
    /// off, `Ok(None)`: anyone may. No or an unknown token: `UNAUTHENTICATED`; a role too low:
    /// `PERMISSION_DENIED`.
    pub fn authorize(
        &self,
        metadata: &MetadataMap,
        needed: Role,
    ) -> Result<Option<Caller>, Status> {
        let caller = self.authenticate(metadata)?;
        if let Some(caller) = &caller {
            permit(caller, needed)?;
        }
        Ok(caller)
    }

    /// Who the request's token belongs to; with tokens off, `Ok(None)`. No or an unknown
    /// token: `UNAUTHENTICATED`. Run before the request's message is even decoded.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Option<Caller>, Status> {
        if self.file.is_none() {
            return Ok(None);
        }
        let token = bearer_token(metadata)?;
        let caller = self
            .caller_of(token)
            .ok_or_else(|| Status::unauthenticated("the bearer token is not known"))?;
        Ok(Some(caller))
    }

    /// Whose token this is; `None` for an unknown token, or with tokens off. The explorer
    /// asks this of the token its cookie carries.
    pub fn caller_of(&self, token: &str) -> Option<Caller> {
        let (_, table) = self.file.as_ref()?;
        let table = match table.read() {
            Ok(table) => Arc::clone(&table),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        };
        table.find(token).cloned()
    }
}

/// Whether `caller`'s role allows what needs `needed`: else `PERMISSION_DENIED`.
pub fn permit(caller: &Caller, needed: Role) -> Result<(), Status> {
    if caller.role < needed {
        return Err(Status::permission_denied(format!(
            "token {:?} has the role {}; this needs {}",
            caller.name,
            caller.role.name(),
            needed.name()
        )));
    }
    Ok(())
}

fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata.get("authorization").ok_or_else(|| {
        Status::unauthenticated("a bearer token is required (authorization: Bearer <token>)")
    })?;
    let text = value
        .to_str()
        .map_err(|_| Status::unauthenticated("the authorization header is not text"))?;
    let (scheme, token) = text
        .split_once(' ')
        .ok_or_else(|| Status::unauthenticated("expected authorization: Bearer <token>"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(Status::unauthenticated(
            "expected authorization: Bearer <token>",
        ));
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// A token file of the test's own under the system's temporary folder, removed when
    /// dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file_with(text: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("sagad-tokens-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&path, text).unwrap_or_else(|error| panic!("{error}"));
        Scratch(path)
    }

    fn request_with(token: Option<&str>) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .unwrap_or_else(|error| panic!("{error:?}"));
            metadata.insert("authorization", value);
        }
        metadata
    }

    fn line(name: &str, role: &str, token: &str) -> String {
        format!(
            "[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n",
            token_hash(token)
        )
    }

    #[test]
    fn each_role_may_do_what_the_ones_below_it_may() -> Result<(), String> {
        let file = file_with(
            &[
                line("ci", "reader", "r-token"),
                line("ops", "operator", "o-token"),
                line("root", "admin", "a-token"),
            ]
            .concat(),
        );
        let auth = Authenticator::from_file(file.path())?;
        for (token, allowed) in [
            ("r-token", Role::Reader),
            ("o-token", Role::Operator),
            ("a-token", Role::Admin),
        ] {
            for needed in [Role::Reader, Role::Operator, Role::Admin] {
                let outcome = auth.authorize(&request_with(Some(token)), needed);
                match outcome {
                    Ok(Some(caller)) => {
                        assert!(needed <= allowed, "{token} did {needed:?}: {caller:?}")
                    }
                    Ok(None) => panic!("tokens are on"),
                    Err(status) => {
                        assert!(needed > allowed, "{token} refused {needed:?}: {status}");
                        assert_eq!(status.code(), Code::PermissionDenied);
                    }
                }
            }
        }
        let caller = auth.authorize(&request_with(Some("o-token")), Role::Reader);
        assert_eq!(
            caller.ok().flatten().map(|caller| caller.name),
            Some("ops".to_owned())
        );
        Ok(())
    }

    #[test]
    fn no_token_or_an_unknown_one_is_unauthenticated() -> Result<(), String> {
        let file = file_with(&line("ci", "reader", "r-token"));
        let auth = Authenticator::from_file(file.path())?;
        for metadata in [request_with(None), request_with(Some("guess"))] {
            let code = auth
                .authorize(&metadata, Role::Reader)
                .err()
                .map(|s| s.code());
            assert_eq!(code, Some(Code::Unauthenticated));
        }
        let mut basic = MetadataMap::new();
        basic.insert(
            "authorization",
            "Basic r-token".parse().map_err(|_| "header")?,
        );
        let code = auth.authorize(&basic, Role::Reader).err().map(|s| s.code());
        assert_eq!(code, Some(Code::Unauthenticated));
        assert!(
            Authenticator::off()
                .authorize(&request_with(None), Role::Admin)
                .is_ok()
        );
        Ok(())
    }

    #[test]
    fn a_reload_takes_effect_and_a_bad_file_keeps_the_tokens_in_force() -> Result<(), String> {
        let file = file_with(&[line("a", "admin", "one"), line("b", "reader", "two")].concat());
        let auth = Authenticator::from_file(file.path())?;
        std::fs::write(file.path(), line("b", "reader", "two")).map_err(|e| e.to_string())?;
        assert_eq!(auth.reload()?, 1);
        let removed = auth.authorize(&request_with(Some("one")), Role::Reader);
        assert_eq!(removed.err().map(|s| s.code()), Some(Code::Unauthenticated));
        std::fs::write(file.path(), "[[token]]\nname = 1\n").map_err(|e| e.to_string())?;
        assert!(auth.reload().is_err());
        assert!(
            auth.authorize(&request_with(Some("two")), Role::Reader)
                .is_ok()
        );
        Ok(())
    }

    #[test]
    fn a_bad_file_is_refused_naming_the_field() {
        for (text, field) in [
            (line("a", "boss", "x"), "token[0].role"),
            (
                "[[token]]\nname = \"a\"\nrole = \"reader\"\nsha256 = \"beef\"\n".to_owned(),
                "token[0].sha256",
            ),
            (
                [line("a", "reader", "x"), line("a", "admin", "y")].concat(),
                "token[1].name",
            ),
            (
                "[[token]]\nname = \"a\"\nrole = \"reader\"\nsha256 = \"00\"\nsecret = \"x\"\n"
                    .to_owned(),
                "secret",
            ),
        ] {
            let file = file_with(&text);
            let error = Authenticator::from_file(file.path())
                .err()
                .unwrap_or_default();
            assert!(error.contains(field), "{error:?} does not name {field}");
            assert!(
                error.contains(&file.path().display().to_string()),
                "{error:?}"
            );
        }
    }
}
