//! Who may do what: principals, users and their hashed tokens, access
//! rules, and the one check every front door asks, "may principal P do
//! operation OP on resource R".
//!
//! This module owns the identities the broker knows and the rules about
//! them. It does *not* know how a caller proved who it is on the wire: the
//! gRPC front door ([`crate::server`]) reads a bearer token or a verified
//! TLS client certificate and hands this module the token string or the
//! certificate's name; a Kafka front door would do the same with SASL. No
//! gRPC, TLS or Kafka type appears here, and nothing here reads topics.
//!
//! The model is Kafka's: a rule names a principal (or `*`), a resource
//! (a topic, a group or the cluster) by a literal name or a prefix, an
//! operation and allow or deny. A matching deny beats every allow, an
//! allowed read, write, delete or alter implies describe, and superusers
//! pass every check. With [`AuthMode::Off`] every caller is the anonymous
//! superuser, as before authentication existed.
//!
//! Changes (a user deleted, a token revoked, a rule added or removed) take
//! effect at the next check; [`Authorizer::changes`] lets long-lived calls
//! (subscriptions) check again as soon as one happens.
//!
//! Files:
//! - `mod.rs`: [`Authorizer`], [`Principal`], the settings and the errors;
//! - `acl.rs`: [`AclRule`], matching, and the rule store;
//! - `users.rs`: users, tokens (kept as SHA-256 hashes) and their store.
//!
//! On disk, under `<data-dir>/internal/auth/`, both written whole with
//! [`crate::storage::write_atomically`] (a crash leaves the old file or the
//! new one):
//!
//! ```text
//! users.json   {"users": [{name, superuser, created_ms}],
//!               "tokens": [{id, user, sha256, created_ms, expires_ms, description}]}
//! acls.json    {"rules": [{principal, resource_type, resource_name,
//!                          pattern_type, operation, permission}]}
//! ```
//!
//! A token's secret is never written: only its SHA-256, which is enough
//! because tokens are 256-bit random strings (no dictionary to attack).

mod acl;
mod users;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;
use tokio::sync::watch;

pub use acl::{AclRule, Operation, PatternType, Permission, ResourceType};
pub use users::{IssuedToken, TokenInfo, User};

use acl::AclStore;
use users::UserStore;

/// Whether callers must authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Every caller is the anonymous superuser.
    #[default]
    Off,
    /// Every call (but health, and reflection where it is public) must
    /// present a valid token or a verified client certificate.
    Required,
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(AuthMode::Off),
            "required" => Ok(AuthMode::Required),
            other => Err(format!("auth mode {other:?} is not one of: off, required")),
        }
    }
}

/// How a principal proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthenticatedBy {
    /// Authentication is off.
    Nothing,
    /// A bearer token.
    Token,
    /// A TLS client certificate the listener verified.
    Certificate,
    /// Authentication is required, but the caller came over a listener
    /// that cannot authenticate anyone (the Kafka listener, until SASL):
    /// the anonymous principal, allowed only what rules grant `anonymous`.
    Unauthenticated,
}

impl AuthenticatedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthenticatedBy::Nothing => "none",
            AuthenticatedBy::Token => "token",
            AuthenticatedBy::Certificate => "tls",
            AuthenticatedBy::Unauthenticated => "unauthenticated",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's name, or the certificate's.
    pub name: String,
    /// How it authenticated.
    pub by: AuthenticatedBy,
    /// The token it presented, so a long call can notice a revocation.
    token_id: Option<String>,
}

impl Principal {
    /// The caller when authentication is off.
    pub fn anonymous() -> Principal {
        Principal {
            name: ANONYMOUS.to_owned(),
            by: AuthenticatedBy::Nothing,
            token_id: None,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The name of the caller when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// What a check is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource<'a> {
    pub kind: ResourceType,
    pub name: &'a str,
}

impl<'a> Resource<'a> {
    pub fn topic(name: &'a str) -> Self {
        Resource {
            kind: ResourceType::Topic,
            name,
        }
    }
    pub fn group(name: &'a str) -> Self {
        Resource {
            kind: ResourceType::Group,
            name,
        }
    }
    pub fn cluster() -> Self {
        Resource {
            kind: ResourceType::Cluster,
            name: "",
        }
    }
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ResourceType::Cluster => f.write_str("the cluster"),
            kind => write!(f, "{} {:?}", kind.as_str(), self.name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The caller did not prove who it is.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is known but may not do this.
    #[error("principal {principal:?} may not {operation} {resource}")]
    Denied {
        principal: String,
        operation: &'static str,
        resource: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// How authentication starts and who is always allowed.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// Principals that pass every check (user or certificate names).
    pub superusers: Vec<String>,
    /// On the first start (no users file yet), a superuser is created
    /// with this token.
    pub bootstrap_token: Option<String>,
    /// On the first start, a superuser is created with the token this file
    /// holds; when the file does not exist the broker makes a token and
    /// writes it there (mode 0600).
    pub bootstrap_token_file: Option<PathBuf>,
    /// The bootstrap superuser's name.
    pub bootstrap_user: String,
}

/// The name of the bootstrap superuser unless another is given.
pub const DEFAULT_BOOTSTRAP_USER: &str = "admin";

/// The users, tokens and rules, and the checks against them.
pub struct Authorizer {
    mode: AuthMode,
    superusers: HashSet<String>,
    users: RwLock<UserStore>,
    acls: RwLock<AclStore>,
    changes: watch::Sender<u64>,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Authorizer {
    /// Opens (or, on the first start, creates) the users and rules under
    /// `dir` (`<data-dir>/internal/auth`).
    pub fn open(dir: &Path, settings: &AuthSettings) -> Result<Authorizer, AuthError> {
        std::fs::create_dir_all(dir).map_err(|source| AuthError::Io {
            what: "create directory",
            path: dir.to_owned(),
            source,
        })?;
        let (mut users, first_start) = UserStore::open(&dir.join("users.json"))?;
        if first_start {
            if let Some(token) = bootstrap_token(settings)? {
                let name = if settings.bootstrap_user.is_empty() {
                    DEFAULT_BOOTSTRAP_USER
                } else {
                    &settings.bootstrap_user
                };
                users.bootstrap(name, &token, now_ms())?;
                tracing::info!(
                    user = name,
                    "bootstrap superuser created from the bootstrap token"
                );
            }
        }
        let acls = AclStore::open(&dir.join("acls.json"))?;
        let authorizer = Authorizer {
            mode: settings.mode,
            superusers: settings.superusers.iter().cloned().collect(),
            users: RwLock::new(users),
            acls: RwLock::new(acls),
            changes: watch::Sender::new(0),
        };
        if authorizer.mode == AuthMode::Required
            && authorizer.superusers.is_empty()
            && !authorizer.users.read().has_superuser_token()
        {
            return Err(AuthError::Invalid(format!(
                "--auth required, but no superuser can authenticate: give --bootstrap-token-file \
                 (or SLUICE_BOOTSTRAP_TOKEN) on the first start, or --superusers naming a \
                 certificate principal (users file {})",
                dir.join("users.json").display()
            )));
        }
        Ok(authorizer)
    }

    /// An authorizer with authentication off and nothing stored, for
    /// embedding the server in tests.
    pub fn disabled() -> Authorizer {
        Authorizer {
            mode: AuthMode::Off,
            superusers: HashSet::new(),
            users: RwLock::new(UserStore::in_memory()),
            acls: RwLock::new(AclStore::in_memory()),
            changes: watch::Sender::new(0),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Ticks on every change of users, tokens or rules.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// The caller of a listener that has no way to authenticate anyone
    /// (the Kafka listener): with authentication off, the anonymous
    /// superuser, as over gRPC; with it required, the anonymous principal
    /// held to the rules, never a superuser.
    pub fn unauthenticated_principal(&self) -> Principal {
        match self.mode {
            AuthMode::Off => Principal::anonymous(),
            AuthMode::Required => Principal {
                name: ANONYMOUS.to_owned(),
                by: AuthenticatedBy::Unauthenticated,
                token_id: None,
            },
        }
    }

    /// The principal a bearer token names.
    pub fn authenticate_token(&self, token: &str) -> Result<Principal, AuthError> {
        let users = self.users.read();
        let record = users.verify(token, now_ms())?;
        Ok(Principal {
            name: record.user.clone(),
            by: AuthenticatedBy::Token,
            token_id: Some(record.id.clone()),
        })
    }

    /// The principal a verified client certificate names.
    pub fn authenticate_certificate(&self, name: &str) -> Principal {
        Principal {
            name: name.to_owned(),
            by: AuthenticatedBy::Certificate,
            token_id: None,
        }
    }

    /// Whether `principal` still stands: its token is neither revoked nor
    /// expired. For calls that outlive the request that authenticated them.
    pub fn still_authenticated(&self, principal: &Principal) -> Result<(), AuthError> {
        match &principal.token_id {
            None => Ok(()),
            Some(id) => self.users.read().check_token_id(id, now_ms()),
        }
    }

    /// Whether `principal` passes every check.
    pub fn is_superuser(&self, principal: &Principal) -> bool {
        principal.by == AuthenticatedBy::Nothing
            || self.superusers.contains(&principal.name)
            || (principal.by == AuthenticatedBy::Token
                && self.users.read().is_superuser(&principal.name))
    }

    /// Whether `principal` may do `operation` on `resource`.
    pub fn allowed(&self, principal: &Principal, operation: Operation, resource: Resource) -> bool {
        self.is_superuser(principal)
            || self
                .acls
                .read()
                .allows(&principal.name, operation, resource)
    }

    /// Kafka's rule for creating topic `name`, for both front doors:
    /// create on the cluster, or on the topic.
    pub fn may_create_topic(&self, principal: &Principal, name: &str) -> bool {
        self.allowed(principal, Operation::Create, Resource::cluster())
            || self.allowed(principal, Operation::Create, Resource::topic(name))
    }

    /// Kafka's rule (KIP-679) for handing an unnamed idempotent producer
    /// an id, for both front doors: write on the cluster, or on any topic
    /// of `topics` (an id writes nothing by itself).
    pub fn may_init_producer<'a>(
        &self,
        principal: &Principal,
        topics: impl IntoIterator<Item = &'a str>,
    ) -> bool {
        self.allowed(principal, Operation::Write, Resource::cluster())
            || topics
                .into_iter()
                .any(|t| self.allowed(principal, Operation::Write, Resource::topic(t)))
    }

    /// [`Self::allowed`], as an error that names the operation and the
    /// resource.
    pub fn authorize(
        &self,
        principal: &Principal,
        operation: Operation,
        resource: Resource,
    ) -> Result<(), AuthError> {
        if self.allowed(principal, operation, resource) {
            Ok(())
        } else {
            Err(AuthError::Denied {
                principal: principal.name.clone(),
                operation: operation.as_str(),
                resource: resource.to_string(),
            })
        }
    }

    // --- users and tokens --------------------------------------------------

    pub fn create_user(&self, name: &str, superuser: bool) -> Result<User, AuthError> {
        let user = self.users.write().create_user(name, superuser, now_ms())?;
        self.changed();
        Ok(user)
    }

    /// Deletes a user and its tokens; returns how many tokens went.
    pub fn delete_user(&self, name: &str) -> Result<usize, AuthError> {
        let revoked = self.users.write().delete_user(name)?;
        self.changed();
        Ok(revoked)
    }

    pub fn list_users(&self) -> Vec<User> {
        self.users.read().list()
    }

    pub fn create_token(
        &self,
        user: &str,
        ttl_ms: Option<u64>,
        description: &str,
    ) -> Result<IssuedToken, AuthError> {
        self.users
            .write()
            .create_token(user, ttl_ms, description, now_ms())
    }

    /// Revokes a token by id (or by the whole token); returns its info.
    pub fn revoke_token(&self, id_or_token: &str) -> Result<TokenInfo, AuthError> {
        let info = self.users.write().revoke(id_or_token)?;
        self.changed();
        Ok(info)
    }

    // --- rules -------------------------------------------------------------

    /// Adds a rule; false when an equal one was there.
    pub fn add_acl(&self, rule: AclRule) -> Result<bool, AuthError> {
        let added = self.acls.write().add(rule)?;
        self.changed();
        Ok(added)
    }

    /// Removes a rule equal to `rule`; false when there was none.
    pub fn remove_acl(&self, rule: &AclRule) -> Result<bool, AuthError> {
        let removed = self.acls.write().remove(rule)?;
        self.changed();
        Ok(removed)
    }

    pub fn list_acls(&self) -> Vec<AclRule> {
        self.acls.read().rules().to_vec()
    }
}

/// The bootstrap token the settings give, reading (or making and writing)
/// the bootstrap file.
fn bootstrap_token(settings: &AuthSettings) -> Result<Option<String>, AuthError> {
    if let Some(token) = settings.bootstrap_token.as_deref() {
        return users::check_bootstrap_token(token).map(Some);
    }
    let Some(path) = settings.bootstrap_token_file.as_deref() else {
        return Ok(None);
    };
    match std::fs::read_to_string(path) {
        Ok(text) => users::check_bootstrap_token(text.trim()).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = users::new_token_secret();
            write_secret_file(path, &token)?;
            tracing::info!(file = %path.display(), "bootstrap token written; it is shown nowhere else");
            Ok(Some(token))
        }
        Err(source) => Err(AuthError::Io {
            what: "read bootstrap token file",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes a new file readable by its owner only.
fn write_secret_file(path: &Path, secret: &str) -> Result<(), AuthError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| AuthError::Io {
        what: "write bootstrap token file",
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authorizer(dir: &Path, mode: AuthMode) -> Authorizer {
        Authorizer::open(
            dir,
            &AuthSettings {
                mode,
                bootstrap_token: Some("bootstrap-secret-0123456789".into()),
                ..AuthSettings::default()
            },
        )
        .unwrap()
    }

    fn rule(
        principal: &str,
        name: &str,
        pattern: PatternType,
        op: Operation,
        permission: Permission,
    ) -> AclRule {
        AclRule {
            principal: principal.into(),
            resource_type: ResourceType::Topic,
            resource_name: name.into(),
            pattern_type: pattern,
            operation: op,
            permission,
        }
    }

    /// A listener that cannot authenticate (Kafka's) hands out the
    /// superuser only while authentication is off; with it required, its
    /// callers get exactly what rules grant `anonymous`.
    #[test]
    fn an_unauthenticated_listener_is_held_to_the_rules() {
        let dir = tempfile::tempdir().unwrap();
        let off = authorizer(dir.path(), AuthMode::Off);
        assert!(off.is_superuser(&off.unauthenticated_principal()));
        drop(off);
        let dir = tempfile::tempdir().unwrap();
        let auth = authorizer(dir.path(), AuthMode::Required);
        let caller = auth.unauthenticated_principal();
        assert_eq!(caller.name, ANONYMOUS);
        assert!(!auth.is_superuser(&caller));
        assert!(!auth.allowed(&caller, Operation::Write, Resource::topic("orders")));
        assert!(!auth.allowed(&caller, Operation::Describe, Resource::cluster()));
        auth.add_acl(rule(
            ANONYMOUS,
            "orders",
            PatternType::Literal,
            Operation::Write,
            Permission::Allow,
        ))
        .unwrap();
        assert!(auth.allowed(&caller, Operation::Write, Resource::topic("orders")));
        assert!(!auth.allowed(&caller, Operation::Write, Resource::topic("payments")));
    }

    #[test]
    fn tokens_authenticate_until_revoked_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authorizer(dir.path(), AuthMode::Required);
        let admin = auth
            .authenticate_token("bootstrap-secret-0123456789")
            .unwrap();
        assert_eq!(admin.name, DEFAULT_BOOTSTRAP_USER);
        assert!(auth.is_superuser(&admin));
        auth.create_user("alice", false).unwrap();
        let issued = auth.create_token("alice", None, "test").unwrap();
        let alice = auth.authenticate_token(&issued.token).unwrap();
        assert_eq!(alice.name, "alice");
        assert!(!auth.is_superuser(&alice));
        drop(auth);

        let auth = authorizer(dir.path(), AuthMode::Required);
        assert_eq!(
            auth.authenticate_token(&issued.token).unwrap().name,
            "alice"
        );
        // The secret is not on disk, only its hash.
        let stored = std::fs::read_to_string(dir.path().join("users.json")).unwrap();
        assert!(!stored.contains(&issued.token));
        assert!(!stored.contains("bootstrap-secret"));
        auth.revoke_token(&issued.info.id).unwrap();
        assert!(matches!(
            auth.authenticate_token(&issued.token),
            Err(AuthError::Unauthenticated(_))
        ));
        assert!(auth.still_authenticated(&alice).is_err());
        assert!(matches!(
            auth.authenticate_token("sluice_nope_nope"),
            Err(AuthError::Unauthenticated(_))
        ));
    }

    #[test]
    fn an_expired_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authorizer(dir.path(), AuthMode::Required);
        auth.create_user("bob", false).unwrap();
        let issued = auth.create_token("bob", Some(1), "").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        let err = auth.authenticate_token(&issued.token).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn deny_wins_prefixes_match_their_prefix_and_read_implies_describe() {
        let dir = tempfile::tempdir().unwrap();
        let auth = authorizer(dir.path(), AuthMode::Required);
        auth.create_user("carol", false).unwrap();
        let carol = auth
            .authenticate_token(&auth.create_token("carol", None, "").unwrap().token)
            .unwrap();
        use Operation::*;
        use PatternType::*;
        use Permission::*;
        auth.add_acl(rule("carol", "orders.", Prefixed, Read, Allow))
            .unwrap();
        auth.add_acl(rule("*", "orders.secret", Literal, All, Deny))
            .unwrap();
        assert!(auth.allowed(&carol, Read, Resource::topic("orders.eu")));
        assert!(auth.allowed(&carol, Describe, Resource::topic("orders.eu")));
        assert!(!auth.allowed(&carol, Write, Resource::topic("orders.eu")));
        assert!(!auth.allowed(&carol, Read, Resource::topic("orders")));
        assert!(!auth.allowed(&carol, Read, Resource::topic("ordersx")));
        assert!(!auth.allowed(&carol, Read, Resource::topic("orders.secret")));
        assert!(!auth.allowed(&carol, Read, Resource::group("orders.eu")));
        let err = auth
            .authorize(&carol, Write, Resource::topic("orders.eu"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "principal \"carol\" may not write topic \"orders.eu\""
        );
        // Rules persist.
        drop(auth);
        let auth = authorizer(dir.path(), AuthMode::Required);
        assert!(auth.allowed(&carol, Read, Resource::topic("orders.eu")));
        assert!(!auth.allowed(&carol, Read, Resource::topic("orders.secret")));
    }

    #[test]
    fn required_auth_with_nobody_to_authenticate_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let err = Authorizer::open(
            dir.path(),
            &AuthSettings {
                mode: AuthMode::Required,
                ..AuthSettings::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("--bootstrap-token-file"), "{err}");
    }

    #[test]
    fn a_bootstrap_file_that_does_not_exist_gets_a_new_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bootstrap.token");
        let auth = Authorizer::open(
            &dir.path().join("auth"),
            &AuthSettings {
                mode: AuthMode::Required,
                bootstrap_token_file: Some(file.clone()),
                ..AuthSettings::default()
            },
        )
        .unwrap();
        let token = std::fs::read_to_string(&file).unwrap();
        let admin = auth.authenticate_token(token.trim()).unwrap();
        assert!(auth.is_superuser(&admin));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
