//! Users, tokens and access rules (`UserService`, `AclService`).
//!
//! The rule types are the `sluice.v1` messages themselves, re-exported: the
//! broker owns their meaning (docs/SECURITY.md), and a second copy here
//! would be a second place to keep in step.

use std::time::Duration;

use sluice_proto::v1::{
    self, acl_service_client::AclServiceClient, user_service_client::UserServiceClient,
};
pub use sluice_proto::v1::{
    AclRule, Operation, PatternType, Permission, ResourceType, TokenInfo, User,
    WhoAmIResponse as WhoAmI,
};

use crate::connection::{Channel, ClientConfig, with_timeout};
use crate::error::Result;

/// A new token: the secret (shown once) and what the broker keeps of it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// Send as `authorization: Bearer <token>` (or `ClientConfig::with_token`).
    pub token: String,
    /// Its id, user and expiry.
    pub info: TokenInfo,
}

/// Manages users, tokens and ACLs; every call but `who_am_i` needs a
/// principal allowed to alter (or describe) the cluster.
#[derive(Debug, Clone)]
pub struct SecurityAdmin {
    users: UserServiceClient<Channel>,
    acls: AclServiceClient<Channel>,
    timeout: Duration,
}

impl SecurityAdmin {
    /// A handle for the broker of `config` (connects on first use).
    pub fn new(config: &ClientConfig) -> Result<SecurityAdmin> {
        let channel = config.channel()?;
        Ok(SecurityAdmin {
            users: UserServiceClient::new(channel.clone()),
            acls: AclServiceClient::new(channel),
            timeout: config.request_timeout,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_timeout(message, self.timeout)
    }

    /// Who the broker takes this client for.
    pub async fn who_am_i(&self) -> Result<WhoAmI> {
        Ok(self
            .users
            .clone()
            .who_am_i(self.request(v1::WhoAmIRequest {}))
            .await?
            .into_inner())
    }

    /// Creates a user.
    pub async fn create_user(&self, name: &str, superuser: bool) -> Result<User> {
        let response = self
            .users
            .clone()
            .create_user(self.request(v1::CreateUserRequest {
                name: name.to_owned(),
                superuser,
            }))
            .await?
            .into_inner();
        Ok(response.user.unwrap_or_default())
    }

    /// Every user, with its tokens' ids and expiries.
    pub async fn list_users(&self) -> Result<Vec<User>> {
        Ok(self
            .users
            .clone()
            .list_users(self.request(v1::ListUsersRequest {}))
            .await?
            .into_inner()
            .users)
    }

    /// Deletes a user and its tokens; returns how many tokens went.
    pub async fn delete_user(&self, name: &str) -> Result<u32> {
        Ok(self
            .users
            .clone()
            .delete_user(self.request(v1::DeleteUserRequest {
                name: name.to_owned(),
            }))
            .await?
            .into_inner()
            .tokens_revoked)
    }

    /// Issues a token for `user`, valid for `ttl` (`None`: until revoked).
    pub async fn create_token(
        &self,
        user: &str,
        ttl: Option<Duration>,
        description: &str,
    ) -> Result<IssuedToken> {
        let response = self
            .users
            .clone()
            .create_token(self.request(v1::CreateTokenRequest {
                user: user.to_owned(),
                ttl_ms: ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                description: description.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(IssuedToken {
            token: response.token,
            info: response.info.unwrap_or_default(),
        })
    }

    /// Revokes a token by its id (or the whole token).
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        self.users
            .clone()
            .revoke_token(self.request(v1::RevokeTokenRequest {
                token_id: id.to_owned(),
            }))
            .await?;
        Ok(())
    }

    /// Adds a rule; false when an equal one was there.
    pub async fn add_acl(&self, rule: AclRule) -> Result<bool> {
        Ok(self
            .acls
            .clone()
            .add_acl(self.request(v1::AddAclRequest { rule: Some(rule) }))
            .await?
            .into_inner()
            .added)
    }

    /// Rules, all or only one principal's.
    pub async fn list_acls(&self, principal: Option<&str>) -> Result<Vec<AclRule>> {
        Ok(self
            .acls
            .clone()
            .list_acls(self.request(v1::ListAclsRequest {
                principal: principal.map(str::to_owned),
                resource_type: ResourceType::Unspecified as i32,
            }))
            .await?
            .into_inner()
            .rules)
    }

    /// Removes a rule equal to `rule`; false when there was none.
    pub async fn remove_acl(&self, rule: AclRule) -> Result<bool> {
        Ok(self
            .acls
            .clone()
            .remove_acl(self.request(v1::RemoveAclRequest { rule: Some(rule) }))
            .await?
            .into_inner()
            .removed)
    }
}

/// A rule, built from its parts.
pub fn acl_rule(
    principal: &str,
    resource_type: ResourceType,
    resource_name: &str,
    pattern_type: PatternType,
    operation: Operation,
    permission: Permission,
) -> AclRule {
    AclRule {
        principal: principal.to_owned(),
        resource_type: resource_type as i32,
        resource_name: resource_name.to_owned(),
        pattern_type: pattern_type as i32,
        operation: operation as i32,
        permission: permission as i32,
    }
}
