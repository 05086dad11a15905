//! Users and their bearer tokens, kept as SHA-256 hashes.
//!
//! A token the broker issues is `sluice_<id>_<secret>`: the id (16 hex
//! digits) names it in listings and revocations, the secret is 32 random
//! bytes. A presented token is found by the hash of the whole string, so a
//! bootstrap token an operator chose (any string of 16 bytes or more)
//! works the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};

use super::AuthError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: String,
    pub superuser: bool,
    pub created_ms: i64,
    /// Filled in by listings; not stored with the user.
    #[serde(skip)]
    pub tokens: Vec<TokenInfo>,
}

/// A token as stored and listed: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub user: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub description: String,
}

/// A new token: the secret, shown once, and its info.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub token: String,
    pub info: TokenInfo,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredToken {
    #[serde(flatten)]
    info: TokenInfo,
    /// Lowercase hex SHA-256 of the whole token.
    sha256: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct UsersFile {
    users: Vec<User>,
    tokens: Vec<StoredToken>,
}

#[derive(Debug)]
pub(super) struct UserStore {
    /// None: not persisted (an embedded test server).
    path: Option<PathBuf>,
    users: Vec<User>,
    tokens: Vec<StoredToken>,
    /// Index of `tokens` by hash.
    by_hash: HashMap<String, usize>,
}

const TOKEN_PREFIX: &str = "sluice_";
/// Shortest bootstrap token an operator may choose.
const MIN_BOOTSTRAP_TOKEN_BYTES: usize = 16;
const MAX_USER_NAME_BYTES: usize = 128;
const MAX_DESCRIPTION_BYTES: usize = 256;

fn sha256_hex(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source works");
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new token: `sluice_<id>_<secret>`.
fn new_token() -> (String, String) {
    let id = hex(&random_bytes::<8>());
    let secret = hex(&random_bytes::<32>());
    (format!("{TOKEN_PREFIX}{id}_{secret}"), id)
}

/// A token for the bootstrap file.
pub(super) fn new_token_secret() -> String {
    new_token().0
}

/// A bootstrap token an operator gave, if it is long enough to be a secret.
pub(super) fn check_bootstrap_token(token: &str) -> Result<String, AuthError> {
    if token.len() < MIN_BOOTSTRAP_TOKEN_BYTES || token.chars().any(char::is_whitespace) {
        return Err(AuthError::Invalid(format!(
            "the bootstrap token must be at least {MIN_BOOTSTRAP_TOKEN_BYTES} bytes with no \
             white space"
        )));
    }
    Ok(token.to_owned())
}

fn check_user_name(name: &str) -> Result<(), AuthError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_USER_NAME_BYTES
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'))
        && name != super::ANONYMOUS;
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!(
            "user name {name:?} is not 1 to {MAX_USER_NAME_BYTES} of letters, digits, '.', '_', \
             '-' and '@' (and not {:?})",
            super::ANONYMOUS
        )))
    }
}

impl UserStore {
    /// The store at `path`, and whether it is new (the first start).
    pub(super) fn open(path: &Path) -> Result<(UserStore, bool), AuthError> {
        let (file, first) = match std::fs::read(path) {
            Ok(bytes) => (
                serde_json::from_slice::<UsersFile>(&bytes).map_err(|e| {
                    AuthError::Invalid(format!(
                        "{} is damaged ({e}); restore it from a backup, or move it aside and \
                         bootstrap again",
                        path.display()
                    ))
                })?,
                false,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (UsersFile::default(), true),
            Err(source) => {
                return Err(AuthError::Io {
                    what: "read",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let mut store = UserStore {
            path: Some(path.to_owned()),
            users: file.users,
            tokens: file.tokens,
            by_hash: HashMap::new(),
        };
        store.reindex();
        Ok((store, first))
    }

    pub(super) fn in_memory() -> UserStore {
        UserStore {
            path: None,
            users: Vec::new(),
            tokens: Vec::new(),
            by_hash: HashMap::new(),
        }
    }

    fn reindex(&mut self) {
        self.by_hash = self
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.sha256.clone(), i))
            .collect();
    }

    /// Writes the users and tokens given, then serves them: a failed
    /// write changes nothing.
    fn replace(&mut self, users: Vec<User>, tokens: Vec<StoredToken>) -> Result<(), AuthError> {
        if let Some(path) = &self.path {
            let file = UsersFile { users, tokens };
            let bytes = serde_json::to_vec_pretty(&file).expect("users serialize");
            crate::storage::write_atomically(path, &bytes)?;
            self.users = file.users;
            self.tokens = file.tokens;
        } else {
            self.users = users;
            self.tokens = tokens;
        }
        self.reindex();
        Ok(())
    }

    /// The first start's superuser, with the bootstrap token.
    pub(super) fn bootstrap(
        &mut self,
        name: &str,
        token: &str,
        now_ms: i64,
    ) -> Result<(), AuthError> {
        check_user_name(name)?;
        let users = vec![User {
            name: name.to_owned(),
            superuser: true,
            created_ms: now_ms,
            tokens: Vec::new(),
        }];
        let tokens = vec![StoredToken {
            info: TokenInfo {
                id: "bootstrap".into(),
                user: name.to_owned(),
                created_ms: now_ms,
                expires_ms: None,
                description: "bootstrap token".into(),
            },
            sha256: sha256_hex(token),
        }];
        self.replace(users, tokens)
    }

    pub(super) fn has_superuser_token(&self) -> bool {
        self.tokens.iter().any(|t| self.is_superuser(&t.info.user))
    }

    pub(super) fn is_superuser(&self, name: &str) -> bool {
        self.users.iter().any(|u| u.name == name && u.superuser)
    }

    /// The token `token` is, if it is known and not expired.
    pub(super) fn verify(&self, token: &str, now_ms: i64) -> Result<&TokenInfo, AuthError> {
        let stored = self
            .by_hash
            .get(&sha256_hex(token))
            .map(|&i| &self.tokens[i])
            .ok_or_else(|| AuthError::Unauthenticated("unknown or revoked token".into()))?;
        check_expiry(&stored.info, now_ms)?;
        Ok(&stored.info)
    }

    /// Whether the token with id `id` still stands.
    pub(super) fn check_token_id(&self, id: &str, now_ms: i64) -> Result<(), AuthError> {
        let stored = self
            .tokens
            .iter()
            .find(|t| t.info.id == id)
            .ok_or_else(|| AuthError::Unauthenticated("the token was revoked".into()))?;
        check_expiry(&stored.info, now_ms)
    }

    pub(super) fn create_user(
        &mut self,
        name: &str,
        superuser: bool,
        now_ms: i64,
    ) -> Result<User, AuthError> {
        check_user_name(name)?;
        if self.users.iter().any(|u| u.name == name) {
            return Err(AuthError::AlreadyExists(format!("user {name:?} exists")));
        }
        let user = User {
            name: name.to_owned(),
            superuser,
            created_ms: now_ms,
            tokens: Vec::new(),
        };
        let mut users = self.users.clone();
        users.push(user.clone());
        self.replace(users, self.tokens.clone())?;
        Ok(user)
    }

    pub(super) fn delete_user(&mut self, name: &str) -> Result<usize, AuthError> {
        if !self.users.iter().any(|u| u.name == name) {
            return Err(AuthError::NotFound(format!("no user {name:?}")));
        }
        let users = self
            .users
            .iter()
            .filter(|u| u.name != name)
            .cloned()
            .collect();
        let tokens: Vec<StoredToken> = self
            .tokens
            .iter()
            .filter(|t| t.info.user != name)
            .cloned()
            .collect();
        let revoked = self.tokens.len() - tokens.len();
        self.replace(users, tokens)?;
        Ok(revoked)
    }

    pub(super) fn list(&self) -> Vec<User> {
        self.users
            .iter()
            .map(|u| User {
                tokens: self
                    .tokens
                    .iter()
                    .filter(|t| t.info.user == u.name)
                    .map(|t| t.info.clone())
                    .collect(),
                ..u.clone()
            })
            .collect()
    }

    pub(super) fn create_token(
        &mut self,
        user: &str,
        ttl_ms: Option<u64>,
        description: &str,
        now_ms: i64,
    ) -> Result<IssuedToken, AuthError> {
        if !self.users.iter().any(|u| u.name == user) {
            return Err(AuthError::NotFound(format!("no user {user:?}")));
        }
        if description.len() > MAX_DESCRIPTION_BYTES {
            return Err(AuthError::Invalid(format!(
                "a token's description is at most {MAX_DESCRIPTION_BYTES} bytes"
            )));
        }
        let expires_ms = match ttl_ms.filter(|t| *t > 0) {
            None => None,
            Some(ttl) => Some(
                i64::try_from(ttl)
                    .ok()
                    .and_then(|ttl| now_ms.checked_add(ttl))
                    .ok_or_else(|| AuthError::Invalid(format!("ttl of {ttl} ms is too long")))?,
            ),
        };
        let (token, id) = new_token();
        let info = TokenInfo {
            id,
            user: user.to_owned(),
            created_ms: now_ms,
            expires_ms,
            description: description.to_owned(),
        };
        let mut tokens = self.tokens.clone();
        tokens.push(StoredToken {
            info: info.clone(),
            sha256: sha256_hex(&token),
        });
        self.replace(self.users.clone(), tokens)?;
        Ok(IssuedToken { token, info })
    }

    /// Revokes by id, or by the whole token.
    pub(super) fn revoke(&mut self, id_or_token: &str) -> Result<TokenInfo, AuthError> {
        let hash = sha256_hex(id_or_token);
        let index = self
            .tokens
            .iter()
            .position(|t| t.info.id == id_or_token || t.sha256 == hash)
            .ok_or_else(|| AuthError::NotFound(format!("no token {id_or_token:?}")))?;
        let mut tokens = self.tokens.clone();
        let revoked = tokens.remove(index);
        self.replace(self.users.clone(), tokens)?;
        Ok(revoked.info)
    }
}

fn check_expiry(info: &TokenInfo, now_ms: i64) -> Result<(), AuthError> {
    match info.expires_ms {
        Some(expires) if expires <= now_ms => Err(AuthError::Unauthenticated(format!(
            "the token expired {} s ago",
            (now_ms - expires) / 1000
        ))),
        _ => Ok(()),
    }
}
