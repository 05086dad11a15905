//! Access rules in Kafka's model, their matching, and their store.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{AuthError, Resource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    Topic,
    Group,
    Cluster,
}

impl ResourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceType::Topic => "topic",
            ResourceType::Group => "group",
            ResourceType::Cluster => "cluster",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatternType {
    /// The name itself; `*` matches every name.
    Literal,
    /// Every name starting with it.
    Prefixed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Read,
    Write,
    Create,
    Delete,
    Alter,
    Describe,
    All,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Create => "create",
            Operation::Delete => "delete",
            Operation::Alter => "alter",
            Operation::Describe => "describe",
            Operation::All => "do everything to",
        }
    }

    /// Whether a rule about `self` covers a check of `asked`: `All` covers
    /// everything, and (for allows) read, write, delete and alter cover
    /// describe, as in Kafka.
    fn covers(self, asked: Operation, allowing: bool) -> bool {
        self == asked
            || self == Operation::All
            || (allowing
                && asked == Operation::Describe
                && matches!(
                    self,
                    Operation::Read | Operation::Write | Operation::Delete | Operation::Alter
                ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    Allow,
    Deny,
}

/// One rule: `principal` may (allow) or may not (deny) do `operation` on
/// the resources of `resource_type` that `resource_name` and
/// `pattern_type` match.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AclRule {
    /// A principal's name, or `*` for every principal.
    pub principal: String,
    pub resource_type: ResourceType,
    pub resource_name: String,
    pub pattern_type: PatternType,
    pub operation: Operation,
    pub permission: Permission,
}

/// Longest principal or resource name a rule may hold.
const MAX_NAME_BYTES: usize = 255;

impl AclRule {
    /// Checks the rule's fields; a cluster rule's name becomes `*`.
    pub fn validated(mut self) -> Result<AclRule, AuthError> {
        if self.principal.is_empty() || self.principal.len() > MAX_NAME_BYTES {
            return Err(AuthError::Invalid(format!(
                "a rule's principal is a name of 1 to {MAX_NAME_BYTES} bytes, or \"*\"; got {:?}",
                self.principal
            )));
        }
        if self.resource_type == ResourceType::Cluster {
            if !matches!(self.resource_name.as_str(), "" | "*") {
                return Err(AuthError::Invalid(format!(
                    "a cluster rule has no resource name (or \"*\"); got {:?}",
                    self.resource_name
                )));
            }
            self.resource_name = "*".into();
            self.pattern_type = PatternType::Literal;
        } else if self.resource_name.is_empty() || self.resource_name.len() > MAX_NAME_BYTES {
            return Err(AuthError::Invalid(format!(
                "a {} rule names 1 to {MAX_NAME_BYTES} bytes (\"*\" for all); got {:?}",
                self.resource_type.as_str(),
                self.resource_name
            )));
        }
        Ok(self)
    }

    fn matches(&self, principal: &str, resource: Resource) -> bool {
        (self.principal == "*" || self.principal == principal)
            && self.resource_type == resource.kind
            && match self.pattern_type {
                PatternType::Literal => {
                    self.resource_name == "*" || self.resource_name == resource.name
                }
                PatternType::Prefixed => resource.name.starts_with(&self.resource_name),
            }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct AclFile {
    rules: Vec<AclRule>,
}

/// Every rule, in memory, and the file that keeps them.
#[derive(Debug)]
pub(super) struct AclStore {
    /// None: not persisted (an embedded test server).
    path: Option<PathBuf>,
    rules: Vec<AclRule>,
}

impl AclStore {
    pub(super) fn open(path: &Path) -> Result<AclStore, AuthError> {
        let rules =
            match std::fs::read(path) {
                Ok(bytes) => serde_json::from_slice::<AclFile>(&bytes)
                    .map_err(|e| {
                        AuthError::Invalid(format!(
                            "{} is damaged ({e}); restore it from a backup, or move it aside to \
                             start with no rules",
                            path.display()
                        ))
                    })?
                    .rules,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(source) => {
                    return Err(AuthError::Io {
                        what: "read",
                        path: path.to_owned(),
                        source,
                    });
                }
            };
        Ok(AclStore {
            path: Some(path.to_owned()),
            rules,
        })
    }

    pub(super) fn in_memory() -> AclStore {
        AclStore {
            path: None,
            rules: Vec::new(),
        }
    }

    pub(super) fn rules(&self) -> &[AclRule] {
        &self.rules
    }

    /// A deny that matches wins; otherwise an allow that matches allows.
    pub(super) fn allows(&self, principal: &str, operation: Operation, resource: Resource) -> bool {
        let mut allowed = false;
        for rule in self.rules.iter().filter(|r| r.matches(principal, resource)) {
            match rule.permission {
                Permission::Deny if rule.operation.covers(operation, false) => return false,
                Permission::Allow if rule.operation.covers(operation, true) => allowed = true,
                _ => {}
            }
        }
        allowed
    }

    pub(super) fn add(&mut self, rule: AclRule) -> Result<bool, AuthError> {
        let rule = rule.validated()?;
        if self.rules.contains(&rule) {
            return Ok(false);
        }
        let mut rules = self.rules.clone();
        rules.push(rule);
        self.replace(rules)?;
        Ok(true)
    }

    pub(super) fn remove(&mut self, rule: &AclRule) -> Result<bool, AuthError> {
        let rule = rule.clone().validated()?;
        let rules: Vec<AclRule> = self.rules.iter().filter(|r| **r != rule).cloned().collect();
        if rules.len() == self.rules.len() {
            return Ok(false);
        }
        self.replace(rules)?;
        Ok(true)
    }

    /// Writes `rules`, then serves them: a failed write changes nothing.
    fn replace(&mut self, rules: Vec<AclRule>) -> Result<(), AuthError> {
        if let Some(path) = &self.path {
            let file = AclFile { rules };
            let bytes = serde_json::to_vec_pretty(&file).expect("rules serialize");
            crate::storage::write_atomically(path, &bytes)?;
            self.rules = file.rules;
        } else {
            self.rules = rules;
        }
        Ok(())
    }
}
