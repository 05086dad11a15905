//! `UserService` and `AclService`: users, tokens and access rules.
//!
//! Translation only: the rules about names, hashes and matching live in
//! [`crate::auth`]. Every change is logged with who made it and from where.

use std::sync::Arc;

use sluice_proto::v1::{self, acl_service_server::AclService, user_service_server::UserService};
use tonic::{Request, Response, Status};

use super::auth::{Access, peer_addr};
use super::{blocking, status};
use crate::auth::{
    AclRule, Operation, PatternType, Permission, Principal, Resource, ResourceType, TokenInfo, User,
};

pub(crate) struct Users {
    pub(crate) access: Access,
}

pub(crate) struct Acls {
    pub(crate) access: Access,
}

/// Who asked, and from where, for the audit log.
fn audit<T>(
    access: &Access,
    request: &Request<T>,
    operation: Operation,
) -> Result<(Arc<Principal>, String), Status> {
    let caller = access.check(request, operation, Resource::cluster())?;
    let peer =
        peer_addr(request.extensions()).map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    Ok((caller, peer))
}

fn token_info(info: TokenInfo) -> v1::TokenInfo {
    v1::TokenInfo {
        id: info.id,
        user: info.user,
        created_ms: info.created_ms,
        expires_ms: info.expires_ms,
        description: info.description,
    }
}

fn user(user: User) -> v1::User {
    v1::User {
        name: user.name,
        superuser: user.superuser,
        created_ms: user.created_ms,
        tokens: user.tokens.into_iter().map(token_info).collect(),
    }
}

#[tonic::async_trait]
impl UserService for Users {
    async fn create_user(
        &self,
        request: Request<v1::CreateUserRequest>,
    ) -> Result<Response<v1::CreateUserResponse>, Status> {
        let (caller, peer) = audit(&self.access, &request, Operation::Alter)?;
        let request = request.into_inner();
        let auth = Arc::clone(self.access.authorizer());
        let name = request.name.clone();
        let created = blocking(move || {
            auth.create_user(&request.name, request.superuser)
                .map_err(status::auth)
        })
        .await?;
        tracing::info!(principal = %caller, %peer, user = %name, superuser = created.superuser, "user created");
        Ok(Response::new(v1::CreateUserResponse {
            user: Some(user(created)),
        }))
    }

    async fn list_users(
        &self,
        request: Request<v1::ListUsersRequest>,
    ) -> Result<Response<v1::ListUsersResponse>, Status> {
        self.access
            .check(&request, Operation::Describe, Resource::cluster())?;
        let users = self.access.authorizer().list_users();
        Ok(Response::new(v1::ListUsersResponse {
            users: users.into_iter().map(user).collect(),
        }))
    }

    async fn delete_user(
        &self,
        request: Request<v1::DeleteUserRequest>,
    ) -> Result<Response<v1::DeleteUserResponse>, Status> {
        let (caller, peer) = audit(&self.access, &request, Operation::Alter)?;
        let name = request.into_inner().name;
        let auth = Arc::clone(self.access.authorizer());
        let deleted = name.clone();
        let revoked = blocking(move || auth.delete_user(&deleted).map_err(status::auth)).await?;
        tracing::info!(principal = %caller, %peer, user = %name, tokens_revoked = revoked, "user deleted");
        Ok(Response::new(v1::DeleteUserResponse {
            tokens_revoked: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }

    async fn create_token(
        &self,
        request: Request<v1::CreateTokenRequest>,
    ) -> Result<Response<v1::CreateTokenResponse>, Status> {
        let (caller, peer) = audit(&self.access, &request, Operation::Alter)?;
        let request = request.into_inner();
        let auth = Arc::clone(self.access.authorizer());
        let issued = blocking(move || {
            auth.create_token(&request.user, request.ttl_ms, &request.description)
                .map_err(status::auth)
        })
        .await?;
        tracing::info!(
            principal = %caller,
            %peer,
            user = %issued.info.user,
            token_id = %issued.info.id,
            expires_ms = ?issued.info.expires_ms,
            "token created"
        );
        Ok(Response::new(v1::CreateTokenResponse {
            token: issued.token,
            info: Some(token_info(issued.info)),
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<v1::RevokeTokenRequest>,
    ) -> Result<Response<v1::RevokeTokenResponse>, Status> {
        let (caller, peer) = audit(&self.access, &request, Operation::Alter)?;
        let id = request.into_inner().token_id;
        let auth = Arc::clone(self.access.authorizer());
        let revoked = blocking(move || auth.revoke_token(&id).map_err(status::auth)).await?;
        tracing::info!(principal = %caller, %peer, user = %revoked.user, token_id = %revoked.id, "token revoked");
        Ok(Response::new(v1::RevokeTokenResponse {}))
    }

    async fn who_am_i(
        &self,
        request: Request<v1::WhoAmIRequest>,
    ) -> Result<Response<v1::WhoAmIResponse>, Status> {
        let caller = self.access.caller(&request)?;
        Ok(Response::new(v1::WhoAmIResponse {
            principal: caller.name.clone(),
            superuser: self.access.authorizer().is_superuser(&caller),
            authenticated_by: caller.by.as_str().to_owned(),
        }))
    }
}

fn rule_from_proto(rule: Option<v1::AclRule>) -> Result<AclRule, Status> {
    let rule = rule.ok_or_else(|| Status::invalid_argument("the request names no rule"))?;
    let resource_type = match v1::ResourceType::try_from(rule.resource_type) {
        Ok(v1::ResourceType::Topic) => ResourceType::Topic,
        Ok(v1::ResourceType::Group) => ResourceType::Group,
        Ok(v1::ResourceType::Cluster) => ResourceType::Cluster,
        _ => {
            return Err(Status::invalid_argument(
                "a rule's resource type is topic, group or cluster",
            ));
        }
    };
    let pattern_type = match v1::PatternType::try_from(rule.pattern_type) {
        Ok(v1::PatternType::Literal | v1::PatternType::Unspecified) => PatternType::Literal,
        Ok(v1::PatternType::Prefixed) => PatternType::Prefixed,
        Err(_) => {
            return Err(Status::invalid_argument(
                "a rule's pattern type is literal or prefixed",
            ));
        }
    };
    let operation = match v1::Operation::try_from(rule.operation) {
        Ok(v1::Operation::Read) => Operation::Read,
        Ok(v1::Operation::Write) => Operation::Write,
        Ok(v1::Operation::Create) => Operation::Create,
        Ok(v1::Operation::Delete) => Operation::Delete,
        Ok(v1::Operation::Alter) => Operation::Alter,
        Ok(v1::Operation::Describe) => Operation::Describe,
        Ok(v1::Operation::All) => Operation::All,
        _ => {
            return Err(Status::invalid_argument(
                "a rule's operation is read, write, create, delete, alter, describe or all",
            ));
        }
    };
    let permission = match v1::Permission::try_from(rule.permission) {
        Ok(v1::Permission::Allow) => Permission::Allow,
        Ok(v1::Permission::Deny) => Permission::Deny,
        _ => {
            return Err(Status::invalid_argument(
                "a rule's permission is allow or deny",
            ));
        }
    };
    AclRule {
        principal: rule.principal,
        resource_type,
        resource_name: rule.resource_name,
        pattern_type,
        operation,
        permission,
    }
    .validated()
    .map_err(status::auth)
}

fn rule_to_proto(rule: AclRule) -> v1::AclRule {
    v1::AclRule {
        principal: rule.principal,
        resource_type: match rule.resource_type {
            ResourceType::Topic => v1::ResourceType::Topic,
            ResourceType::Group => v1::ResourceType::Group,
            ResourceType::Cluster => v1::ResourceType::Cluster,
        } as i32,
        resource_name: rule.resource_name,
        pattern_type: match rule.pattern_type {
            PatternType::Literal => v1::PatternType::Literal,
            PatternType::Prefixed => v1::PatternType::Prefixed,
        } as i32,
        operation: match rule.operation {
            Operation::Read => v1::Operation::Read,
            Operation::Write => v1::Operation::Write,
            Operation::Create => v1::Operation::Create,
            Operation::Delete => v1::Operation::Delete,
            Operation::Alter => v1::Operation::Alter,
            Operation::Describe => v1::Operation::Describe,
            Operation::All => v1::Operation::All,
        } as i32,
        permission: match rule.permission {
            Permission::Allow => v1::Permission::Allow,
            Permission::Deny => v1::Permission::Deny,
        } as i32,
    }
}

#[tonic::async_trait]
impl AclService for Acls {
    async fn add_acl(
        &self,
        request: Request<v1::AddAclRequest>,
    ) -> Result<Response<v1::AddAclResponse>, Status> {
        let (caller, peer) = audit(&self.access, &request, Operation::Alter)?;
        let rule = rule_from_proto(request.into_inner().rule)?;
        let auth = Arc::clone(self.access.authorizer());
        let logged = format!("{rule:?}");
        let added = blocking(move || auth.add_acl(rule).map_err(status::auth)).await?;
        tracing::info!(principal = %caller, %peer, rule = %logged, added, "ACL added");
        Ok(Response::new(v1::AddAclResponse { added }))
    }

    async fn list_acls(
        &self,
        request: Request<v1::ListAclsRequest>,
    ) -> Result<Response<v1::ListAclsResponse>, Status> {
        self.access
            .check(&request, Operation::Describe, Resource::cluster())?;
        let request = request.into_inner();
        let kind = match v1::ResourceType::try_from(request.resource_type) {
            Ok(v1::ResourceType::Topic) => Some(ResourceType::Topic),
            Ok(v1::ResourceType::Group) => Some(ResourceType::Group),
            Ok(v1::ResourceType::Cluster) => Some(ResourceType::Cluster),
            _ => None,
        };
        let rules = self
            .access
            .authorizer()
            .list_acls()
            .into_iter()
            .filter(|r| request.principal.as_ref().is_none_or(|p| *p == r.principal))
            .filter(|r| kind.is_none_or(|k| k == r.resource_type))
            .map(rule_to_proto)
            .collect();
        Ok(Response::new(v1::ListAclsResponse { rules }))
    }

    async fn remove_acl(
        &self,
        request: Request<v1::RemoveAclRequest>,
    ) -> Result<Response<v1::RemoveAclResponse>, Status> {
        let (caller, peer) = audit(&self.access, &request, Operation::Alter)?;
        let rule = rule_from_proto(request.into_inner().rule)?;
        let auth = Arc::clone(self.access.authorizer());
        let logged = format!("{rule:?}");
        let removed = blocking(move || auth.remove_acl(&rule).map_err(status::auth)).await?;
        tracing::info!(principal = %caller, %peer, rule = %logged, removed, "ACL removed");
        Ok(Response::new(v1::RemoveAclResponse { removed }))
    }
}
